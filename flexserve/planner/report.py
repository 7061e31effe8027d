"""What `flexserve plan` and `flexserve calibrate` print: a plan or a hardware profile, as text or as JSON.

Kept apart from the search so that the numbers a user reads come from one place, whichever front end asks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..compression.names import DEFAULT_GROUP_SIZE, GROUPED_SCHEMES
from ..config import ModelConfig
from ..offload.policy import Policy
from .accuracy import accuracy, spread_line
from .cost_model import placed_point
from .hardware import Hardware, format_size
from .parallel import ParallelEstimate
from .quant import RESULTS_REF, SHORT_NOTES, quality_note
from .quant_choice import QuantChoice
from .search import Plan, describe_policy
from .sizes import model_sizes
from .shapes import DTYPE_BYTES


@dataclass(frozen=True)
class Workload:
    """What a plan was made for, as the report names it."""

    model: str | None  # the model string given (the report prefers the config's own name)
    dtype: str
    prompt_len: int
    gen_len: int


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def weight_bytes(config: ModelConfig, policy: Policy, dtype: str) -> dict[str, float]:
    """One decoder layer's weights and all of them, as `policy` stores them (quantised or not)."""
    sz = model_sizes(config, policy, DTYPE_BYTES[dtype])
    return {"per_layer": sz.layer_w, "total": sz.total_w, "kv_per_token_layer": sz.kv_token}


def plan_to_dict(plan: Plan, config: ModelConfig, work: Workload) -> dict:
    e, hw, p = plan.estimate, plan.hardware, plan.policy
    return {
        "model": config.name, "hardware": hw.name, "dtype": work.dtype,
        "prompt_len": work.prompt_len, "gen_len": work.gen_len,
        "policy": dataclasses.asdict(p), "percent": list(p.percent), "flags": p.percent_flags(),
        "quantization": p.quantization, "kv_cache_dtype": p.kv_cache_dtype, "quality": quality_note(p),
        "weight_bytes": weight_bytes(config, p, work.dtype),
        "block_size": p.block_size,
        "prefill_tok_s": e.prefill_tok_s, "decode_tok_s": e.decode_tok_s, "total_tok_s": e.total_tok_s,
        "prefill_s": e.prefill_s, "decode_s_per_step": e.decode_s_per_step, "total_s": e.total_s,
        "peak_bytes": e.peak_bytes, "limits": hw.limits(),
        "pool_limit": hw.pool_limit(),
        "bottleneck": e.bottleneck, "decode_bottleneck": e.decode_bottleneck,
        "prefill_bottleneck": e.prefill_bottleneck, "breakdown": e.breakdown,
        "search": {"shapes": plan.num_candidates, "solves": plan.num_solved, "seconds": plan.search_s},
        "accuracy": {**accuracy(), "line": spread_line()},
        "placed": {"shares": list(placed_point(config, p)), "decode_tok_s": e.decode_tok_s,
                   "total_tok_s": e.total_tok_s, "peak_bytes": e.peak_bytes, "overflows": e.overflows(hw)},
    }


def parallel_to_dict(par: ParallelEstimate) -> dict:
    return {"tp": par.tp, "pp": par.pp, "micro_batches": par.micro_batches, "prefill_tok_s": par.prefill_tok_s,
            "decode_tok_s": par.decode_tok_s, "total_tok_s": par.total_tok_s, "comm_decode_s": par.comm_decode_s,
            "comm_prefill_s": par.comm_prefill_s, "comm_fraction": par.comm_fraction}


def _placed_line(plan: Plan, config: ModelConfig) -> str:
    """The realised shares of the plan's policy; its estimate is already the policy as placed (`search`)."""
    x = placed_point(config, plan.policy)
    e = plan.estimate
    over = e.overflows(plan.hardware)
    return (f"weights {x[0]:.0%} GPU / {x[1]:.0%} CPU / {1 - x[0] - x[1]:.0%} disk (whole tensors): decode "
            f"{e.decode_tok_s:,.2f} tok/s, total {e.total_tok_s:,.2f} tok/s; "
            + ("fits" if not over else "does NOT fit: " + "; ".join(over) + " (lower that tier's size and plan again)"))


