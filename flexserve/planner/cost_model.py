"""Cost model of the zig-zag block schedule: time of prefill and of one decode step, and peak memory per tier.

The unit of work is one *pseudo-layer* (embed, each decoder layer, head) run over one *block* of
`gpu_batch_size × num_gpu_batches` sequences: its weights cross once per block, every GPU batch is computed, and
the batches' KV cache and hidden states move in and out. Three resources work at once, as in the executor:

- load   (loader thread): offloaded weights and cache, disk → pinned CPU → GPU, one after the other;
- store  (store thread):  the new tokens' cache, GPU → CPU (→ disk);
- compute (caller thread): GPU matmuls and attention (roofline: FLOPs or HBM bytes, whichever is slower),
  CPU attention when `cpu_cache_compute`, and activation copies (issued on the compute stream).

- host   (caller thread): issuing each GPU batch's kernels, `layer_overhead_s` scaled by the layer's kernel
  launches (`launches.py`); a decode step of a resident model is bound by it on a fast GPU. With CPU attention
  the same thread attends, so its issuing joins the compute lane for the cache's CPU share.

With `overlap` a pseudo-layer takes max(load, store, compute, host), without it the sum; either way plus
`layer_sync_s` per decoder layer and GPU batch (what no lane overlaps) and, for the embed and head pseudo-layers,
`layer_overhead_s` per GPU batch. Decode is costed at the average context length
`prompt_len + gen_len / 2`, so the (gen_len - 1) steps cost gen_len - 1 times one average step. Every term is
affine in the six placement fractions (see `linear.py`), which is what lets `search` solve it as a MILP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from ..errors import PolicyError
from ..offload.experts import expert_slots
from ..offload.policy import Policy
from . import launches, moe_cost
from .hardware import Hardware, format_size
from .linear import Linear, Switch, TierMemory, total
from .quant import projection_time_s
from .sizes import Sizes, dtype_name, model_sizes

RESOURCES = ("load", "store", "compute", "host")
TIERS = ("gpu", "cpu", "disk")

_LABELS = {
    ("load", "weights pcie"): "pcie weights", ("load", "weights disk"): "disk",
    ("load", "cache pcie"): "pcie cache", ("load", "cache disk"): "disk", ("load", "attn out"): "pcie cache",
    ("store", "cache pcie"): "pcie cache store", ("store", "cache disk"): "disk", ("store", "qkv"): "pcie cache",
    ("compute", "gpu attention"): "gpu attention", ("compute", "cpu attention"): "cpu attention",
    ("compute", "act pcie"): "pcie activations", ("compute", "act disk"): "disk",
    ("load", "experts pcie"): "pcie experts", ("compute", "cpu experts"): "cpu experts",
    ("host", "dispatch"): "launch overhead", ("compute", "dispatch"): "launch overhead",
}


@dataclass(frozen=True)
class Stage:
    """One pseudo-layer kind in one phase, and how many times it runs per block over the whole generation."""

    name: str  # "prefill.decoder", "decode.head", ...
    per_step: float  # runs per prefill or per decode step (num_layers for decoders, 1 for embed/head)
    count: float  # runs per block over the whole generation
    resources: dict[str, dict[str, Linear]]  # resource -> component -> seconds, affine in the placement
    overhead_s: float
    gpu_memory_bound: bool = False

    @property
    def phase(self) -> str:
        return self.name.split(".")[0]

    def resource_times(self, x) -> dict[str, float]:
        return {r: sum(c.at(x) for c in comps.values()) for r, comps in self.resources.items()}

    def time(self, x, overlap: bool) -> float:
        times = self.resource_times(x).values()
        return (max(times) if overlap else sum(times)) + self.overhead_s

    def bound_terms(self, overlap: bool) -> list[Linear]:
        """The affine terms the stage's time must exceed (all resources with overlap, their sum without)."""
        per = [total(comps.values()) for comps in self.resources.values()]
        return per if overlap else [total(per)]


