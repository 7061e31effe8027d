"""The expert as the unit of weight placement for mixtures of experts: where experts live, and how one that is
off the GPU gets run.

Placement (`assign_moe_tiers`). A token uses every attention weight, the router, the norms and the shared
expert, but only `experts_per_token` of the routed experts, so those dense weights go to the GPU first and the
experts fill what is left: the GPU's share of the layer's bytes, then the CPU's, then the disk's, whole experts
at a time (an expert's `up` and `down` never part). FlexGen's rule, which spreads every tensor of a layer by
the same percentages, stays the rule for dense models.

Execution (`ExpertStreamer`). An expert off the GPU is never streamed with its layer. When the router has
sent tokens to it, it is either copied in (its bytes cross PCIe, then the GPU computes) or computed on the CPU
where it lives (the tokens cross, the CPU reads the weights from host memory). The two sides are different
resources, so a layer's off-GPU experts are divided between them to finish together (`split_experts`, by the
rates of `expert_rates`): a decode token's two experts run one on each side at once, a prefill's hundreds of
tokens per expert go to the GPU. Copies run on their own lane into GPU slots (`expert_slots`), the next copy
landing while the previous expert computes, and all of a layer's copies and their GPU work are queued before
the CPU starts on its share.

The rates come from one probe on the machine, and one probe can be off by a large factor (on one H200 host the
host-read probe gave 63 GB/s in one run and 22 GB/s in another). The streamer therefore times the CPU's share
of every layer it divides and keeps a running ratio of the measured to the modelled CPU time
(`cpu_time_factor`), which scales the CPU side of later divisions; the copy side is left at its probe, which
does not waver. `modelled_s` stays at the probe's rates: it is the bound the benchmark reports.

When the block is that large, the router's choice hardly matters to what crosses: every off-GPU expert of the
next layer is going to be reached. The experts a layer routes to are known only once its router has run, so
without help the copy lane would sit idle through the CPU attention, the CPU experts and the GPU work of every
batch between one layer's last copy and the next layer's first router; the step would take the copies' time
plus all of that. Such a block therefore gets twice the slots (`prefetches_next_layer`), and while a layer
computes, the next layer's off-GPU experts held in host memory are already crossing into the other half
(`ExpertStreamer.prefetch`): the copies then hide everything but themselves.

A slot keeps the expert it holds until the executor moves on from the layer (`ExpertStreamer.release`), so
under the zig-zag schedule, where one layer serves every GPU batch of the block in turn, batch k+1 computes
with an expert batch k copied instead of copying it again (FlexGen's reuse of a layer's weights across the
block, applied to experts): an expert crosses PCIe once per layer and block while the block's copied experts
fit in the slots. A block of one GPU batch needs two (one landing while the other computes); a block of
several gets a slot for every expert the block is expected to reach (at most those off the GPU), so that the
later batches find the earlier ones' copies held, and the planner counts those slots on the GPU.

Which experts hold the GPU's share is not fixed by index: the placement decides how many, H per layer, and
the routing decides which (`hot_experts`). Every call counts the tokens routed to each expert from the
per-expert counts already on the host, decaying per step; after a warm-up, then periodically, `end_step`
swaps each off-GPU expert that out-counts a resident with that resident, between steps: the newcomer is read
into a copy slot, the resident is written where the newcomer lived, and the two buffers trade places, so the
GPU keeps H experts, every other tier its own count, and the copies run on the expert lane while the next
step's earlier layers compute. The weights are unchanged, so the tokens are too.

With `compress_weight` every expert is kept group-wise quantised on its tier, the GPU's too (FlexGen's meaning
of the flag): a packed expert on the GPU is unpacked into a slot, one elsewhere crosses packed and is unpacked
on the GPU, or is unpacked on the CPU and computed there. Only the packed bytes move.
"""
from __future__ import annotations

import collections
import math
import re
import time
from dataclasses import dataclass, field

import torch

