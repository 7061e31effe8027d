"""`flexserve plan` and `flexserve calibrate`: argument hooks that `flexserve/cli.py` mounts as subcommands.

Each command is a pair: `add_*_arguments(parser)` declares the flags, `run_*(args) -> int` does the work and
returns the exit status. Errors are raised as `FlexServeError` subclasses for the main CLI to print.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..config import ModelConfig, load_hf_config, preset
from ..errors import ModelLoadError, PolicyError
from .cost_model import placed_point
from .hardware import Hardware, format_size, parse_size, resolve_hardware, save_hardware
from .search import Plan, default_hardware, describe_policy, search

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def resolve_model_config(model: str | None) -> ModelConfig:
    """The shape of a model string: a preset name (`opt-30b`, `dummy:opt-30b`, `facebook/opt-30b`), an HF
    folder, a GGUF file, or None for the default model. Only configs are read, never weights."""
    if model is None or (os.path.isfile(model) and model.endswith(".gguf")):
        from ..weights import open_source  # a GGUF source reads its header and tensor index, not the weights

        return open_source(model).config
    if model.startswith("dummy:"):
        return preset(model[len("dummy:"):])
    if os.path.isdir(model):
        return load_hf_config(model)
    try:
        return preset(model)
    except ModelLoadError as e:
        if os.path.exists(model) or model.endswith(".gguf") or os.sep in model:
            raise ModelLoadError(f"model {model!r} is neither a Hugging Face folder, a .gguf file nor a preset "
                                 f"shape ({e})") from None
        raise


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="preset shape (opt-30b, dummy:llama-3-8b, ...), HF folder or .gguf file")
    parser.add_argument("--gpu-mem", default=None, help="GPU memory to use, e.g. 16GiB (default: the profile's)")
    parser.add_argument("--cpu-mem", default=None, help="CPU memory to use, e.g. 200GiB")
    parser.add_argument("--disk", default=None, help="disk space to use, e.g. 1.5TB")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--hardware", default=None,
                        help="profile: h100, t4, saved, or a JSON/TOML file (default: the saved profile, else "
                             "h100 with CUDA, else a quick calibration)")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--compress", action="store_true", help="allow 4-bit weight/cache compression")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    g = parser.add_argument_group("several GPUs (the memory flags are then per GPU and its share of the host)")
    g.add_argument("--tensor-parallel", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel", "-pp", type=int, default=1)
    g.add_argument("--num-micro-batches", type=int, default=None, help="default: the number of stages")
    g.add_argument("--link-bw", default=None, help="GPU-to-GPU bandwidth, e.g. 300GB (default: the profile's)")


def _size_arg(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        return float(parse_size(value))
    except PolicyError as e:
        raise PolicyError(f"{flag}: {e}") from None


def run_plan(args: argparse.Namespace) -> int:
    """Search the fastest policy and print it (text or `--json`)."""
    full = resolve_model_config(args.model)
    tp, pp = getattr(args, "tensor_parallel", 1), getattr(args, "pipeline_parallel", 1)
    config = full
    if tp > 1 or pp > 1:  # plan one rank's share: 1/tp of every layer, 1/pp of the layers
        from .parallel import rank_config

        config = rank_config(full, tp, pp)
    hw = resolve_hardware(args.hardware) or default_hardware(progress=not args.json)
    plan = search(config, hw, args.prompt_len, args.gen_len, DTYPE_BYTES[args.dtype],
                  gpu_mem=_size_arg(args.gpu_mem, "--gpu-mem"), cpu_mem=_size_arg(args.cpu_mem, "--cpu-mem"),
                  disk=_size_arg(args.disk, "--disk"), allow_compression=args.compress, dtype=args.dtype)
    par = None
    if tp > 1 or pp > 1:
        from .parallel import estimate_parallel

        par = estimate_parallel(full, plan.policy, hw, args.prompt_len, args.gen_len, tp, pp, args.num_micro_batches,
                                DTYPE_BYTES[args.dtype], args.dtype, _size_arg(args.link_bw, "--link-bw"))
    if args.json:
        out = plan_to_dict(plan, config, args)
        if par is not None:
            out["parallel"] = {"tp": tp, "pp": pp, "micro_batches": par.micro_batches,
                               "prefill_tok_s": par.prefill_tok_s, "decode_tok_s": par.decode_tok_s,
                               "total_tok_s": par.total_tok_s, "comm_decode_s": par.comm_decode_s,
                               "comm_prefill_s": par.comm_prefill_s, "comm_fraction": par.comm_fraction}
        print(json.dumps(out))
    else:
        print(format_plan(plan, config, args))
        if par is not None:
            print(f"{'parallel':<11}tp {tp} x pp {pp} ({par.micro_batches} micro-batches), per rank as above: "
                  f"prefill {par.prefill_tok_s:,.1f} tok/s, decode {par.decode_tok_s:,.2f} tok/s, total "
                  f"{par.total_tok_s:,.2f} tok/s; communication {format_seconds(par.comm_decode_s)} of each "
                  f"{format_seconds(par.decode_s_per_step)} decode step ({par.comm_fraction:.0%})")
    return 0


def plan_to_dict(plan: Plan, config: ModelConfig, args: argparse.Namespace) -> dict:
    e, hw, p = plan.estimate, plan.hardware, plan.policy
    return {
        "model": config.name, "hardware": hw.name, "dtype": args.dtype,
        "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "policy": dataclasses.asdict(p), "percent": list(p.percent), "flags": p.percent_flags(),
        "block_size": p.block_size,
        "prefill_tok_s": e.prefill_tok_s, "decode_tok_s": e.decode_tok_s, "total_tok_s": e.total_tok_s,
        "prefill_s": e.prefill_s, "decode_s_per_step": e.decode_s_per_step, "total_s": e.total_s,
        "peak_bytes": e.peak_bytes, "limits": hw.limits(),
        "bottleneck": e.bottleneck, "decode_bottleneck": e.decode_bottleneck,
        "prefill_bottleneck": e.prefill_bottleneck, "breakdown": e.breakdown,
        "search": {"shapes": plan.num_candidates, "solves": plan.num_solved, "seconds": plan.search_s},
        "placed": {"shares": list(placed_point(config, p)), "decode_tok_s": e.decode_tok_s,
                   "total_tok_s": e.total_tok_s, "peak_bytes": e.peak_bytes, "overflows": e.overflows(hw)},
    }


def _placed_line(plan: Plan, config: ModelConfig) -> str:
    """The realised shares of the plan's policy; its estimate is already the policy as placed (`search`)."""
    x = placed_point(config, plan.policy)
    e = plan.estimate
    over = e.overflows(plan.hardware)
    return (f"weights {x[0]:.0%} GPU / {x[1]:.0%} CPU / {1 - x[0] - x[1]:.0%} disk (whole tensors): decode "
            f"{e.decode_tok_s:,.2f} tok/s, total {e.total_tok_s:,.2f} tok/s; "
            + ("fits" if not over else "does NOT fit: " + "; ".join(over) + " (lower that tier's size and plan again)"))