@dataclass(frozen=True)
class CostModel:
    """The cost model of one block shape and option set; the placement fractions stay free."""

    policy: Policy
    stages: tuple[Stage, ...]
    memory: dict[str, TierMemory]
    block_size: int
    prompt_len: int
    gen_len: int
    sizes: Sizes

    def stage_times(self, x) -> dict[str, float]:
        return {s.name: s.time(x, self.policy.overlap) for s in self.stages}

    def phase_time(self, x, phase: str) -> float:
        """Prefill: its whole time; decode: one average step."""
        return sum(s.time(x, self.policy.overlap) * s.per_step for s in self.stages if s.phase == phase)

    def total_time(self, x) -> float:
        return sum(s.time(x, self.policy.overlap) * s.count for s in self.stages if s.count > 0)

    def peak(self, x) -> dict[str, float]:
        return {t: self.memory[t].at(x) for t in TIERS}


@dataclass(frozen=True)
class Estimate:
    """Predicted times, throughputs and peak memory of one policy (throughputs count generated tokens)."""

    block_size: int
    prefill_s: float
    decode_s_per_step: float
    total_s: float
    prefill_tok_s: float
    decode_tok_s: float
    total_tok_s: float
    peak_gpu_bytes: float
    peak_cpu_bytes: float
    peak_disk_bytes: float
    bottleneck: str  # of the phase that takes longer overall ("prefill: gpu compute" when prefill does)
    decode_bottleneck: str = ""
    prefill_bottleneck: str = ""
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> dict[str, float]:
        return {"gpu": self.peak_gpu_bytes, "cpu": self.peak_cpu_bytes, "disk": self.peak_disk_bytes}

    def overflows(self, hardware: Hardware) -> list[str]:
        """Tiers whose peak exceeds the hardware's size, as readable lines (empty when it fits)."""
        limits, pool = hardware.limits(), hardware.pool_limit()
        out = [f"{t} needs {format_size(self.peak_bytes[t])} but has {format_size(limits[t])}"
               for t in TIERS if self.peak_bytes[t] > limits[t] * (1 + 1e-9) + 1]
        both = self.peak_gpu_bytes + self.peak_cpu_bytes
        if pool is not None and both > pool * (1 + 1e-9) + 1:
            out.append(f"gpu + cpu (one memory) need {format_size(both)} but have {format_size(pool)}")
        return out