from ..compression import CompressedTensor, decompress
from ..config import ModelConfig
from ..memory.streams import Lane, current_record, current_wait
from ..memory.tiers import Handle, Tier, Tiers
from ..models.moe import ExpertWork, expert_mlp
from .expert_rates import ExpertRates, expert_seconds, measure_expert_rates, split_experts, split_seconds
from .hot_experts import HotExperts, choose_swaps
from .policy import EXPERT_RULES

EXPERT_SLOTS = 2  # GPU slots for copied experts: what `planner.moe_cost.staging_bytes` reserves per layer
_EXPERT = re.compile(r"^experts\.(\d+)\.")


CPU_FACTOR_STEP = 0.25  # weight of the newest layer's measured/modelled ratio in `cpu_time_factor`
CPU_FACTOR_LIMIT = 20.0  # one layer's ratio is clamped to [1/20, 20]: a stall elsewhere is not a rate
PREFETCH_MISS = 0.1  # the largest chance that a block leaves one expert unreached for it to copy ahead


def expert_slots(config: ModelConfig, policy) -> int:
    """GPU slots for copied experts under `policy`: `EXPERT_SLOTS` (one copy landing while the other expert
    computes) for a block of one GPU batch; with several, as many as the experts the whole block's decode step
    is expected to reach, at most the experts a layer keeps off the GPU, so that the block's later batches find
    what the earlier ones copied still held and each expert crosses PCIe once per layer and block, not once per
    batch; twice that when the next layer's experts are copied ahead (`prefetches_next_layer`)."""
    if not config.is_moe or policy.num_gpu_batches <= 1:
        return EXPERT_SLOTS
    off = off_gpu_experts(config, policy)
    if prefetches_next_layer(config, policy):
        return max(EXPERT_SLOTS, 2 * off)
    reach = expected_experts_hit(config.num_experts, config.experts_per_token, policy.block_size)
    return int(max(EXPERT_SLOTS, min(off, math.ceil(reach - 1e-9))))


def prefetches_next_layer(config: ModelConfig, policy) -> bool:
    """Whether a layer's off-GPU experts are copied while the layer before it computes: a block of several GPU
    batches whose decode step leaves any one expert unreached with probability at most `PREFETCH_MISS` (uniform
    routing), under a rule that copies, with overlapped lanes. A miss costs one expert's copy for nothing."""
    if not config.is_moe or policy.num_gpu_batches <= 1 or policy.expert_compute == "cpu" or not policy.overlap:
        return False
    miss = (1.0 - config.experts_per_token / config.num_experts) ** policy.block_size
    return miss <= PREFETCH_MISS and off_gpu_experts(config, policy) > 0


def expected_experts_hit(num_experts: int, k: int, tokens: float) -> float:
    """Expected distinct experts that `tokens` tokens, each routed to k of `num_experts`, reach."""
    return num_experts * (1.0 - (1.0 - k / num_experts) ** tokens)


def slots_hold(slots: int, off_gpu: int, hit: float) -> bool:
    """Whether `slots` copy slots hold every off-GPU expert that `hit` reached experts expected can need (a
    layer keeps `off_gpu` off the GPU): then a block's later batches find the earlier ones' copies held."""
    return slots >= min(off_gpu, math.ceil(hit - 1e-9))


def off_gpu_experts(config: ModelConfig, policy) -> int:
    """How many of a decoder layer's experts `policy`'s placement keeps off the GPU."""
    tiers = assign_moe_tiers(config.layer_weight_sizes(), policy.w_gpu_percent, policy.w_cpu_percent)
    return len({expert_index(n) for n, t in tiers.items() if t is not Tier.GPU} - {None})


def expert_index(name: str) -> int | None:
    """The routed expert a per-layer tensor belongs to, or None (attention, router, norms, shared expert)."""
    m = _EXPERT.match(name)
    return None if m is None else int(m.group(1))


