"""`flexserve plan` (the fastest policy for a model and a memory budget) and `flexserve calibrate` (measure
this machine into a hardware profile)."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import PolicyError
from .common import add_quant_arguments

PLAN_DTYPES = ("bfloat16", "float16", "float32")  # the planner's (planner.shapes.DTYPE_BYTES); named here so
# that building the parser (and `--help`) does not import the planner, and with it torch


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
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure this machine again (and save it) instead of reading the saved profile")
    parser.add_argument("--dtype", default="float16", choices=PLAN_DTYPES)
    parser.add_argument("--compress", action="store_true", help="allow 4-bit weight/cache compression")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_quant_arguments(parser, auto=True)
    g = parser.add_argument_group("several GPUs (the memory flags are then per GPU and its share of the host)")
    g.add_argument("--tensor-parallel", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel", "-pp", type=int, default=1)
    g.add_argument("--num-micro-batches", type=int, default=None, help="default: the number of stages")
    g.add_argument("--link-bw", default=None, help="GPU-to-GPU bandwidth, e.g. 300GB (default: the profile's)")


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--output", default=None,
                        help="where to save the profile (default: ~/.cache/flexserve/hardware.json)")
    parser.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    parser.add_argument("--disk-dir", default=None, help="folder on the disk the offload tier will use")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")


def register(sub: argparse._SubParsersAction) -> None:
    """Mount `plan` and `calibrate` on the main parser."""
    pl = sub.add_parser("plan", help="pick the fastest policy for a model and a memory budget")
    add_plan_arguments(pl)
    pl.set_defaults(func=run_plan)
    c = sub.add_parser("calibrate", help="measure this machine and save a hardware profile")
    add_calibrate_arguments(c)
    c.set_defaults(func=run_calibrate)


def _size_arg(value: str | None, flag: str) -> float | None:
    """A size flag in bytes; a malformed one is an error that names the flag."""
    from ..planner.hardware import parse_size

    if value is None:
        return None
    try:
        return float(parse_size(value))
    except PolicyError as e:
        raise PolicyError(f"{flag}: {e}") from None


def run_plan(args: argparse.Namespace) -> int:
    """Search the fastest policy and print it (text or `--json`)."""
    from ..compression.names import DEFAULT_GROUP_SIZE, GROUPED_SCHEMES
    from ..planner.hardware import resolve_hardware
    from ..planner.parallel import estimate_parallel, rank_config
    from ..planner.quant_choice import choose_quantization
    from ..planner.report import (Workload, format_parallel, format_plan, format_quant_choice, parallel_to_dict,
                                  plan_to_dict, quant_choice_to_dict)
    from ..planner.auto import default_hardware
    from ..planner.search import search
    from ..planner.shapes import resolve_model_config

    full = resolve_model_config(args.model)
    tp, pp = args.tensor_parallel, args.pipeline_parallel
    grid = tp > 1 or pp > 1
    config = rank_config(full, tp, pp) if grid else full  # one rank's share: 1/tp of every layer, 1/pp of them
    if args.recalibrate and args.hardware is not None:
        raise PolicyError("give either --hardware or --recalibrate (which measures this machine), not both")
    hw = resolve_hardware(args.hardware) or default_hardware(progress=True, recalibrate=args.recalibrate)
    from ..planner.shapes import DTYPE_BYTES

    dtype_bytes = DTYPE_BYTES[args.dtype]
    caps = dict(gpu_mem=_size_arg(args.gpu_mem, "--gpu-mem"), cpu_mem=_size_arg(args.cpu_mem, "--cpu-mem"),
                disk=_size_arg(args.disk, "--disk"))
    auto = args.quantization == "auto"

    def plan_for(scheme: str | None):
        # with `auto` the group size is for the 4-bit schemes only; given with another scheme, Policy refuses it
        group = args.quant_group_size if not auto or scheme in GROUPED_SCHEMES else None
        return search(config, hw, args.prompt_len, args.gen_len, dtype_bytes, **caps,
                      allow_compression=args.compress, dtype=args.dtype, quantization=scheme,
                      quant_group_size=group, kv_cache_dtype=args.kv_cache_dtype)

    choice = None
    if auto:
        if args.compress:
            raise PolicyError("--quantization auto chooses the weights' scheme; --compress (FlexGen's 4-bit "
                              "compression) is another: give one of them")
        choice = choose_quantization(plan_for)
        plan = choice.plan
    else:
        plan = plan_for(args.quantization)
    par = None
    if grid:
        par = estimate_parallel(full, plan.policy, hw, args.prompt_len, args.gen_len, tp, pp, args.num_micro_batches,
                                dtype_bytes, args.dtype, _size_arg(args.link_bw, "--link-bw"))
    work = Workload(args.model, args.dtype, args.prompt_len, args.gen_len)
    group = args.quant_group_size or DEFAULT_GROUP_SIZE
    if args.json:
        out = plan_to_dict(plan, config, work)
        if par is not None:
            out["parallel"] = parallel_to_dict(par)
        if choice is not None:
            out["quantization_choice"] = quant_choice_to_dict(choice, config, args.dtype, group)
        print(json.dumps(out))
    else:
        print(format_plan(plan, config, work))
        if par is not None:
            print(format_parallel(par))
        if choice is not None:
            print(format_quant_choice(choice, config, args.dtype, group))
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure this machine, save the profile, and print what was measured."""
    from ..planner.calibrate import calibrate
    from ..planner.hardware import save_hardware
    from ..planner.report import format_hardware

    hw = calibrate(device=args.device, quick=args.quick, progress=not args.json and sys.stderr.isatty(),
                   disk_dir=args.disk_dir)
    path = save_hardware(hw, args.output)
    if args.json:
        print(json.dumps({**hw.to_dict(), "path": path}))
    else:
        print(format_hardware(hw))
        print(f"saved to {path}")
    return 0