def build(config: ModelConfig, policy: Policy, hardware: Hardware, prompt_len: int, gen_len: int,
          dtype_bytes: int = 2, dtype: str | None = None) -> CostModel:
    """The affine cost model of `policy`'s block shape and options (its percentages are not used)."""
    if prompt_len < 1 or gen_len < 1:
        raise PolicyError(f"prompt_len and gen_len must be >= 1, got {prompt_len} and {gen_len}")
    sz = model_sizes(config, policy, dtype_bytes)
    hw, p, cfg, b = hardware, policy, config, dtype_bytes
    flops = hw.gpu_flops(dtype or dtype_name(dtype_bytes))
    gbs, nb, blk = p.gpu_batch_size, p.num_gpu_batches, p.block_size
    s_dec = prompt_len + gen_len / 2  # average context length over the decode steps
    fv = (1 + p.attn_sparsity) / 2  # sparse attention reads every key but only the top values
    share = Linear.share
    w_off = share("w", "cpu") / (hw.h2d_pinned_bw if p.pin_weight else hw.h2d_pageable_bw) \
        + share("w", "disk") / hw.h2d_pinned_bw
    def dequant_s(stored: float, full: float) -> float:  # rebuild a packed weight in the compute dtype
        if not p.compress_weight:
            return 0.0
        return full / hw.dequant_bw if hw.dequant_bw else (stored + full) / hw.gpu_mem_bw

    dequant = dequant_s(sz.layer_w, sz.layer_w16)

    def weight_load(num_bytes: float, gathered_on_cpu: bool = False, contended: bool = False) -> dict[str, Linear]:
        # an embedding table on the CPU is read row by row (B*S rows, negligible), never moved whole
        pcie = share("w", "disk") / hw.h2d_pinned_bw if gathered_on_cpu else w_off
        if contended and hw.h2d_contended_bw:  # the copy runs beside CPU attention, slower by what it measured
            pcie = pcie * (hw.h2d_pinned_bw / hw.h2d_contended_bw)
        return {"weights pcie": pcie * num_bytes, "weights disk": share("w", "disk") * (num_bytes / hw.disk_read_bw)}

    def acts(tokens: float) -> dict[str, Linear]:
        act_bytes = blk * tokens * cfg.hidden_size * b  # one put (d2h) and one get (h2d) per layer
        off = share("act", "cpu") + share("act", "disk")
        return {"act pcie": off * (act_bytes / hw.h2d_pinned_bw + act_bytes / hw.d2h_pinned_bw),
                "act disk": share("act", "disk") * (act_bytes / hw.disk_read_bw + act_bytes / hw.disk_write_bw)}

    def linear_time(tokens: float, params: float, weight_bytes16: float, scheme: str | None = None,
                    stored_bytes: float = 0.0) -> tuple[float, bool]:
        per_batch_flops = 2.0 * gbs * tokens * params / flops
        # every GPU batch reads the layer's weights from HBM; a quantised layer its own bytes (planner/quant.py)
        per_batch, mem_bound = projection_time_s(scheme, gbs * tokens, per_batch_flops, stored_bytes,
                                                 weight_bytes16, hw)
        return nb * per_batch, mem_bound

    off_cache = share("cache", "cpu") + share("cache", "disk")  # cache that is not on the GPU
    moe = moe_cost.applies(cfg, p)  # experts placed and run one by one: see moe_cost
    scheme = None if cfg.is_moe else p.quantization  # `layer_ratio`: a mixture's layers stay unquantized
    issue_s = launches.host_seconds(cfg, hw.layer_overhead_s, scheme)  # a decoder layer's kernels, one GPU batch
    stages = []
    # --- decoder layers ------------------------------------------------------------------------------------
    for phase, tokens, ctx, steps in (("prefill", prompt_len, prompt_len, 1), ("decode", 1, s_dec, gen_len - 1)):
        m = moe_cost.moe_layer(cfg, p, hw, gbs * tokens, b) if moe else None
        lin, mem_bound = (linear_time(tokens, m.active_params, m.read_bytes16) if m is not None
                          else linear_time(tokens, sz.layer_params, sz.layer_w16, scheme, sz.layer_w))
        cpu_attends = p.cpu_cache_compute and phase == "decode"
        new_cache = blk * tokens * sz.kv_token
        if phase == "prefill":
            attn = nb * max(2.0 * gbs * tokens * ctx * cfg.q_size / flops,
                            gbs * ctx * sz.kv_token16 / hw.gpu_mem_bw)
        else:
            read16 = blk * ctx * sz.kv_token16 * fv + (blk * ctx * (sz.kv_token + sz.kv_token16)
                                                      if p.compress_cache else 0.0)
            attn = max(4.0 * blk * ctx * cfg.q_size / flops, read16 / hw.gpu_mem_bw)
        load = weight_load(sz.layer_w, contended=cpu_attends)
        store: dict[str, Linear] = {}
        compute: dict[str, Linear] = {"gpu linear": Linear.constant(lin)}
        if m is not None:  # only the experts the batch reaches cost, copied in or computed on the CPU
            load, experts_compute = m.off_gpu_terms(hw, share("w", "gpu"), share("w", "disk"), nb)
            if moe_cost.reuses_across_block(cfg, p, blk * tokens):  # the block's batches share their copies
                load, _ = moe_cost.moe_layer(cfg, p, hw, blk * tokens, b).off_gpu_terms(
                    hw, share("w", "gpu"), share("w", "disk"), 1)
            compute.update(experts_compute)
            compute["gpu linear"] = Linear.constant(lin + dequant)  # packed experts: unpacked where they run
        elif dequant:  # the loader unpacks each weight into its slot on the copy stream, right behind its bytes
            load["dequant"] = Linear.constant(dequant)
        if phase == "decode":
            cache_read = blk * ctx * sz.kv_token * fv
            moved = share("cache", "disk") if cpu_attends else off_cache
            load["cache pcie"] = moved * (cache_read / hw.h2d_pinned_bw)
            load["cache disk"] = share("cache", "disk") * (cache_read / hw.disk_read_bw)
        if cpu_attends:
            attn_bw = hw.cpu_attention_rate(p.cpu_attention_dtype or dtype or dtype_name(b))
            cpu = max(blk * ctx * sz.kv_token * fv / attn_bw, 4.0 * blk * ctx * cfg.q_size * fv / hw.cpu_flops)
            compute["gpu attention"] = (1 - share("cache", "cpu")) * attn
            compute["cpu attention"] = share("cache", "cpu") * cpu
            if p.overlap and hw.cpu_attention_overlap < 1:  # the part the weight stream does not run beside
                load["stalled by cpu attention"] = share("cache", "cpu") * (cpu * (1 - hw.cpu_attention_overlap))
            load["attn out"] = share("cache", "cpu") * (blk * cfg.q_size * b / hw.h2d_pinned_bw)
            store["qkv"] = share("cache", "cpu") * (blk * (cfg.q_size + 2 * cfg.kv_size) * b / hw.d2h_pinned_bw)
            store["cache pcie"] = share("cache", "disk") * (new_cache / hw.d2h_pinned_bw)
        else:
            compute["gpu attention"] = Linear.constant(attn)
            store["cache pcie"] = off_cache * (new_cache / hw.d2h_pinned_bw)
        store["cache disk"] = share("cache", "disk") * (new_cache / hw.disk_write_bw)
        if phase == "prefill":  # a decode step's hidden states stay on the compute device (the executor)
            compute.update(acts(tokens))
        # The host issues each batch's kernels ahead of the GPU, beside the copies; with CPU attention the same
        # thread also attends, so the cache's CPU share of the issuing queues behind it.
        host = {"dispatch": Linear.constant(nb * issue_s)}
        if hw.unified_memory:  # no GPU: the thread that issues the kernels is the one that runs them
            compute["dispatch"], host = host["dispatch"], {}
        elif cpu_attends and p.overlap:
            compute["dispatch"] = share("cache", "cpu") * (nb * issue_s)
        stages.append(Stage(f"{phase}.decoder", cfg.num_layers, cfg.num_layers * steps,
                            {"load": load, "store": store, "compute": compute, "host": host}, nb * hw.layer_sync_s,
                            mem_bound))
    # --- embed and head pseudo-layers (weights placed by the same percentages, as in the executor) -------------
    head_lin, head_mem_bound = linear_time(1, sz.head_params, sz.head_w16)
    head_dequant = dequant_s(sz.head_w, sz.head_w16)
    for phase, steps in (("prefill", 1), ("decode", gen_len - 1)):
        stages.append(Stage(f"{phase}.embed", 1, steps,
                            {"load": weight_load(sz.embed_w, gathered_on_cpu=True), "store": {}, "compute": {}},
                            nb * hw.layer_overhead_s))
        stages.append(Stage(f"{phase}.head", 1, steps,
                            {"load": weight_load(sz.head_w), "store": {},
                             "compute": {"gpu linear": Linear.constant(head_lin + head_dequant)}},
                            nb * hw.layer_overhead_s, head_mem_bound))
    return CostModel(policy, tuple(stages), _memory(cfg, p, sz, prompt_len, gen_len, b), blk, prompt_len, gen_len,
                     sz)


