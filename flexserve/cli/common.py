"""Flag groups that several verbs share (the model, FlexGen's placement flags) and what they turn into."""
from __future__ import annotations

import argparse
import sys

from ..config import ModelConfig
from ..errors import PolicyError
from ..compression.names import DEFAULT_GROUP_SIZE, KV_CACHE_DTYPES, SCHEMES
from ..offload.policy import EXPERT_RULES, QUANT_FIELDS, WEIGHT_PLACEMENTS, Policy


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder, .gguf file or dummy:PRESET (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement policy (FlexGen's flags)")
    g.add_argument("--percent", nargs=6, type=float, metavar=("W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"),
                   help="percent of weights, KV cache, activations on GPU and CPU; the rest goes to disk")
    g.add_argument("--policy", choices=["auto"], help="auto: let the planner pick the policy")
    g.add_argument("--gpu-batch-size", type=int, default=None)
    g.add_argument("--num-gpu-batches", type=int, default=1)
    g.add_argument("--cpu-cache-compute", action="store_true", help="attention on the CPU where the cache is")
    g.add_argument("--cpu-attention-dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="dtype of the host cache that CPU attention reads (default: the model's)")
    g.add_argument("--weight-placement", choices=WEIGHT_PLACEMENTS, default=None,
                   help="how whole tensors meet the weight percentages: FlexGen's rule (default) or flexserve's "
                        "earlier largest-first rule (to reproduce runs made with it)")
    g.add_argument("--expert-compute", choices=EXPERT_RULES, default=None,
                   help="mixtures of experts: an expert off the GPU is copied in or computed on the CPU by a cost "
                        "rule (auto, default), always copied, or always computed on the CPU")
    g.add_argument("--no-overlap", action="store_true", help="run loads, stores and compute in sequence")
    g.add_argument("--compress-weight", action="store_true", help="4-bit group-wise weight compression")
    g.add_argument("--compress-cache", action="store_true", help="4-bit group-wise KV cache compression")
    g.add_argument("--offload-dir", default=None, help="folder for the disk tier")
    g.add_argument("--gpu-mem", default=None, help="memory cap for --policy auto, e.g. 16GiB")
    g.add_argument("--cpu-mem", default=None)
    g.add_argument("--disk", default=None)
    add_quant_arguments(p)


def add_quant_arguments(p: argparse.ArgumentParser, auto: bool = False) -> None:
    """`--quantization`, `--quant-group-size`, `--kv-cache-dtype`: the `Policy` fields of the same names.
    `auto` adds `--quantization auto` (the planner tries each scheme: `flexserve plan`)."""
    g = p.add_argument_group("quantization")
    g.add_argument("--quantization", choices=(*SCHEMES, "auto") if auto else SCHEMES, default=None,
                   help="quantise the decoder projections: fp8 (e4m3 weights and per-token activations), int8 "
                        "(W8A8 with SmoothQuant), rtn4 (4-bit groups, round to nearest), awq (4-bit groups with "
                        "AWQ's activation-aware scales); int8 and awq calibrate on a shipped text at load"
                        + ("; auto: plan with none and each scheme and keep the fastest that fits, the "
                           "unquantized model (or the better-quality scheme) when within 5%% of it" if auto else ""))
    g.add_argument("--quant-group-size", type=int, default=None,
                   help=f"input channels per 4-bit group for rtn4 and awq (default {DEFAULT_GROUP_SIZE})")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="storage of the KV cache: auto (the model's dtype) or fp8 (e4m3, upcast on read)")


def quant_fields(args: argparse.Namespace) -> dict:
    """The `Policy` fields the quantization flags set (flags left out keep the field's default)."""
    return {n: getattr(args, n) for n in QUANT_FIELDS if getattr(args, n, None) is not None}


def policy_from_args(args: argparse.Namespace, config: ModelConfig | None = None, prompt_len: int = 512,
                     gen_len: int = 32) -> Policy | None:
    """The `Policy` the flags describe, or None (fully resident, automatic batch) when none were given.
    `--policy auto` asks the planner for one, which needs the model's `config`."""
    quant = quant_fields(args)
    if getattr(args, "policy", None) == "auto":  # the planner counts the scheme's bytes and costs
        return auto_plan_from_args(args, config, prompt_len, gen_len).policy
    placement_flags = (*quant.values(), args.percent, args.gpu_batch_size, args.cpu_cache_compute or None,
                       args.no_overlap or None, args.compress_weight or None, args.compress_cache or None,
                       args.num_gpu_batches if args.num_gpu_batches != 1 else None, args.cpu_attention_dtype,
                       args.weight_placement, args.expert_compute)
    if all(f is None for f in placement_flags):
        return None
    kw = dict(gpu_batch_size=args.gpu_batch_size or 1, num_gpu_batches=args.num_gpu_batches,
              overlap=not args.no_overlap, cpu_cache_compute=args.cpu_cache_compute,
              compress_weight=args.compress_weight, compress_cache=args.compress_cache,
              cpu_attention_dtype=args.cpu_attention_dtype, weight_placement=args.weight_placement or "flexgen",
              expert_compute=args.expert_compute or "auto", **quant)
    return Policy.from_percent(args.percent or (100, 0, 100, 0, 100, 0), **kw)


def auto_plan_from_args(args: argparse.Namespace, config: ModelConfig, prompt_len: int = 512, gen_len: int = 32):
    """`--policy auto`: the planner's plan for the model on the device and dtype the run will use, under the
    memory flags; its policy and predicted throughput are printed on one stderr line before anything runs."""
    from ..models.loading import resolve_device, resolve_dtype
    from ..planner import auto_plan

    if args.percent is not None:
        raise PolicyError("give either --policy auto or --percent, not both")
    if config is None:
        raise PolicyError("--policy auto needs the model's config")
    device = resolve_device(getattr(args, "device", None))
    dtype = resolve_dtype(getattr(args, "dtype", None) or "auto", device, config.family)
    dtype_bytes = dtype.itemsize
    plan = auto_plan(config, prompt_len, gen_len, gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem, disk=args.disk,
                     dtype_bytes=dtype_bytes, device=str(device), progress=True, **quant_fields(args))
    print(format_auto_line(plan, prompt_len, gen_len), file=sys.stderr, flush=True)
    return plan


def format_auto_line(plan, prompt_len: int, gen_len: int) -> str:
    """One line: the chosen policy as flags (the batch shape among them) and what the planner predicts."""
    e, p = plan.estimate, plan.policy
    return (f"policy auto: {p.percent_flags()} (block {p.block_size} sequences, prompt {prompt_len} + "
            f"{gen_len} tokens): predicted {e.total_tok_s:,.2f} tok/s total, {e.decode_tok_s:,.2f} tok/s decode, "
            f"bound by {e.bottleneck}, on the '{plan.hardware.name}' profile")


def serving_plan_from_args(args: argparse.Namespace, fields: dict) -> dict:
    """`serve --policy auto`: the weight placement, KV pool and seats for the model under the memory flags, as
    `EngineConfig` fields (an explicit `--num-gpu-blocks` and the like in `fields` wins); printed on one stderr
    line before the server starts."""
    import dataclasses

    from ..models.loading import model_config, resolve_device, resolve_dtype
    from ..planner import default_hardware
    from ..planner.serving import serving_plan

    if args.percent is not None:
        raise PolicyError("give either --policy auto or --percent, not both")
    config = model_config(args.model)
    device = resolve_device(getattr(args, "device", None))
    dtype = resolve_dtype(getattr(args, "dtype", None) or "auto", device, config.family)
    hw = default_hardware(progress=True).with_memory(args.gpu_mem, args.cpu_mem, args.disk)
    if device.type != "cuda":  # the compute device's memory is the host's
        hw = dataclasses.replace(hw, unified_memory=True)
    plan = serving_plan(config, hw, dtype.itemsize, str(dtype).removeprefix("torch."),
                        block_size=fields.get("block_size", 16),
                        max_num_batched_tokens=fields.get("max_num_batched_tokens") or 2048,
                        allow_disk=bool(getattr(args, "offload_dir", None)), quant=quant_fields(args))
    print(f"policy auto (serving): {plan.summary()}", file=sys.stderr, flush=True)
    chosen = dict(policy=plan.policy.replace(weight_placement=args.weight_placement or "flexgen"),
                  num_gpu_blocks=plan.num_gpu_blocks, num_cpu_blocks=plan.num_cpu_blocks,
                  max_num_seqs=plan.max_num_seqs)
    return {k: v for k, v in chosen.items() if fields.get(k) is None}


def policy_for_model(args: argparse.Namespace, model: str | None, prompt_len: int = 512,
                     gen_len: int = 32) -> Policy | None:
    """`policy_from_args`, reading the model's config only when `--policy auto` needs it."""
    from ..models.loading import model_config

    config = model_config(model) if getattr(args, "policy", None) == "auto" else None
    return policy_from_args(args, config, prompt_len, gen_len)