def format_plan(plan: Plan, config: ModelConfig, work: Workload) -> str:
    e, hw, p = plan.estimate, plan.hardware, plan.policy
    nbytes = config.num_params() * DTYPE_BYTES[work.dtype]
    mem = ", ".join(f"{t.upper()} {format_size(e.peak_bytes[t])} of {format_size(lim)}"
                    for t, lim in hw.limits().items())
    if hw.unified_memory:
        mem += (f"; GPU + CPU {format_size(e.peak_gpu_bytes + e.peak_cpu_bytes)} of {format_size(hw.pool_limit())}"
                " (one memory: the compute device's is the host's)")
    if hw.host_reserve:
        mem += f" (CPU: {hw.host_reserve:.0%} of {format_size(hw.cpu_mem)} left to the system)"
    rows = [
        ("model", f"{config.name or work.model} ({config.num_params() / 1e9:.1f}B params, {format_size(nbytes)} "
                  f"of {work.dtype} weights) on the '{hw.name}' profile"),
        ("workload", f"prompt {work.prompt_len} + {work.gen_len} generated tokens per sequence, block "
                     f"{p.gpu_batch_size}x{p.num_gpu_batches} = {p.block_size} sequences"),
        ("policy", describe_policy(p) + ("; CPU attention" if p.cpu_cache_compute else "")),
        ("flags", p.percent_flags()),
        ("weights", _weights_line(config, p, work.dtype)),
        ("quality", quality_note(p)),
        ("predicted", f"prefill {e.prefill_tok_s:,.1f} tok/s, decode {e.decode_tok_s:,.2f} tok/s, "
                      f"total {e.total_tok_s:,.2f} tok/s ({format_seconds(e.prefill_s)} prefill, "
                      f"{format_seconds(e.decode_s_per_step)} per decode step)"),
        ("accuracy", spread_line()),
        ("memory", mem),
        ("as placed", _placed_line(plan, config)),
        ("bottleneck", f"{e.decode_bottleneck} (decode), {e.prefill_bottleneck} (prefill); overall {e.bottleneck}"),
        ("search", f"{plan.num_candidates} block shapes, {plan.num_solved} LP/MILP solves, {plan.search_s:.2f} s"),
    ]
    if e.decode_bottleneck == "launch overhead" and p.w_gpu_percent == 100 and not hw.unified_memory:
        rows.append(("note", "decode is bound by the host issuing kernels, not by the GPU: the model fits, so "
                             "the paged engine (`flexserve serve`, `bench throughput --engine paged`), which "
                             "replays decode steps as CUDA graphs, avoids that cost"))
    return "\n".join(f"{k:<11}{v}" for k, v in rows)


def _weights_line(config: ModelConfig, p: Policy, dtype: str) -> str:
    b = weight_bytes(config, p, dtype)
    kind = p.quantization or ("4-bit compressed" if p.compress_weight else dtype)
    return (f"{format_size(b['total'])} as stored ({kind} decoder layers of {format_size(b['per_layer'])} each)"
            + ("; KV cache fp8" if p.kv_cache_dtype == "fp8" else ""))


def _scheme_policy(scheme: str | None, group_size: int) -> Policy:
    return Policy(quantization=scheme, quant_group_size=group_size if scheme in GROUPED_SCHEMES
                  else DEFAULT_GROUP_SIZE)


def format_quant_choice(choice: QuantChoice, config: ModelConfig, dtype: str,
                        group_size: int = DEFAULT_GROUP_SIZE) -> str:
    """`--quantization auto`: the chosen scheme and why, then a row per scheme tried."""
    lines = [f"{'quantize':<11}auto chose {choice.scheme or 'none'}: {choice.reason}",
             f"{'':<11}{'scheme':<8}{'fits':<6}{'total tok/s':>13}{'decode tok/s':>14}  {'weights':>10}  "
             f"quality ({RESULTS_REF}, SmolLM2-135M)"]
    for t in choice.trials:
        total = weight_bytes(config, _scheme_policy(t.scheme, group_size), dtype)["total"]
        tok = f"{t.total_tok_s:>13,.2f}{t.plan.estimate.decode_tok_s:>14,.2f}" if t.fits else f"{'-':>13}{'-':>14}"
        mark = " <- chosen" if t.scheme == choice.scheme else ""
        lines.append(f"{'':<11}{t.name:<8}{'yes' if t.fits else 'no':<6}{tok}  {format_size(total):>10}  "
                     f"{SHORT_NOTES.get(t.scheme, 'not measured')}{mark}")
    lines += [f"{'':<11}{t.name} does not fit: {t.why_not}" for t in choice.trials if not t.fits]
    return "\n".join(lines)