GPU_RUNTIME_BYTES = 0.5e9  # device memory the runtime takes beyond our tensors (measured peak - modelled)
CPU_PROCESS_BYTES = 2e9  # resident Python, PyTorch and CUDA libraries of the serving process (measured RSS)


def _memory(cfg: ModelConfig, p: Policy, sz: Sizes, prompt_len: int, gen_len: int, b: int) -> dict[str, TierMemory]:
    """Peak bytes per tier: homes by percentage, plus staging buffers and the GPU's working set."""
    share = Linear.share
    gbs, blk, seq = p.gpu_batch_size, p.block_size, prompt_len + gen_len
    cache_total = blk * seq * cfg.num_layers * sz.kv_token
    act_total = blk * prompt_len * cfg.hidden_size * b
    glob_stream = sz.embed_w + sz.head_w  # one staging slot each for the embed and head pseudo-layers
    per_expert = moe_cost.applies(cfg, p)
    # a mixture's layer stages its dense weights; its expert slots are allocated whole once any expert is off the
    # GPU (the executor fills every slot it has over a few layers), a switch rather than a share
    layer_stage = moe_cost.staging_bytes(cfg, b, 0) if per_expert else 2 * sz.layer_w
    expert_slot_bytes = expert_slots(cfg, p) * cfg.expert_params() * b if per_expert else 0.0
    cache_slot = 2 * gbs * seq * sz.kv_token16  # two GPU slots of one (layer, batch) K and V
    gpu_parts = {
        "weights": share("w", "gpu") * sz.total_w,
        "weight staging": (1 - share("w", "gpu")) * (layer_stage + glob_stream)
        + (sz.layer_w16 if p.compress_weight else 0.0),
        "cache": share("cache", "gpu") * cache_total,
        "activations": share("act", "gpu") * act_total,
        "workspace": Linear.constant(
            gbs * prompt_len * (2 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size + sz.up_dim) * b
            + gbs * cfg.vocab_size * 4 + (2 * gbs * seq * sz.kv_token16 if p.compress_cache else 0.0)),
        "runtime": Linear.constant(GPU_RUNTIME_BYTES),  # cuBLAS workspaces, caching-allocator rounding
    }
    cpu_parts = {
        "process": Linear.constant(CPU_PROCESS_BYTES),
        "weights": share("w", "cpu") * sz.total_w,
        "weight staging": share("w", "disk") * (layer_stage + glob_stream),
        "cache": share("cache", "cpu") * cache_total,
        "activations": share("act", "cpu") * act_total,
    }
    disk_parts = {
        "weights": share("w", "disk") * sz.total_w,
        "cache": share("cache", "disk") * cache_total,
        "activations": share("act", "disk") * act_total,
    }
    # The prompt's new K/V of one batch, made contiguous on the device before it crosses to a head-major host
    # cache (and the runtime's share, a gpu part): both fitted from measured peaks; without them OPT-30B under
    # a 16 GiB cap peaked 0.9-1.5 GB above the plan (RESULTS, 2).
    store_staging = gbs * prompt_len * 2 * cfg.kv_size * b
    gpu_switches = (Switch(1 - share("cache", "gpu"), cache_slot, "cache slots"),
                    Switch(1 - share("cache", "gpu"), store_staging, "cache store staging"))
    if per_expert:
        gpu_switches += (Switch(1 - share("w", "gpu"), expert_slot_bytes, "expert slots"),)
    cpu_switches = [Switch(share("cache", "disk"), cache_slot, "cache disk staging")]
    if p.cpu_cache_compute:
        cpu_attn_ws = gbs * cfg.num_heads * seq * 4 + gbs * cfg.q_size * b * 2
        cpu_switches.append(Switch(share("cache", "cpu"), cpu_attn_ws, "cpu attention workspace"))
    return {"gpu": TierMemory(total(gpu_parts.values()), gpu_switches, gpu_parts),
            "cpu": TierMemory(total(cpu_parts.values()), tuple(cpu_switches), cpu_parts),
            "disk": TierMemory(total(disk_parts.values()), (), disk_parts)}


