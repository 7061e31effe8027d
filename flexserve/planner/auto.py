"""`--policy auto` on this machine: the profile to plan with (saved, built in, or measured once) and a searched
plan that the executor's own memory check accepts."""
from __future__ import annotations

import dataclasses
import math

from ..config import ModelConfig
from ..offload.policy import Policy
from .hardware import Hardware
from .quant_choice import AUTO, choose_quantization
from .search import Plan, search


def auto_plan(config: ModelConfig, prompt_len: int, gen_len: int, hardware: Hardware | str | None = None,
              gpu_mem: float | str | None = None, cpu_mem: float | str | None = None,
              disk: float | str | None = None, dtype_bytes: int = 2, device: str | None = None,
              progress: bool = False, rounds: int = 4, **search_kw) -> Plan:
    """`--policy auto`: the searched plan for this machine (see `default_hardware` for which profile), one the
    executor's own memory check (`offload.budget.tier_needs`) accepts on `device`.

    On a CPU device the GPU and CPU tiers are the same RAM: the profile is planned as one pool
    (`unified_memory`) no larger than the memory free now. When the executor's count still refuses the plan
    (its free memory moved since calibration), the short tier is lowered by the shortfall and the search runs
    again, a few rounds at most; then the executor's refusal is raised as it would be at load time.
    Sizes may be bytes or strings such as "16GiB"; `hardware` a profile, a built-in name or a file; other
    keywords go to `search` (block shapes, options, `quantization`). `quantization="auto"` plans with none and
    each scheme and keeps one by `quant_choice.choose_quantization`'s rule (the unquantized model when it fits
    within 5% of the fastest); the choice is printed on stderr when `progress`.
    """
    if search_kw.get("quantization") == AUTO:
        return _auto_quantized(config, prompt_len, gen_len, hardware, gpu_mem, cpu_mem, disk, dtype_bytes, device,
                               progress, rounds, **search_kw)
    import psutil
    import torch

    from ..offload.budget import check_fits, tier_needs
    from .hardware import parse_size, resolve_hardware

    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    hw = (resolve_hardware(hardware) or default_hardware(progress=progress)).with_memory(gpu_mem, cpu_mem, disk)
    if dev.type != "cuda":  # the compute device's memory is the host's: one pool, no more than is free now
        free = float(psutil.virtual_memory().available)
        hw = dataclasses.replace(hw, unified_memory=True, gpu_mem=min(hw.gpu_mem, free),
                                 cpu_mem=min(hw.cpu_mem, free))
    gpu_limit = parse_size(gpu_mem) if gpu_mem is not None else None
    cpu_limit = parse_size(cpu_mem) if cpu_mem is not None else None
    seq_len = prompt_len + gen_len
    for _ in range(rounds):
        plan = search(config, hw, prompt_len, gen_len, dtype_bytes, **search_kw)
        short = [t for t in tier_needs(config, plan.policy, dtype_bytes, seq_len, dev, gpu_limit, cpu_limit)
                 if t.shortfall]
        if not short:
            return plan
        lower = {}
        for t in short:  # one memory: both tiers' sizes move together
            tiers = ("gpu", "cpu") if hw.unified_memory else (t.tier.lower(),)
            for name in tiers:
                lower[name] = min(lower.get(name, math.inf), getattr(hw, f"{name}_mem") - 1.1 * t.shortfall)
        if any(v <= 0 for v in lower.values()):
            break
        hw = dataclasses.replace(hw, **{f"{k}_mem": v for k, v in lower.items()})
    check_fits(config, plan.policy, dtype_bytes, seq_len, dev, gpu_limit, cpu_limit)  # raises the executor's words
    return plan


def _auto_quantized(config: ModelConfig, prompt_len: int, gen_len: int, hardware, gpu_mem, cpu_mem, disk,
                    dtype_bytes: int, device: str | None, progress: bool, rounds: int, **search_kw) -> Plan:
    import sys

    from ..compression.names import GROUPED_SCHEMES

    from .hardware import resolve_hardware

    group = search_kw.pop("quant_group_size", None)
    hardware = resolve_hardware(hardware) or default_hardware(progress=progress)  # once, not per scheme

    def plan_for(scheme: str | None) -> Plan:
        return auto_plan(config, prompt_len, gen_len, hardware, gpu_mem, cpu_mem, disk, dtype_bytes, device,
                         False, rounds, **{**search_kw, "quantization": scheme,
                                           "quant_group_size": group if scheme in GROUPED_SCHEMES else None})

    choice = choose_quantization(plan_for)
    if progress:
        print(f"quantization auto: {choice.scheme or 'none'} ({choice.reason})", file=sys.stderr, flush=True)
    return choice.plan


def auto_policy(config: ModelConfig, prompt_len: int, gen_len: int, hardware: Hardware | str | None = None,
                gpu_mem: float | str | None = None, cpu_mem: float | str | None = None,
                disk: float | str | None = None, dtype_bytes: int = 2, device: str | None = None) -> Policy:
    """The policy of `auto_plan`."""
    return auto_plan(config, prompt_len, gen_len, hardware, gpu_mem, cpu_mem, disk, dtype_bytes, device).policy


def default_hardware(progress: bool = False, recalibrate: bool = False) -> Hardware:
    """The saved profile if there is one, else the built-in H100 profile on a CUDA machine, else a quick
    calibration of this (CPU) machine, which takes a few seconds and is saved for the next call (a line on
    stderr says so when `progress`). `recalibrate` measures again even when a profile is saved. Without CUDA
    the profile is planned with one memory pool (`unified_memory`), whatever the saved file says."""
    import os
    import sys
    import tempfile

    import torch

    from .hardware import default_profile_path, load_hardware, profile, save_hardware

    cuda = torch.cuda.is_available()
    if os.path.isfile(default_profile_path()) and not recalibrate:
        hw = load_hardware()
        return hw if cuda else dataclasses.replace(hw, unified_memory=True)

    from .calibrate import _sizes, calibrate

    if cuda and not recalibrate:  # the H100 rates, this machine's sizes
        return profile("h100").with_memory(**_sizes(torch.device("cuda"), tempfile.gettempdir()))
    if progress:
        print(f"calibrating this machine once (a few seconds), saved to {default_profile_path()} for later "
              "plans (`--recalibrate` measures again)", file=sys.stderr)
    hw = calibrate(quick=True, progress=False)
    save_hardware(hw)
    return hw
