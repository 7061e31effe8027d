"""Planner: hardware profiles and calibration, the cost model of the zig-zag schedule, and the policy search.

    hw = profile("t4")                                   # or calibrate(), load_hardware(path)
    est = estimate(preset("opt-30b"), policy, hw, prompt_len=512, gen_len=32)
    plan = search(preset("opt-175b"), hw, 512, 32)       # plan.policy, plan.estimate, plan.explanation

`auto_policy` is what `--policy auto` calls; `report` formats what `flexserve plan` and `flexserve calibrate`
print.
"""
from .cost_model import CostModel, Estimate, build, compare, estimate, evaluate
from .hardware import (Hardware, default_profile_path, format_size, load_hardware, parse_size, profile,
                       resolve_hardware, save_hardware)
from .auto import auto_plan, auto_policy, default_hardware
from .grid import grid_search
from .search import Plan, describe_policy, search, weight_options


def calibrate(device=None, quick: bool = False, progress: bool = True, disk_dir: str | None = None) -> Hardware:
    """Measure this machine (see `flexserve.planner.calibrate.calibrate`); imported lazily since it needs torch."""
    from .calibrate import calibrate as _calibrate

    return _calibrate(device=device, quick=quick, progress=progress, disk_dir=disk_dir)


__all__ = [
    "Hardware", "profile", "parse_size", "format_size", "load_hardware", "save_hardware", "resolve_hardware",
    "default_profile_path", "calibrate", "CostModel", "Estimate", "build", "estimate", "evaluate", "compare",
    "Plan", "search", "weight_options", "grid_search", "auto_plan", "auto_policy", "default_hardware",
    "describe_policy",
]