def estimate(config: ModelConfig, policy: Policy, hardware: Hardware, prompt_len: int, gen_len: int,
             dtype_bytes: int = 2, dtype: str | None = None, placed: bool = False) -> Estimate:
    """Predicted prefill/decode/total time and throughput, peak memory per tier and the bottleneck of `policy`.

    `placed=True` evaluates the shares the executor really gives each tier (`placed_point`: whole tensors);
    the default evaluates the percentages as continuous shares, the quantity the search optimises."""
    x = placed_point(config, policy) if placed else tuple(v / 100.0 for v in policy.percent)
    return evaluate(build(config, policy, hardware, prompt_len, gen_len, dtype_bytes, dtype), x)


def placed_point(config: ModelConfig, policy: Policy) -> tuple[float, ...]:
    """The placement the executor really makes of `policy`, as fractions: whole tensors move (a decoder
    layer's weights by the midpoint rule), the cache by (layer, GPU batch) and activations by GPU batch, so
    `--percent 20 80` on OPT-30B keeps a twelfth of each layer on the GPU, not a fifth. The search optimises over
    continuous shares; this is what a given policy will do (`flexserve plan` prints both)."""
    from ..memory.tiers import Tier, slot_tier
    from ..offload.placement import layer_weight_shares

    def counted(n: int, gpu: float, cpu: float) -> tuple[float, float]:
        tiers = [slot_tier(k, n, gpu, cpu) for k in range(n)]
        return tiers.count(Tier.GPU) / n, tiers.count(Tier.CPU) / n

    p = policy
    w = layer_weight_shares(config, p)
    return (w[Tier.GPU], w[Tier.CPU],
            *counted(config.num_layers * p.num_gpu_batches, p.cache_gpu_percent, p.cache_cpu_percent),
            *counted(p.num_gpu_batches, p.act_gpu_percent, p.act_cpu_percent))