def assign_moe_tiers(sizes: dict[str, int], gpu_percent: float, cpu_percent: float) -> dict[str, Tier]:
    """The tier of each tensor of one MoE decoder layer (see the module docstring): units in the order dense
    tensors, then experts 0..E-1, each going by its midpoint to the GPU's share, then the CPU's, then disk."""
    dense = sorted((n for n in sizes if expert_index(n) is None), key=lambda n: (-sizes[n], n))
    experts: dict[int, list[str]] = collections.defaultdict(list)
    for n in sizes:
        if expert_index(n) is not None:
            experts[expert_index(n)].append(n)
    units = [[n] for n in dense] + [sorted(experts[e]) for e in sorted(experts)]
    total = max(sum(sizes.values()), 1)
    out: dict[str, Tier] = {}
    acc = 0
    for unit in units:
        size = sum(sizes[n] for n in unit)
        mid = (acc + size / 2) / total * 100
        acc += size
        tier = Tier.GPU if mid < gpu_percent else Tier.CPU if mid < gpu_percent + cpu_percent else Tier.DISK
        out.update(dict.fromkeys(unit, tier))
    return out


@dataclass
class _Slot:
    """A GPU buffer pair for one copied expert, with pinned staging for disk reads."""

    up: torch.Tensor
    down: torch.Tensor
    staging: dict[str, object]  # part -> pinned buffer for a disk read (per packed part when compressed)
    packed: dict[str, CompressedTensor] = field(default_factory=dict)  # part -> packed buffers on the device
    released: object = None  # event: the last compute that read this slot
    loaded: object = None  # event: the last copy into it (its staging is reused by the next one)
    holds: tuple | None = None  # (layer's offloaded experts, expert id) whose weights it holds, until released


