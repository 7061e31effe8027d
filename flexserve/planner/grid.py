"""Exhaustive search over a grid of placements with the planner's cost model: slow and coarse, kept to check
that the MILP of `search.py` never does worse."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import PolicyError
from .cost_model import TIERS, CostModel, build, evaluate
from .hardware import Hardware
from .linear import Linear
from .quant import quant_policy_fields
from .search import Plan, _candidates, _option_sets, weight_options


def grid_search(config: ModelConfig, hardware: Hardware, prompt_len: int, gen_len: int, dtype_bytes: int = 2,
                step: int = 10, gpu_batch_sizes: Sequence[int] = (1, 4, 16, 64),
                num_gpu_batches: Sequence[int] = (1, 2, 4), cpu_cache_compute: bool | None = None,
                allow_compression: bool = False, overlap: bool = True, weight_placement: str = "flexgen",
                quantization: str | None = None, kv_cache_dtype: str | None = None) -> Plan:
    """Exhaustive search over percentages in steps of `step` with the same cost model (vectorised with numpy).

    Slow and coarse; it exists to check that the MILP never does worse (`quantization` and `kv_cache_dtype`
    as `search` takes them).
    """
    quant = quant_policy_fields(quantization, None, kv_cache_dtype)
    if step < 1 or 100 % step:
        raise PolicyError(f"grid step must divide 100, got {step}")
    start = time.perf_counter()
    limits = hardware.limits()
    pairs = np.array([(g, c) for g in range(0, 101, step) for c in range(0, 101 - g, step)], dtype=float) / 100.0
    options = weight_options(config, weight_placement)  # weights: only the splits whole tensors allow
    w_pairs = np.array([(sg, sc) for sg, sc, _, _ in options])
    n, nw = len(pairs), len(w_pairs)
    grid = np.hstack([np.repeat(w_pairs, n * n, axis=0), np.tile(np.repeat(pairs, n, axis=0), (nw, 1)),
                      np.tile(pairs, (nw * n, 1))])  # every (weights, cache, activations) combination
    best: tuple[float, CostModel, np.ndarray] | None = None
    count = 0
    for pol in _candidates(gpu_batch_sizes, num_gpu_batches, _option_sets(cpu_cache_compute, allow_compression,
                                                                          quant), overlap, quant):
        model = build(config, pol.replace(weight_placement=weight_placement), hardware, prompt_len, gen_len,
                      dtype_bytes)
        count += 1
        ok = np.ones(len(grid), dtype=bool)
        for t in TIERS:
            ok &= _many_memory(model, t, grid) <= limits[t] * (1 + 1e-12)
        if not ok.any():
            continue
        times = _many_total_time(model, grid[ok])
        i = int(np.argmin(times))
        thr = pol.block_size * gen_len / times[i]
        if best is None or thr > best[0] * (1 + 1e-12):
            best = (thr, model, grid[ok][i])
    if best is None:
        raise PolicyError("no grid point fits the memory")
    _, model, x = best
    pct = [round(v * 100) for v in x]
    pct[0], pct[1] = next((gp, cp) for sg, sc, gp, cp in options if (sg, sc) == (x[0], x[1]))
    policy = model.policy.replace(**dict(zip(
        ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent", "act_gpu_percent",
         "act_cpu_percent"), pct)))
    est = evaluate(model, tuple(x))  # the grid point itself, to compare with the MILP's `lp_estimate`
    return Plan(policy, est, f"grid search, step {step}%", hardware, count, count, time.perf_counter() - start,
                est)


def _many(lins: list[Linear], grid: np.ndarray) -> np.ndarray:
    """Many affine terms at many points in one product: [points, terms]."""
    coef = np.array([lin.coef for lin in lins]).T
    return grid @ coef + np.array([lin.const for lin in lins])


def _many_total_time(model: CostModel, grid: np.ndarray) -> np.ndarray:
    stages = [s for s in model.stages if s.count > 0]
    terms = [s.bound_terms(model.policy.overlap) for s in stages]
    values = _many([t for ts in terms for t in ts], grid)
    out, col = np.zeros(len(grid)), 0
    for s, ts in zip(stages, terms):
        out += s.count * (values[:, col:col + len(ts)].max(axis=1) + s.overhead_s)
        col += len(ts)
    return out


def _many_memory(model: CostModel, tier: str, grid: np.ndarray) -> np.ndarray:
    mem = model.memory[tier]
    values = _many([mem.base, *(sw.when for sw in mem.switches)], grid)
    out = values[:, 0].copy()
    for j, sw in enumerate(mem.switches):
        out += np.where(values[:, j + 1] > 1e-9, sw.num_bytes, 0.0)
    return out