def quant_choice_to_dict(choice: QuantChoice, config: ModelConfig, dtype: str,
                         group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    return {"chosen": choice.scheme, "reason": choice.reason, "tolerance": choice.tolerance,
            "trials": [{"scheme": t.scheme, "fits": t.fits, "why_not": t.why_not or None,
                        "total_tok_s": t.total_tok_s if t.fits else None,
                        "decode_tok_s": t.plan.estimate.decode_tok_s if t.fits else None,
                        "weight_bytes": weight_bytes(config, _scheme_policy(t.scheme, group_size), dtype)["total"]}
                       for t in choice.trials]}


def format_parallel(par: ParallelEstimate) -> str:
    return (f"{'parallel':<11}tp {par.tp} x pp {par.pp} ({par.micro_batches} micro-batches), per rank as above: "
            f"prefill {par.prefill_tok_s:,.1f} tok/s, decode {par.decode_tok_s:,.2f} tok/s, total "
            f"{par.total_tok_s:,.2f} tok/s; communication {format_seconds(par.comm_decode_s)} of each "
            f"{format_seconds(par.decode_s_per_step)} decode step ({par.comm_fraction:.0%})")


def format_hardware(hw: Hardware) -> str:
    gbs = lambda v: f"{v / 1e9:.1f} GB/s"  # noqa: E731
    tfl = lambda v: f"{v / 1e12:.3g} TFLOP/s"  # noqa: E731
    rows = [
        ("profile", hw.name),
        ("memory", f"GPU {format_size(hw.gpu_mem)}, CPU {format_size(hw.cpu_mem)}, disk {format_size(hw.disk)}"),
        ("host->gpu", f"pinned {gbs(hw.h2d_pinned_bw)}, pageable {gbs(hw.h2d_pageable_bw)}"),
        ("gpu->host", f"pinned {gbs(hw.d2h_pinned_bw)}, pageable {gbs(hw.d2h_pageable_bw)}"),
        ("disk", f"read {gbs(hw.disk_read_bw)}, write {gbs(hw.disk_write_bw)}"),
        ("gpu matmul", f"fp16 {tfl(hw.gpu_flops_fp16)}, bf16 {tfl(hw.gpu_flops_bf16)}, "
                       f"fp32 {tfl(hw.gpu_flops_fp32)}"),
        ("gpu memory", gbs(hw.gpu_mem_bw)),
        ("cpu", f"{tfl(hw.cpu_flops)} fp32, memory read {gbs(hw.cpu_mem_bw)}"),
        ("overhead", f"{hw.layer_overhead_s * 1e6:.0f} us to issue the reference layer (10 kernels), "
                     f"{hw.layer_sync_s * 1e6:.0f} us unoverlapped, per layer per batch"),
        ("cpu attn", f"cache read fp16 {hw.cpu_attention_rate('float16') / 1e9:.1f}, bf16 "
                     f"{hw.cpu_attention_rate('bfloat16') / 1e9:.1f}, fp32 {hw.cpu_attention_rate('float32') / 1e9:.1f}"
                     f" GB/s" + (f"; host->gpu beside it {hw.h2d_contended_bw / 1e9:.1f} GB/s" if hw.h2d_contended_bw
                                 else "")
                     + (f"; 4-bit rebuild {hw.dequant_bw / 1e9:.1f} GB/s" if hw.dequant_bw else "")),
        ("notes", hw.notes),
    ]
    return "\n".join(f"{k:<11}{v}" for k, v in rows)