def format_plan(plan: Plan, config: ModelConfig, args: argparse.Namespace) -> str:
    e, hw, p = plan.estimate, plan.hardware, plan.policy
    nbytes = config.num_params() * DTYPE_BYTES[args.dtype]
    mem = ", ".join(f"{t.upper()} {format_size(e.peak_bytes[t])} of {format_size(lim)}"
                    for t, lim in hw.limits().items())
    if hw.host_reserve:
        mem += f" (CPU: {hw.host_reserve:.0%} of {format_size(hw.cpu_mem)} left to the system)"
    rows = [
        ("model", f"{config.name or args.model} ({config.num_params() / 1e9:.1f}B params, {format_size(nbytes)} "
                  f"of {args.dtype} weights) on the '{hw.name}' profile"),
        ("workload", f"prompt {args.prompt_len} + {args.gen_len} generated tokens per sequence, block "
                     f"{p.gpu_batch_size}x{p.num_gpu_batches} = {p.block_size} sequences"),
        ("policy", describe_policy(p) + ("; CPU attention" if p.cpu_cache_compute else "")),
        ("flags", p.percent_flags()),
        ("predicted", f"prefill {e.prefill_tok_s:,.1f} tok/s, decode {e.decode_tok_s:,.2f} tok/s, "
                      f"total {e.total_tok_s:,.2f} tok/s ({format_seconds(e.prefill_s)} prefill, "
                      f"{format_seconds(e.decode_s_per_step)} per decode step)"),
        ("memory", mem),
        ("as placed", _placed_line(plan, config)),
        ("bottleneck", f"{e.decode_bottleneck} (decode), {e.prefill_bottleneck} (prefill); overall {e.bottleneck}"),
        ("search", f"{plan.num_candidates} block shapes, {plan.num_solved} LP/MILP solves, {plan.search_s:.2f} s"),
    ]
    return "\n".join(f"{k:<11}{v}" for k, v in rows)


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--output", default=None,
                        help="where to save the profile (default: ~/.cache/flexserve/hardware.json)")
    parser.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    parser.add_argument("--disk-dir", default=None, help="folder on the disk the offload tier will use")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure this machine, save the profile, and print what was measured."""
    from .calibrate import calibrate

    hw = calibrate(device=args.device, quick=args.quick, progress=not args.json and sys.stderr.isatty(),
                   disk_dir=args.disk_dir)
    path = save_hardware(hw, args.output)
    if args.json:
        print(json.dumps({**hw.to_dict(), "path": path}))
    else:
        print(format_hardware(hw))
        print(f"saved to {path}")
    return 0


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
        ("overhead", f"{hw.layer_overhead_s * 1e6:.0f} us per layer per batch"),
        ("notes", hw.notes),
    ]
    return "\n".join(f"{k:<11}{v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m flexserve.planner.cli plan|calibrate ...`) until the main CLI mounts these."""
    from ..errors import FlexServeError

    parser = argparse.ArgumentParser(prog="flexserve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_plan_arguments(sub.add_parser("plan", help="search the fastest offloading policy"))
    add_calibrate_arguments(sub.add_parser("calibrate", help="measure this machine into a hardware profile"))
    args = parser.parse_args(argv)
    try:
        return run_plan(args) if args.command == "plan" else run_calibrate(args)
    except FlexServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