@dataclass
class ExpertStreamer:
    """Runs the experts of one executor that live off the GPU (see the module docstring)."""

    cfg: ModelConfig
    tiers: Tiers
    device: torch.device
    dtype: torch.dtype
    rule: str = "auto"
    rates: ExpertRates | None = None  # None: measured on this machine at the first off-GPU expert (rule auto)
    overlap: bool = True
    counts: collections.Counter = field(default_factory=collections.Counter)  # runs; "promoted" exchanges
    modelled_s: float = 0.0  # the off-GPU experts' time at the rates, as divided: what the bench bounds by
    cpu_time_factor: float = 1.0  # measured / modelled CPU time of the experts computed on the host so far
    learns_cpu_time: bool = False  # set when the rates are probed here: given rates are taken as they are
    slots: int = EXPERT_SLOTS  # the executor gives `expert_slots(policy)`, what the planner counts
    ahead: bool = False  # copy the next layer's experts while a layer computes (`prefetches_next_layer`)
    hot: HotExperts = field(init=False)  # routing counts and the hot-set schedule (tests may replace it)

    def __post_init__(self) -> None:
        if self.rule not in EXPERT_RULES:
            raise ValueError(f"expert rule must be one of {EXPERT_RULES}, got {self.rule!r}")
        self.lane = Lane(self.device, self.overlap)
        self._slots: list[_Slot] = []
        self._used: dict[int, int] = {}  # slot -> when an expert last ran from it
        self._tick = 0
        self._swapped: dict[int, object] = {}  # id(layer's offloaded experts) -> event of its last exchanges
        self.hot = HotExperts(self.cfg.num_experts)

    def run(self, w, offloaded: dict[str, Handle], work: ExpertWork) -> list[torch.Tensor]:
        """Each expert of `work` over its tokens: the ones in `w` on the device, the others copied in or computed
        on the host, divided by `split_experts` (rule auto) or by the fixed rule. Every copy and the GPU work
        that reads it is queued before the CPU starts on its share, so the two sides run at the same time."""
        self.hot.counter.observe(id(offloaded), ((e, x.shape[0]) for e, x in work))  # host ints: no sync
        swapped = self._swapped.pop(id(offloaded), None)  # the hot set changed since the layer last ran
        current_wait(swapped)
        out: list[torch.Tensor | None] = [None] * len(work)
        to_copy, on_host, host_s = self._divide(w, offloaded, work, out)
        to_copy.sort(key=lambda i: self._held(offloaded, work[i][0]) is None)  # held ones first: no copy
        steps = self._plan(offloaded, [work[i][0] for i in to_copy])
        # the CPU's inputs leave the device first: reading them waits for the compute stream, which from here
        # on waits for copies
        host_in = {i: work[i][1].to("cpu") for i in on_host}
        loads: dict[int, object] = {}
        nxt = 0

        def queue_loads(done: int) -> None:
            nonlocal nxt
            while nxt < len(steps):
                s, load = steps[nxt]
                if load and any(steps[j][0] == s for j in range(done, nxt)):
                    return  # an earlier expert of this batch still reads that slot
                if load:
                    loads[nxt] = self._load(s, offloaded, work[to_copy[nxt]][0])
                nxt += 1

        queue_loads(0)
        for n, i in enumerate(to_copy):
            slot = self._slots[steps[n][0]]
            current_wait(loads.pop(n) if n in loads else slot.loaded)
            out[i] = expert_mlp({"up.weight": slot.up, "down.weight": slot.down}, "", work[i][1])
            slot.released = current_record(self.device)
            on_gpu = _packed_on(offloaded[f"experts.{work[i][0]}.up.weight"], self.device) is not None
            self.counts["gpu" if on_gpu else "copied" if steps[n][1] else "reused"] += 1
            queue_loads(n + 1)
        if on_host and swapped is not None:  # the host reads weights the exchange may still be writing
            swapped.synchronize()
        # while the copies are in flight; the outputs go back after the last one, as an upload waits for the
        # compute stream and so for the copies
        start = time.perf_counter()
        done = {i: self._on_host(offloaded, work[i][0], host_in[i]) for i in on_host}
        if all(self._in_memory(offloaded, work[i][0]) for i in on_host):  # a disk read is not the CPU's rate
            self._learn(time.perf_counter() - start, host_s)
        for i, y in done.items():
            out[i] = y.to(work[i][1].device, work[i][1].dtype)
            self.counts["cpu"] += 1
        return out  # type: ignore[return-value]

    def _learn(self, measured_s: float, modelled_s: float) -> None:
        """Move `cpu_time_factor` a step towards what the host just took against the rates' time for it."""
        if not self.learns_cpu_time or modelled_s <= 0 or measured_s <= 0:
            return
        ratio = min(max(measured_s / modelled_s, 1 / CPU_FACTOR_LIMIT), CPU_FACTOR_LIMIT)
        self.cpu_time_factor += CPU_FACTOR_STEP * (ratio - self.cpu_time_factor)

    def _divide(self, w, offloaded: dict[str, Handle], work: ExpertWork,
                out: list) -> tuple[list[int], list[int], float]:
        """Run the experts of `work` that live on the GPU (into `out`) and return the indices of the others,
        (copied in, computed on the host), and the host's share's time at the rates; adds the division's time
        at the rates to `modelled_s`. The division weighs the CPU side by `cpu_time_factor`."""
        if self.rates is None and self.rule == "auto":
            self._measure(offloaded, work)
        rates = self.rates or ExpertRates()
        params = self.cfg.expert_params()
        to_copy, placed, cpu_s, copy_s = [], [], [], []
        for i, (e, x) in enumerate(work):
            handles = [offloaded.get(f"experts.{e}.{p}.weight") for p in ("up", "down")]
            if f"experts.{e}.up.weight" in w:
                out[i] = expert_mlp(w, f"experts.{e}.", x)
                self.counts["gpu"] += 1
            elif all(_packed_on(h, self.device) is not None for h in handles):  # packed on the GPU: unpacked
                to_copy.append(i)
            else:
                cpu, copy = expert_seconds(x.shape[0], params, sum(h.nbytes for h in handles) / params, rates)
                placed.append(i)
                cpu_s.append(cpu)
                copy_s.append(0.0 if self._held(offloaded, e) is not None else copy)
        if self.rule == "auto":
            copied = split_experts([t * self.cpu_time_factor for t in cpu_s], copy_s)
        else:
            copied = [self.rule == "copy"] * len(placed)
        self.modelled_s += split_seconds(cpu_s, copy_s, copied)
        to_copy += [i for i, c in zip(placed, copied) if c]
        host_s = sum(t for t, c in zip(cpu_s, copied) if not c)
        return to_copy, [i for i, c in zip(placed, copied) if not c], host_s

    @staticmethod
    def _in_host_memory(offloaded: dict, e: int) -> bool:
        """Expert e's weights (plain, or every packed part) live in host memory, not on disk or the GPU."""
        handles = [offloaded.get(f"experts.{e}.{p}.weight") for p in ("up", "down")]
        parts = [q for h in handles for q in ([h] if isinstance(h, Handle) or h is None else h.parts.values())]
        return all(isinstance(q, Handle) and q.tier is Tier.CPU and q.data is not None for q in parts)

    @staticmethod
    def _in_memory(offloaded: dict[str, Handle], e: int) -> bool:
        """Expert e's weights are plain tensors in host memory (not on disk, not packed)."""
        handles = [offloaded.get(f"experts.{e}.{p}.weight") for p in ("up", "down")]
        return all(isinstance(h, Handle) and h.tier is Tier.CPU and h.data is not None for h in handles)

    def _measure(self, offloaded: dict[str, Handle], work: ExpertWork) -> None:
        """Set `rates` from this machine (`measure_expert_rates`) with an expert of `work` that lives in plain host
        memory; none such yet (on the GPU, on disk or packed): keep waiting."""
        for e, x in work:
            handles = [offloaded.get(f"experts.{e}.{p}.weight") for p in ("up", "down")]
            if self._in_memory(offloaded, e):
                probe = torch.zeros(1, x.shape[-1], dtype=x.dtype)
                self.rates = measure_expert_rates(
                    lambda n: self._on_host(offloaded, e, probe.expand(n, -1)), self.cfg.expert_params(),
                    sum(h.nbytes for h in handles), self.device)
                self.learns_cpu_time = True
                return

    def release(self, offloaded: dict | None = None) -> None:
        """Forget what the slots hold of the layer whose off-GPU experts are `offloaded` (every layer's if None):
        the executor has moved on from it for this block. A layer copied ahead keeps its slots."""
        for slot in self._slots:
            if offloaded is None or slot.holds is not None and slot.holds[0] == id(offloaded):
                slot.holds = None

    def prefetch(self, offloaded: dict[str, Handle]) -> None:
        """With `ahead`, queue copies of the off-GPU experts in host memory of the layer whose experts are
        `offloaded` (the next one to run) into slots no layer holds, on the expert lane, behind the copies
        already queued: they cross while the current layer computes, and that layer's `run` finds them held.
        Experts on disk are left to `run` (their read would hold this thread)."""
        if not self.ahead:
            return
        taken = {s for s, slot in enumerate(self._slots) if slot.holds is not None}
        for e in sorted({expert_index(n) for n in offloaded} - {None}):
            if self._held(offloaded, e) is not None or not self._in_host_memory(offloaded, e):
                continue
            free = [s for s in range(self.slots) if s not in taken]
            if not free:
                return
            s = min(free, key=self._eviction_order)
            taken.add(s)
            self._tick += 1
            self._used[s] = self._tick
            self._load(s, offloaded, e)
            self.counts["copied"] += 1
            self.counts["prefetched"] += 1

    def end_step(self, layers) -> None:
        """The executor has walked every layer (a step): count it, and when the hot set is due, exchange in
        each layer the off-GPU experts routed to more than a resident one (see `hot_experts`)."""
        if not self.hot.step():
            return
        self.release()  # the exchanges recycle slot buffers: what they held is gone
        ready = current_record(self.device)  # every computation so far, readers of the residents included
        for layer in layers:
            residents = self._residents(layer)
            if not residents:
                continue
            others = {expert_index(n) for n in layer.experts} - residents
            for promote, demote in choose_swaps(self.hot.counter.counts(id(layer.experts)), residents, others):
                self._exchange(layer, promote, demote, ready)
                self.counts["promoted"] += 1  # and as many sent back

    def _residents(self, layer) -> set[int]:
        """The routed experts of a layer that live on the GPU beside others that do not (else empty)."""
        if not layer.experts:
            return set()
        plain = {expert_index(n) for n in layer.resident} - {None}
        packed = {expert_index(n) for n, h in layer.experts.items()
                  if not isinstance(h, Handle) and h.tier is Tier.GPU}
        return plain | packed

    def _exchange(self, layer, promote: int, demote: int, ready) -> None:
        """Expert `promote` takes the GPU storage of resident `demote`, which takes `promote`'s storage off the
        GPU, through slot 0: the slot receives `promote`, `demote` is written where `promote` lived, then the
        slot's buffers and `demote`'s trade places. Every tier keeps its bytes; the copies run on the expert
        lane, and the layer's next `run` waits for them."""
        slot = self._slot(0)
        self.lane.wait(ready)
        self.lane.wait(slot.released)
        with self.lane.context():
            for part in ("up", "down"):
                coming, going = f"experts.{promote}.{part}.weight", f"experts.{demote}.{part}.weight"
                home = layer.experts.pop(coming)
                if isinstance(home, Handle):  # plain: the resident is a tensor of the layer's GPU weights
                    gpu, into = layer.resident.pop(going), getattr(slot, part)
                    self._trade(slot, part, gpu, home, into)
                    layer.resident[coming] = into
                    setattr(slot, part, gpu)
                else:  # packed: the resident is a packed handle whose parts live on the device
                    resident = layer.experts.pop(going)
                    if part not in slot.packed:
                        slot.packed[part] = home.empty_on(self.device)
                    into = slot.packed[part]
                    freed = {k: piece.data for k, piece in resident.parts.items()}
                    for k, piece in home.parts.items():
                        self._trade(slot, f"{part}.{k}", freed[k], piece, getattr(into, k))
                        resident.parts[k].data = getattr(into, k)
                    slot.packed[part] = CompressedTensor(data=freed["data"], scale=freed["scale"],
                                                         min=freed["min"], shape=into.shape, dtype=into.dtype,
                                                         config=into.config)
                    layer.experts[coming] = resident
                layer.experts[going] = home
            slot.loaded = self.lane.record()
        self._swapped[id(layer.experts)] = slot.loaded

    def _trade(self, slot: _Slot, key: str, gpu: torch.Tensor, home: Handle, into: torch.Tensor) -> None:
        """`into` (on the device) receives what `home` stores, then `home` stores `gpu`: the order of one lane
        (and of the slot's staging buffer) keeps the second copy from overwriting before the first has read."""
        staging = self._staging(slot, key, home)
        self.tiers.read_rows(home, into, 0, home.shape[0], staging)
        self.tiers.write_rows(home, gpu, 0, home.shape[0], staging)

    def _held(self, offloaded: dict, e: int) -> int | None:
        """The slot holding expert e of the layer whose off-GPU experts are `offloaded`, or None."""
        return next((s for s, slot in enumerate(self._slots) if slot.holds == (id(offloaded), e)), None)

    def _plan(self, offloaded: dict, experts: list[int]) -> list[tuple[int, bool]]:
        """(slot, whether it is copied) for each expert to run from a slot, held ones first: a held expert runs
        from its slot, the others are copied into the slots no held expert of this batch needs (empty ones first,
        then the least recently used), then in turn into those once their held expert has run."""
        steps: list[tuple[int, bool]] = []
        for e in experts:
            held = self._held(offloaded, e)
            if held is None:
                break
            steps.append((held, False))
        taken = [s for s, _ in steps]
        order = sorted((s for s in range(self.slots) if s not in taken), key=self._eviction_order) + taken
        steps += [(order[n % len(order)], True) for n in range(len(experts) - len(steps))]
        for s, _ in steps:
            self._tick += 1
            self._used[s] = self._tick
        return steps

    def _eviction_order(self, s: int) -> tuple[bool, bool, int]:
        """Free slots that exist first, then new ones (allocated only when needed), then the least recently
        used held one."""
        return s < len(self._slots) and self._slots[s].holds is not None, s >= len(self._slots), \
            self._used.get(s, -1)

    def _slot(self, n: int) -> _Slot:
        while len(self._slots) <= n:
            m, d = self.cfg.moe_intermediate_size, self.cfg.hidden_size
            staging = {"up": None, "down": None}
            self._slots.append(_Slot(torch.empty((2 * m, d), dtype=self.dtype, device=self.device),
                                     torch.empty((d, m), dtype=self.dtype, device=self.device), staging))
        return self._slots[n]

    def _load(self, n: int, offloaded: dict, e: int):
        """Copy expert e into slot n on the expert lane (packed ones cross packed and are unpacked there);
        returns the copy's event."""
        slot = self._slot(n)
        self.lane.wait(slot.released)
        with self.lane.context():
            for part, dst in (("up", slot.up), ("down", slot.down)):
                h = offloaded[f"experts.{e}.{part}.weight"]
                if isinstance(h, Handle):
                    self.tiers.read_rows(h, dst, 0, h.shape[0], self._staging(slot, part, h))
                    continue
                packed = _packed_on(h, self.device)
                if packed is None:
                    if part not in slot.packed:
                        slot.packed[part] = h.empty_on(self.device)
                    packed = slot.packed[part]
                    for k, piece in h.parts.items():
                        self.tiers.read_rows(piece, getattr(packed, k), 0, piece.shape[0],
                                             self._staging(slot, f"{part}.{k}", piece))
                decompress(packed, out=dst)
            slot.loaded = self.lane.record()
        slot.holds = (id(offloaded), e)
        return slot.loaded

    def _staging(self, slot: _Slot, key: str, h: Handle) -> torch.Tensor | None:
        """The slot's pinned buffer for a disk read of `h` (None for a tensor in host memory)."""
        if h.tier is not Tier.DISK:
            return None
        if slot.loaded is not None:  # the staging buffer's last copy must be done before it is refilled
            slot.loaded.synchronize()
        if slot.staging.get(key) is None:
            slot.staging[key] = self.tiers.empty_cpu(h.shape, h.dtype)
        return slot.staging[key]

    def _on_host(self, offloaded: dict[str, Handle], e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on the CPU where its weights are (read from disk first if they live there), over the tokens
        `x` already in host memory; the output stays there."""
        w = {f"{p}.weight": self._host_tensor(offloaded[f"experts.{e}.{p}.weight"]) for p in ("up", "down")}
        return expert_mlp(w, "", x.to(w["up.weight"].dtype))

    def _host_tensor(self, h) -> torch.Tensor:
        """A weight in host memory, read from disk or unpacked first when it has to be."""
        if not isinstance(h, Handle):  # packed: its parts in host memory, then unpacked on the CPU
            parts = {k: self._host_tensor(piece) for k, piece in h.parts.items()}
            return decompress(CompressedTensor(data=parts["data"], scale=parts["scale"], min=parts["min"],
                                               shape=torch.Size(h.shape), dtype=h.dtype, config=h.config))
        if h.data is not None:
            return h.data
        buf = torch.empty(h.shape, dtype=h.dtype)
        self.tiers.disk.read_into(h.path, buf)
        return buf


def _packed_on(h, device: torch.device) -> CompressedTensor | None:
    """A packed expert weight whose parts all live on `device`, as one tensor (else None, plain ones too)."""
    return None if h is None or isinstance(h, Handle) else h.on_device(device)


class ExpertWeights(dict):
    """A decoder layer's weights on the compute device that also runs its off-GPU experts: the `run_experts`
    hook `flexserve.models.moe` looks for."""

    def __init__(self, on_device, streamer: ExpertStreamer, offloaded: dict[str, Handle]):
        super().__init__(on_device)
        self.streamer, self.offloaded = streamer, offloaded

    def run_experts(self, work: ExpertWork) -> list[torch.Tensor]:
        return self.streamer.run(self, self.offloaded, work)
