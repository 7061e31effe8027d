"""Policy search: the fastest placement and block shape for a model, a workload and a hardware budget.

For every candidate block shape (gpu_batch_size × num_gpu_batches) and option set (CPU attention, compression)
the cost model is affine in the six placement percentages, so the best placement is a small mixed-integer
linear program: integer percentages, one time variable per pseudo-layer stage that must exceed each resource's
time (overlap makes a stage's time their maximum), binaries for staging buffers that exist whole or not at all,
and one row per memory tier. HiGHS (`scipy.optimize.milp`) solves each in milliseconds; shapes whose throughput
bound cannot beat the best found so far are skipped unsolved. The winner is solved once more to break ties
towards faster tiers (GPU before CPU before disk), so equal-time placements come out the same every time.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..config import ModelConfig
from ..errors import PolicyError
from ..memory.tiers import Tier
from ..offload.placement import expert_shares, tier_shares
from ..offload.policy import Policy
from .cost_model import TIERS, CostModel, Estimate, build, evaluate, placed_point
from .hardware import Hardware, format_size
from .linear import NUM_VARS, minimum, point
from .quant import quant_policy_fields
from .sizes import model_sizes

GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NUM_GPU_BATCHES = tuple(range(1, 17))
_TIE_BREAK = np.array([-2.0, -1.0] * 3)  # per percent on GPU / CPU (disk is the rest): prefer faster tiers
_MEM_SCALE = 1e-9  # memory rows in GB keep HiGHS's coefficients within a few orders of magnitude


@dataclass(frozen=True)
class Plan:
    """The chosen policy, its predicted performance, and a few lines on why."""

    policy: Policy
    estimate: Estimate
    explanation: str
    hardware: Hardware
    num_candidates: int = 0
    num_solved: int = 0
    search_s: float = 0.0
    lp_estimate: Estimate | None = None  # at the solver's own point (cache and activations as continuous shares)


@dataclass(frozen=True)
class _Options:
    cpu_cache_compute: bool
    compress_weight: bool
    compress_cache: bool


def _option_sets(cpu_cache_compute: bool | None, allow_compression: bool,
                 quant: dict | None = None) -> list[_Options]:
    ccc = (False, True) if cpu_cache_compute is None else (bool(cpu_cache_compute),)
    comp = (False, True) if allow_compression else (False,)
    q = quant or {}  # a weight scheme replaces FlexGen's weight compression, an fp8 cache its cache compression
    # FlexGen's CPU attention reads an uncompressed cache, so the two are never combined
    return [_Options(c, w, k) for c, w, k in itertools.product(ccc, comp, comp) if not (c and k)
            and not (w and q.get("quantization")) and not (k and q.get("kv_cache_dtype") == "fp8")]


def _candidates(gpu_batch_sizes: Iterable[int], num_gpu_batches: Iterable[int], options: list[_Options],
                overlap: bool, quant: dict | None = None) -> list[Policy]:
    return [Policy(gpu_batch_size=g, num_gpu_batches=n, w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0,
                   cache_cpu_percent=0, act_gpu_percent=0, act_cpu_percent=0, overlap=overlap,
                   cpu_cache_compute=o.cpu_cache_compute, compress_weight=o.compress_weight,
                   compress_cache=o.compress_cache, **(quant or {}))
            for g in gpu_batch_sizes for n in num_gpu_batches for o in options]


def _time_lower_bound(model: CostModel) -> float:
    out = 0.0
    for s in model.stages:
        if s.count > 0:
            out += s.count * (max(minimum(t) for t in s.bound_terms(model.policy.overlap)) + s.overhead_s)
    return out


class _Milp:
    """The MILP of one cost model: z = [6 integer percentages, one time per stage, one binary per switch]."""

    def __init__(self, model: CostModel, limits: dict[str, float], options: Sequence[WeightOption] = (),
                 pool: float | None = None):
        self.model = model
        self.options = tuple(options)
        stages = [s for s in model.stages if s.count > 0]
        switches = [(t, sw) for t in TIERS for sw in model.memory[t].switches]
        nt, ny, nk = len(stages), len(switches), len(self.options)
        self.n = NUM_VARS + nt + ny + nk
        self._first_option = NUM_VARS + nt + ny
        rows, lo, hi = [], [], []

        def add(row: np.ndarray, upper: float, lower: float = -np.inf) -> None:
            rows.append(row), lo.append(lower), hi.append(upper)

        for i, s in enumerate(stages):
            for term in s.bound_terms(model.policy.overlap):
                row = np.zeros(self.n)
                row[:NUM_VARS] = np.array(term.coef) / 100.0
                row[NUM_VARS + i] = -1.0
                add(row, -term.const)
        for k in range(3):  # gpu + cpu <= 100 for weights, cache, activations
            row = np.zeros(self.n)
            row[2 * k] = row[2 * k + 1] = 1.0
            add(row, 100.0)
        for tier in TIERS:
            mem = model.memory[tier]
            row = np.zeros(self.n)
            row[:NUM_VARS] = np.array(mem.base.coef) / 100.0 * _MEM_SCALE
            for j, (t, sw) in enumerate(switches):
                if t == tier:
                    row[NUM_VARS + nt + j] = sw.num_bytes * _MEM_SCALE
            add(row, (limits[tier] - mem.base.const) * _MEM_SCALE)
        if pool is not None:  # one memory holds the GPU and CPU tiers: their bytes together fit it once
            row = np.zeros(self.n)
            const = 0.0
            for tier in ("gpu", "cpu"):
                mem = model.memory[tier]
                row[:NUM_VARS] += np.array(mem.base.coef) / 100.0 * _MEM_SCALE
                const += mem.base.const
            for j, (t, sw) in enumerate(switches):
                if t in ("gpu", "cpu"):
                    row[NUM_VARS + nt + j] = sw.num_bytes * _MEM_SCALE
            add(row, (pool - const) * _MEM_SCALE)
        for j, (_, sw) in enumerate(switches):  # when(x) <= y: the buffer exists as soon as any share needs it
            row = np.zeros(self.n)
            row[:NUM_VARS] = np.array(sw.when.coef) / 100.0
            row[NUM_VARS + nt + j] = -1.0
            add(row, -sw.when.const)
        if nk:  # the weights take one of the placements whole tensors allow: w = sum_k y_k * share_k
            for var in (0, 1):
                row = np.zeros(self.n)
                row[var] = 1.0
                row[self._first_option:] = [-100.0 * opt[var] for opt in self.options]
                add(row, 0.0, 0.0)
            row = np.zeros(self.n)
            row[self._first_option:] = 1.0
            add(row, 1.0, 1.0)
        self.a, self.lo, self.hi = np.array(rows), np.array(lo), np.array(hi)
        self.time_cost = np.zeros(self.n)
        self.time_cost[NUM_VARS:NUM_VARS + nt] = [s.count for s in stages]
        self.const_time = sum(s.count * s.overhead_s for s in stages)
        weights_integral = 0 if nk else 1  # with options the weight shares follow the binaries
        self.integrality = np.array([weights_integral] * 2 + [1] * (NUM_VARS - 2) + [0] * nt + [1] * ny + [1] * nk)
        upper = np.array([100.0] * NUM_VARS + [np.inf] * nt + [1.0] * ny + [1.0] * nk)
        self.bounds = Bounds(np.zeros(self.n), upper)

    def solve(self, tie_break_within: float | None = None,
              relaxed: bool = False) -> tuple[float, tuple[float, ...], tuple[float, ...]] | None:
        """Minimum total time, its placement (fractions) and the policy's six percentages, or None when nothing
        fits. With weight options the weight shares are the chosen option's exact shares and the percentages
        the ones that make the executor place it.

        `relaxed` drops integrality (a lower bound on the time, five times cheaper; no percentages);
        `tie_break_within` returns the fastest-tier placement among those no slower than that time.
        """
        a, lo, hi, cost = self.a, self.lo, self.hi, self.time_cost
        if tie_break_within is not None:
            a = np.vstack([a, self.time_cost])
            lo = np.append(lo, -np.inf)
            hi = np.append(hi, tie_break_within - self.const_time)
            cost = np.zeros(self.n)
            cost[:NUM_VARS] = _TIE_BREAK
        res = milp(cost, constraints=LinearConstraint(a, lo, hi),
                   integrality=np.zeros(self.n) if relaxed else self.integrality, bounds=self.bounds,
                   options={"disp": False, "mip_rel_gap": 1e-9, "presolve": True})
        if res.x is None or not res.success:
            return None
        if relaxed:
            return float(res.fun) + self.const_time, tuple(res.x[:NUM_VARS] / 100.0), ()
        pct = [float(v) for v in np.round(res.x[:NUM_VARS]).clip(0, 100)]
        x = point(*pct)
        if self.options:
            share_gpu, share_cpu, pct[0], pct[1] = self.options[int(np.argmax(res.x[self._first_option:]))]
            x = (share_gpu, share_cpu, *x[2:])
        return self.model.total_time(x), x, tuple(pct)


def _search_once(config: ModelConfig, hardware: Hardware, prompt_len: int, gen_len: int, dtype_bytes: int = 2,
                 gpu_mem: float | str | None = None, cpu_mem: float | str | None = None,
                 disk: float | str | None = None, allow_compression: bool = False,
                 cpu_cache_compute: bool | None = None, overlap: bool = True,
                 gpu_batch_sizes: Sequence[int] = GPU_BATCH_SIZES, num_gpu_batches: Sequence[int] = NUM_GPU_BATCHES,
                 dtype: str | None = None, weight_placement: str = "flexgen", quantization: str | None = None,
                 quant_group_size: int | None = None, kv_cache_dtype: str | None = None) -> Plan:
    """The policy of highest total throughput (generated tokens/s over prefill + decode) that fits the memory.

    `gpu_mem`/`cpu_mem`/`disk` cap the hardware's sizes (bytes or "16GiB"); `cpu_cache_compute=None` tries
    both; compression is tried only when allowed, as it changes the numbers the model computes; the
    quantization settings are the `Policy` fields of those names, fixed for every candidate. Raises
    `PolicyError` with the reason when nothing fits.
    """
    start = time.perf_counter()
    quant = quant_policy_fields(quantization, quant_group_size, kv_cache_dtype)
    hw = hardware.with_memory(gpu_mem, cpu_mem, disk)
    limits, pool = hw.limits(), hw.pool_limit()
    _check_basic_feasibility(config, hw, prompt_len, gen_len, dtype_bytes, allow_compression, quant)
    models = []
    for pol in _candidates(gpu_batch_sizes, num_gpu_batches, _option_sets(cpu_cache_compute, allow_compression,
                                                                          quant), overlap, quant):
        model = build(config, pol.replace(weight_placement=weight_placement), hw, prompt_len, gen_len, dtype_bytes,
                      dtype)
        if any(model.memory[t].minimum() > limits[t] for t in TIERS) or (
                pool is not None and model.memory["gpu"].minimum() + model.memory["cpu"].minimum() > pool):
            continue  # even the cheapest placement overflows a tier (usually the GPU's fixed working set)
        work = pol.block_size * gen_len
        models.append((work / _time_lower_bound(model), model))
    # best bound first, so that the first solutions prune the rest; ties in a fixed order (determinism)
    models.sort(key=lambda m: (-m[0], m[1].policy.gpu_batch_size, m[1].policy.num_gpu_batches,
                               m[1].policy.cpu_cache_compute, m[1].policy.compress_weight,
                               m[1].policy.compress_cache))
    best: tuple[float, _Milp, float] | None = None  # (throughput, milp, total time)
    solved = 0
    options = weight_options(config, weight_placement)
    for bound, model in models:
        if best is not None and bound <= best[0] * (1 + 1e-9):
            break  # sorted by bound: no later shape can win either
        problem = _Milp(model, limits, options, pool)
        relaxed = problem.solve(relaxed=True)  # a tighter bound that knows the memory limits
        solved += 1
        if relaxed is None:
            continue
        work = model.block_size * gen_len
        if best is not None and work / relaxed[0] <= best[0] * (1 + 1e-9):
            continue
        out = problem.solve()
        solved += 1
        if out is not None and (best is None or work / out[0] > best[0] * (1 + 1e-9)):
            best = (work / out[0], problem, out[0])
    if best is None:
        raise PolicyError(_explain_infeasible(config, hw, prompt_len, gen_len, dtype_bytes, allow_compression,
                                              len(models), quant))
    _, problem, t_best = best
    tied = problem.solve(tie_break_within=t_best * (1 + 1e-7))
    _, x, pct = tied if tied is not None else problem.solve()
    policy = problem.model.policy.replace(**dict(zip(
        ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent", "act_gpu_percent",
         "act_cpu_percent"), (round(v) for v in pct))))
    placed = evaluate(problem.model, placed_point(config, policy))
    elapsed = time.perf_counter() - start
    return Plan(policy, placed, _explain(config, policy, placed, hw, len(models), solved, elapsed), hw, len(models),
                solved, elapsed, evaluate(problem.model, x))


# A mixture of 128 experts splits in thousands of ways; the search keeps those of whole percents in this step,
# which holds its MILP to a few hundred options and the plan within a few percent of the best split.
MOE_PERCENT_STEP = 4
WeightOption = tuple  # (GPU share, CPU share, w_gpu_percent, w_cpu_percent): a placement whole tensors allow


def weight_options(config: ModelConfig, rule: str = "flexgen") -> tuple[WeightOption, ...]:
    """Every split of a decoder layer's weights over the tiers that `rule` can make from whole tensors, each
    with the percentages (closest to its shares) that produce it."""
    sizes = tuple(sorted(config.layer_weight_sizes().items()))
    if config.is_moe and rule == "flexgen":  # the executor places experts whole (offload.experts)
        rule = "experts"
    return _weight_options(sizes, rule)


@functools.lru_cache(maxsize=64)
def _weight_options(sizes: tuple[tuple[str, int], ...], rule: str) -> tuple[WeightOption, ...]:
    layer = dict(sizes)
    found: dict[tuple[float, float], tuple[float, int, int]] = {}
    step = MOE_PERCENT_STEP if rule == "experts" else 1
    for g in range(0, 101, step):
        for c in range(0, 101 - g, step):
            shares = (expert_shares(layer, g, c) if rule == "experts" else tier_shares(layer, g, c, rule))
            key = (shares[Tier.GPU], shares[Tier.CPU])
            miss = abs(g - 100 * key[0]) + abs(c - 100 * key[1])
            if key not in found or miss < found[key][0]:
                found[key] = (miss, g, c)
    return tuple((sg, sc, g, c) for (sg, sc), (_, g, c) in sorted(found.items()))


def search(config: ModelConfig, hardware: Hardware, prompt_len: int, gen_len: int, dtype_bytes: int = 2,
           gpu_mem: float | str | None = None, cpu_mem: float | str | None = None, disk: float | str | None = None,
           rounds: int = 6, **kw) -> Plan:
    """The policy of highest total throughput (generated tokens/s over prefill + decode) that fits the memory
    as the executor places it.

    `gpu_mem`/`cpu_mem`/`disk` cap the hardware's sizes (bytes or "16GiB"); `cpu_cache_compute=None` tries
    both; compression is tried only when allowed, as it changes the numbers the model computes. The MILP
    chooses the weights among the splits whole tensors allow (`weight_options`); the cache and activations,
    placed by (layer, GPU batch) and by GPU batch, can still overflow a tier by a little once rounded: then
    the search runs again with that tier's size lowered by the overflow, a few rounds at most. The plan's
    `estimate` is the policy as placed, `lp_estimate` the MILP's own point. Raises `PolicyError` with the
    reason when nothing fits.
    """
    hw = hardware.with_memory(gpu_mem, cpu_mem, disk)
    limits = hw.limits()
    sizes = {"gpu": hw.gpu_mem, "cpu": hw.cpu_mem, "disk": hw.disk}
    caps = dict(sizes)  # sizes, not limits: each round's search applies the host reserve itself
    over: dict[str, float] = {}
    for r in range(rounds):
        plan = _search_once(config, hw, prompt_len, gen_len, dtype_bytes, caps["gpu"], caps["cpu"], caps["disk"],
                            **kw)
        peaks = plan.estimate.peak_bytes
        over = {t: peaks[t] - limits[t] for t in TIERS if peaks[t] > limits[t] * (1 + 1e-9)}
        pool = hw.pool_limit()
        if pool is not None and peaks["gpu"] + peaks["cpu"] > pool * (1 + 1e-9):
            over.pop("gpu", None)  # one memory: lowering it lowers both tiers' cap
            over["cpu"] = max(over.get("cpu", 0.0), peaks["gpu"] + peaks["cpu"] - pool)
        if not over:
            return dataclasses.replace(plan, hardware=hw)
        if pool is not None:  # the pool is the smaller cap; lower both together so the pool moves
            caps["gpu"] = caps["cpu"] = min(caps["gpu"], caps["cpu"])
        for tier, excess in over.items():  # room for the rounding to land on either side next time, doubling
            # each round: a share placed per GPU batch moves in whole batches, far beyond the first excess
            scale = sizes[tier] / limits[tier] if limits[tier] else 1.0  # a limit's bytes in the tier's size
            caps[tier] -= max(2 * excess, 0.002 * limits[tier]) * scale * 2 ** r
            if pool is not None and tier in ("gpu", "cpu"):
                caps["gpu"] = caps["cpu"] = caps[tier]
    raise PolicyError(f"no policy fits as placed after {rounds} rounds: whole tensors overflow "
                      + ", ".join(f"{t} by {format_size(e)}" for t, e in over.items()))


def _check_basic_feasibility(config: ModelConfig, hw: Hardware, prompt_len: int, gen_len: int, dtype_bytes: int,
                             allow_compression: bool, quant: dict) -> None:
    """Reasons that rule out every shape, worded for people, before any solving."""
    if prompt_len < 1 or gen_len < 1:
        raise PolicyError(f"prompt_len and gen_len must be >= 1, got {prompt_len} and {gen_len}")
    if hw.gpu_mem <= 0:
        raise PolicyError("the GPU (compute device) memory is 0: it must hold at least the staging buffers of "
                          "one layer and the working set of one batch")
    probe = Policy(compress_weight=allow_compression and not quant["quantization"],
                   compress_cache=allow_compression and quant["kv_cache_dtype"] != "fp8", **quant)
    sz = model_sizes(config, probe, dtype_bytes)
    seq = prompt_len + gen_len
    cache_one = seq * config.num_layers * sz.kv_token
    pool = hw.pool_limit()
    have = (pool if pool is not None else hw.gpu_mem + hw.cpu_mem) + hw.disk
    if sz.total_w + cache_one > have:
        kind = quant["quantization"] or ("4-bit compressed" if allow_compression else f"{8 * dtype_bytes}-bit")
        raise PolicyError(
            f"{config.name or 'the model'} needs {format_size(sz.total_w)} of weights ({kind}) plus "
            f"{format_size(cache_one)} of KV cache for one sequence of {seq} tokens, but "
            + (f"memory (one pool for the GPU and CPU tiers) + disk give {format_size(have)} "
               f"({format_size(pool)} + {format_size(hw.disk)})" if pool is not None else
               f"GPU + CPU + disk give {format_size(have)} ({format_size(hw.gpu_mem)} + {format_size(hw.cpu_mem)} "
               f"+ {format_size(hw.disk)})")
            + ("" if allow_compression or quant["quantization"] else "; allowing compression would shrink the "
               "weights about 3.5x (--compress; --quantization awq or rtn4 likewise)"))


def _explain_infeasible(config: ModelConfig, hw: Hardware, prompt_len: int, gen_len: int, dtype_bytes: int,
                        allow_compression: bool, num_candidates: int, quant: dict) -> str:
    smallest = build(config, Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0,
                                    act_gpu_percent=0, act_cpu_percent=0,
                                    compress_weight=allow_compression and not quant["quantization"], **quant),
                     hw, prompt_len, gen_len, dtype_bytes)
    gpu_need = smallest.memory["gpu"].minimum()
    if gpu_need > hw.gpu_mem:
        return (f"no policy fits: even one sequence per batch with everything offloaded needs "
                f"{format_size(gpu_need)} of GPU memory for one layer's weight staging and the working set "
                f"(a decoder layer is {format_size(smallest.sizes.layer_w)}, the embedding and head "
                f"{format_size(smallest.sizes.embed_w + smallest.sizes.head_w)}), but the GPU has "
                f"{format_size(hw.gpu_mem)}")
    x_disk = point(0, 0, 0, 0, 0, 0)
    peak = smallest.peak(x_disk)
    return (f"no policy fits the memory ({num_candidates} block shapes considered): with everything on disk "
            f"a 1x1 block needs GPU {format_size(peak['gpu'])} / CPU {format_size(peak['cpu'])} / disk "
            f"{format_size(peak['disk'])}, the machine gives {format_size(hw.gpu_mem)} / "
            f"{format_size(hw.cpu_mem)} / {format_size(hw.disk)}"
            + (f" (GPU and CPU are one memory: {format_size(hw.pool_limit())} for both after the host's reserve)"
               if hw.unified_memory else ""))


def describe_policy(policy: Policy) -> str:
    """One line per kind: where weights, cache and activations live."""
    def line(kind: str, label: str) -> str:
        g, c = getattr(policy, f"{kind}_gpu_percent"), getattr(policy, f"{kind}_cpu_percent")
        return f"{label}: {g:g}% GPU, {c:g}% CPU, {100 - g - c:g}% disk"

    return "; ".join((line("w", "weights"), line("cache", "KV cache"), line("act", "activations")))


def _explain(config: ModelConfig, policy: Policy, est: Estimate, hw: Hardware, num_candidates: int, solved: int,
             elapsed: float) -> str:
    attn = "on the CPU where the cache is" if policy.cpu_cache_compute else "on the GPU"
    parts = [
        f"block {policy.gpu_batch_size}x{policy.num_gpu_batches} = {policy.block_size} sequences; "
        + describe_policy(policy) + f"; decode attention {attn}"
        + ("; weights 4-bit compressed" if policy.compress_weight else "")
        + (f"; weights {policy.quantization}" if policy.quantization else "")
        + ("; cache fp8" if policy.kv_cache_dtype == "fp8" else "")
        + ("; cache 4-bit compressed" if policy.compress_cache else ""),
        f"decode: {est.decode_s_per_step:.3g} s per step of {policy.block_size} tokens, bound by "
        f"{est.decode_bottleneck}; prefill: {est.prefill_s:.3g} s, bound by {est.prefill_bottleneck}",
        f"searched {num_candidates} shapes on the '{hw.name}' profile, solved {solved} LPs/MILPs in {elapsed:.2f} s",
    ]
    return "\n".join(parts)