def evaluate(model: CostModel, x) -> Estimate:
    """An `Estimate` of a built cost model at placement `x` (fractions)."""
    prefill = model.phase_time(x, "prefill")
    step = model.phase_time(x, "decode")
    steps = model.gen_len - 1
    total_s = prefill + steps * step
    blk = model.block_size
    peak = model.peak(x)
    breakdown: dict[str, float] = {}
    for s in model.stages:  # seconds per prefill / per decode step, summed over the pseudo-layers
        per = s.per_step
        for r, comps in s.resources.items():
            for c, lin in comps.items():
                key = f"{s.phase}.{r}.{c}"
                breakdown[key] = breakdown.get(key, 0.0) + lin.at(x) * per
        breakdown[f"{s.phase}.overhead"] = breakdown.get(f"{s.phase}.overhead", 0.0) + s.overhead_s * per
    return Estimate(
        block_size=blk, prefill_s=prefill, decode_s_per_step=step, total_s=total_s,
        prefill_tok_s=blk * model.prompt_len / prefill, decode_tok_s=blk / step if step > 0 else float("inf"),
        total_tok_s=blk * model.gen_len / total_s,
        peak_gpu_bytes=peak["gpu"], peak_cpu_bytes=peak["cpu"], peak_disk_bytes=peak["disk"],
        bottleneck=bottleneck(model, x, prefill > steps * step), decode_bottleneck=bottleneck(model, x, False),
        prefill_bottleneck=bottleneck(model, x, True).removeprefix("prefill: "), breakdown=breakdown)


def bottleneck(model: CostModel, x, prefill_dominates: bool = False) -> str:
    """The resource that sets the pace of the dominant phase's decoder layers, in words."""
    stage = next(s for s in model.stages if s.name == ("prefill" if prefill_dominates else "decode") + ".decoder")
    prefix = "prefill: " if prefill_dominates and model.gen_len > 1 else ""
    times = stage.resource_times(x)
    if model.policy.overlap:
        candidates = [max(times, key=times.get)]
    else:
        candidates = list(RESOURCES)
    best, best_t = "", -1.0
    for r in candidates:
        for c, lin in stage.resources.get(r, {}).items():
            if lin.at(x) > best_t:
                best, best_t = _label(r, c, stage), lin.at(x)
    if stage.overhead_s > (max(times.values()) if model.policy.overlap else sum(times.values())):
        best = "per-layer sync"
    return prefix + best


def _label(resource: str, component: str, stage: Stage) -> str:
    if component == "gpu linear":
        return "gpu memory bandwidth" if stage.gpu_memory_bound else "gpu compute"
    return _LABELS.get((resource, component), component)


def compare(estimate: Estimate, measured_tok_s: float, which: str = "total") -> dict[str, float]:
    """How far a prediction was from a measured run: relative error (predicted / measured - 1) of one throughput.

    `which` is "total", "decode" or "prefill"; the result carries both numbers and the error so that benchmark
    tables can print them side by side.
    """
    if which not in ("total", "decode", "prefill"):
        raise ValueError(f"which must be total, decode or prefill, got {which!r}")
    if not measured_tok_s > 0:
        raise ValueError(f"measured throughput must be > 0, got {measured_tok_s}")
    predicted = getattr(estimate, f"{which}_tok_s")
    return {"predicted_tok_s": predicted, "measured_tok_s": measured_tok_s,
            "relative_error": predicted / measured_tok_s - 1.0,
            "abs_relative_error": abs(predicted / measured_tok_s - 1.0)}
