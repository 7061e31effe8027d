"""The zig-zag block executor: one loop for resident and offloaded execution, prefill and decode.

A block is `num_gpu_batches` GPU batches. For every pseudo-layer j (embed, decoders, head) the executor waits
for j's weights, starts loading j+1's weights, then runs every GPU batch k through layer j (FlexGen's zig-zag
order: a layer's weights cross PCIe once per block, not once per batch). Around each (j, k) the KV cache of
batch k+1 is loaded ahead and the cache slice written by batch k is stored behind.

Three activities overlap: loads run on a loader thread issuing copies on a load stream, stores on a store
thread with a store stream, compute on the caller's thread and the current stream; CUDA events order the
streams, futures order the threads. With `overlap=False` everything runs inline and in order (the debug mode).
On a CPU compute device the "GPU" tier is the device's own memory and the copies are real memcpys, so CI
exercises the same placement, staging and ordering logic.

When the cache lives on the CPU and `cpu_cache_compute` is set, decode attention runs on the CPU where the
cache is: only the new token's q/k/v and the attention output cross PCIe.

The walk over the layers is the shared `flexserve.models.forward`; this module supplies its block schedule
(`_BlockSchedule`). It is one module, past the usual size, on purpose: the weight slots, the cache slots, the
two I/O threads and the schedule all order themselves through the same lanes, events and futures.
"""
from __future__ import annotations

import collections
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..errors import PolicyError
from ..memory.streams import Lane, current_record, current_wait
from ..memory.tiers import Handle, Tier, Tiers, slot_tier
from ..models.attention import AttnMeta, dense_attend, dense_attention
from ..models.forward import ALL_POSITIONS, LAST_POSITION, Batch, Decoders, forward
from ..models.layers import attention_in, attention_out, decoder_layer, embed, rope_inv_freq
from ..weights import WeightSource
from ..compression import CompressedTensor, CompressionConfig, compress_into, decompress
from ..compression.kv import is_fp8, kv_storage_dtype
from .experts import ExpertStreamer, ExpertWeights, expert_slots, prefetches_next_layer
from .placement import CompressedHandle, PseudoLayer, place_weights
from .quantized import QuantHandle, layer_quantizer
from .policy import Policy


PREFETCH_DEPTH = 2  # layers whose weights load while the current one computes (decoders need depth+1 slots)


class _Inline:
    """A stand-in for a one-thread pool that runs each task at once (overlap off)."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


@dataclass
class _Sync:
    """What must have happened before a buffer may be touched: a thread's future and/or a stream event."""

    future: Future | None = None
    event: object = None

    def wait_host(self) -> None:
        if self.future is not None:
            self.future.result()

    def stream_event(self):
        """Host-wait the future; the event that marks the device-side work (the future's result if unset)."""
        self.wait_host()
        return self.event if self.event is not None or self.future is None else self.future.result()

    def wait_on(self, lane: Lane | None) -> None:
        """Host-wait the future, then make `lane` (or the current stream if None) wait for the event."""
        ev = self.stream_event()
        if ev is not None:
            lane.wait(ev) if lane is not None else current_wait(ev)


@dataclass
class _CacheSlot:
    """A GPU staging buffer for the K/V of one (layer, batch) whose cache lives off the GPU."""

    k: torch.Tensor
    v: torch.Tensor
    released: _Sync = field(default_factory=_Sync)
    packed: list | None = None  # compressed cache: packed K and V buffers on the GPU, and pinned part staging


@dataclass
class BatchState:
    """One GPU batch of a block: its caches per layer and its attention metadata."""

    size: int
    k: list[Handle]
    v: list[Handle]
    cache_tiers: list[Tier]
    seq_dims: list[int]  # 0: [S, B, H, D] (streamed caches); 2: [B, H, S, D] (caches CPU attention reads)
    meta: AttnMeta | None = None
    stored: dict[int, _Sync] = field(default_factory=dict)  # layer -> last store of this batch's cache


@dataclass
class BlockState:
    batches: list[BatchState]
    max_len: int
    length: int = 0  # tokens in the cache so far


class OffloadExecutor:
    """Runs a model under a `Policy` on one compute device (see module docstring)."""

    def __init__(self, source: WeightSource, policy: Policy, device: torch.device | str, dtype: torch.dtype,
                 offload_dir: str | None = None, progress: bool = False):
        self.cfg: ModelConfig = source.config
        if policy.attn_sparsity < 1:
            raise PolicyError("sparse attention (attn_sparsity < 1) is not supported; use 1.0")
        if policy.compress_cache and policy.cpu_cache_compute:
            raise PolicyError("--compress-cache and --cpu-cache-compute do not combine: CPU attention reads the "
                              "host cache in place, uncompressed")
        self.policy = policy
        self.device = torch.device(device)  # an indexed GPU (resolve_device): packed weights compare by it
        self.dtype = dtype
        self.cpu_attention_dtype = (getattr(torch, policy.cpu_attention_dtype) if policy.cpu_attention_dtype
                                    else dtype)
        # the KV cache's storage on every tier and in the GPU slots: e4m3 with --kv-cache-dtype fp8
        self.cache_dtype = kv_storage_dtype(policy.kv_cache_dtype, dtype)
        if self.cache_dtype != dtype:
            self.cpu_attention_dtype = self.cache_dtype  # CPU attention reads the fp8 cache, upcast per block
        self.tiers = Tiers(self.device, offload_dir, pin=policy.pin_weight)
        self.layers: list[PseudoLayer] = place_weights(source, policy, self.tiers, dtype, progress,
                                                       layer_quantizer(policy, source, self.device, dtype))
        self.inv_freq = rope_inv_freq(self.cfg).to(self.device) if self.cfg.positional == "rope" else None
        self.experts = ExpertStreamer(self.cfg, self.tiers, self.device, dtype, policy.expert_compute,
                                      overlap=policy.overlap, slots=expert_slots(self.cfg, policy),
                                      ahead=prefetches_next_layer(self.cfg, policy))
        separate = policy.overlap
        self.load_lane = Lane(self.device, separate)
        self.store_lane = Lane(self.device, separate)
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="flexserve-load") if separate else _Inline()
        self.storer = ThreadPoolExecutor(1, thread_name_prefix="flexserve-store") if separate else _Inline()
        self._wslots: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], _Sync]] = {}
        self._cslots: dict[tuple[int, int], list[_CacheSlot]] = {}  # per (batch size, layout), double-buffered
        self._cache_staging: dict[tuple[int, int], torch.Tensor | None] = {}
        self._pending: dict[int, Future] = {}
        self._pinned_bufs: dict[str, torch.Tensor] = {}
        self._staging_busy: dict[str, object] = {}  # weight slot -> event of its last copy out of staging
        self._act_handles: dict[tuple, Handle] = {}
        self.timers: collections.Counter = collections.Counter()  # host seconds by activity (for profiles)
        for layer in self.layers:  # the GPU slots of streamed weights now, before anyone sizes a KV pool
            if layer.streamed:
                self._weight_slot(layer)

    # --- weights ---------------------------------------------------------------------------------------------
    def _weight_slot(self, layer: PseudoLayer):
        key = layer.slot_key
        if key not in self._wslots:
            gpu = {n: h.empty_on(self.device) if isinstance(h, QuantHandle) else
                   torch.empty(h.shape, dtype=h.dtype, device=self.device) for n, h in layer.streamed.items()}
            stage: dict[str, object] = {}
            for n, h in layer.streamed.items():
                if isinstance(h, QuantHandle):  # the slot is the quantised weight itself; disk parts stage
                    stage[n] = {k: self.tiers.empty_cpu(p.shape, p.dtype) for k, p in h.parts.items()
                                if p.tier is Tier.DISK}
                elif isinstance(h, CompressedHandle):  # packed buffers on the GPU (+ pinned staging for disk)
                    stage[n] = (h.empty_on(self.device), {k: self.tiers.empty_cpu(p.shape, p.dtype)
                                                          for k, p in h.parts.items() if p.tier is Tier.DISK})
                elif h.tier is Tier.DISK:
                    stage[n] = self.tiers.empty_cpu(h.shape, h.dtype)
            self._wslots[key] = (gpu, stage, _Sync())
        return self._wslots[key]

    def _load_weights(self, j: int):
        """Loader-thread task: copy layer j's offloaded tensors into its GPU slot; returns the load event."""
        layer = self.layers[j]
        gpu, stage, released = self._weight_slot(layer)
        released.wait_on(self.load_lane)
        previous = self._staging_busy.pop(layer.slot_key, None)
        if previous is not None and stage:  # the last copy out of this slot's pinned staging must be done
            previous.synchronize()
        with self.load_lane.context():
            for name, h in layer.streamed.items():
                if isinstance(h, CompressedHandle):  # move the packed bytes, then unpack on the GPU
                    packed = h.on_device(self.device)
                    if packed is None:
                        packed, staging = stage[name]
                        for k, part in h.parts.items():
                            self.tiers.read_rows(part, getattr(packed, k), 0, part.shape[0], staging.get(k))
                    decompress(packed, out=gpu[name])
                elif isinstance(h, QuantHandle):  # the quantised bytes cross and stay quantised
                    slot = gpu[name].tensor_fields()
                    for k, part in h.parts.items():
                        self.tiers.read_rows(part, slot[k], 0, part.shape[0], stage[name].get(k))
                else:
                    self.tiers.read_rows(h, gpu[name], 0, h.shape[0], stage.get(name))
            event = self.load_lane.record()
            if event is not None:
                self._staging_busy[layer.slot_key] = event
            return event

    def _prefetch(self, j: int) -> None:
        if j < len(self.layers) and j not in self._pending and self.layers[j].streamed:
            self._pending[j] = self.loader.submit(self._load_weights, j)

    def _weights(self, j: int) -> dict[str, torch.Tensor]:
        layer = self.layers[j]
        if not layer.streamed:
            return layer.resident
        self._prefetch(j)
        t0 = time.perf_counter()
        current_wait(self._pending.pop(j).result())
        self.timers["wait_loader_thread_s"] += time.perf_counter() - t0
        gpu, _, _ = self._weight_slot(layer)
        return {**layer.resident, **gpu}

    def _release_weights(self, j: int) -> None:
        layer = self.layers[j]
        if layer.streamed:
            self._weight_slot(layer)[2].event = current_record(self.device)

    # --- KV cache --------------------------------------------------------------------------------------------
    def cache_tier(self, layer: int, batch: int, num_batches: int) -> Tier:
        """Layer-granular cache placement: the midpoint rule over (layer, batch) positions of the block."""
        p = self.policy
        return slot_tier(layer * num_batches + batch, self.cfg.num_layers * num_batches, p.cache_gpu_percent,
                         p.cache_cpu_percent)

    def _cache_shape(self, b: int, max_len: int, seq_dim: int) -> tuple[int, ...]:
        h, d = self.cfg.num_kv_heads, self.cfg.head_dim
        return (max_len, b, h, d) if seq_dim == 0 else (b, h, max_len, d)

    def new_block(self, batch_sizes: list[int], max_len: int) -> BlockState:
        """Allocate the caches of a block whose sequences will hold at most `max_len` tokens."""
        cfg, batches = self.cfg, []
        for k, b in enumerate(batch_sizes):
            tiers = [self.cache_tier(j, k, len(batch_sizes)) for j in range(cfg.num_layers)]
            dims = [2 if self.policy.cpu_cache_compute and t is Tier.CPU else 0 for t in tiers]
            ks, vs = [], []
            for j, (t, sd) in enumerate(zip(tiers, dims)):
                shape = self._cache_shape(b, max_len, sd)
                dtype = self.cpu_attention_dtype if sd == 2 else self.cache_dtype
                ks.append(self._alloc_cache(t, shape, f"k{j}.{k}", dtype))
                vs.append(self._alloc_cache(t, shape, f"v{j}.{k}", dtype))
            batches.append(BatchState(b, ks, vs, tiers, dims))
        keys = {(bs.size, bs.seq_dims[j]) for bs in batches for j in range(cfg.num_layers)
                if self._needs_slot(bs, j, 2)}
        for key in keys:
            shape = self._cache_shape(key[0], max_len, key[1])
            if key not in self._cslots or tuple(self._cslots[key][0].k.shape) != shape:
                self._cslots[key] = [_CacheSlot(torch.empty(shape, dtype=self.cache_dtype, device=self.device),
                                                torch.empty(shape, dtype=self.cache_dtype, device=self.device),
                                                packed=self._packed_buffers(shape)) for _ in range(2)]
                staged = self.policy.cache_disk_percent > 0 or (key[1] == 2 and self.device.type == "cuda")
                self._cache_staging[key] = self.tiers.empty_cpu((2, 2, *shape), self.cache_dtype) if staged else None
        return BlockState(batches, max_len)

    def _cache_compression(self) -> CompressionConfig:
        return CompressionConfig(num_bits=self.policy.comp_num_bits, group_size=self.policy.comp_group_size)

    def _alloc_cache(self, tier: Tier, shape: tuple[int, ...], name: str, dtype: torch.dtype):
        """Cache storage on a tier; off the GPU with `compress_cache` it is kept group-wise quantised (groups
        run along head_dim, so a range of positions stays a contiguous range of rows)."""
        if not self.policy.compress_cache or tier is Tier.GPU:
            return self.tiers.allocate(tier, shape, dtype, name)
        empty = CompressedTensor.empty(shape, self.dtype, self._cache_compression())
        parts = {p: self.tiers.allocate(tier, tuple(getattr(empty, p).shape), getattr(empty, p).dtype, f"{name}.{p}")
                 for p in ("data", "scale", "min")}
        return CompressedHandle(parts, shape, self.dtype, self._cache_compression())

    def _packed_buffers(self, shape: tuple[int, ...]) -> list | None:
        if not self.policy.compress_cache:
            return None
        out = []
        for _ in range(2):  # K and V
            packed = CompressedTensor.empty(shape, self.dtype, self._cache_compression(), device=self.device)
            stage = {p: self.tiers.empty_cpu(tuple(getattr(packed, p).shape), getattr(packed, p).dtype)
                     for p in ("data", "scale", "min")}
            out.append((packed, stage))
        return out

    def release_block(self, state: BlockState) -> None:
        """Free a finished block's caches: wait for stores in flight, then delete its disk files."""
        for bs in state.batches:
            for li in list(bs.stored):
                self._await_store(bs, li)
            for h in bs.k + bs.v:
                parts = h.parts.values() if isinstance(h, CompressedHandle) else [h]
                for part in parts:
                    if part.path is not None:
                        try:
                            os.remove(part.path)
                        except FileNotFoundError:
                            pass
            bs.k.clear()
            bs.v.clear()

    def _cpu_attends(self, batch: BatchState, j: int, num_new: int) -> bool:
        return self.policy.cpu_cache_compute and batch.cache_tiers[j] is Tier.CPU and num_new == 1

    def _needs_slot(self, batch: BatchState, j: int, num_new: int) -> bool:
        return batch.cache_tiers[j] is not Tier.GPU and not self._cpu_attends(batch, j, num_new)

    def _slot(self, batch: BatchState, j: int, slot_index: int) -> tuple[_CacheSlot, torch.Tensor | None]:
        key = (batch.size, batch.seq_dims[j])
        stage = self._cache_staging.get(key)
        return self._cslots[key][slot_index], stage if stage is None else stage[slot_index]

    def _load_cache(self, batch: BatchState, j: int, slot_index: int, length: int) -> object:
        """Loader-thread task: bring the first `length` cached tokens of (j, batch) into a GPU slot."""
        slot, stage = self._slot(batch, j, slot_index)
        slot.released.wait_on(self.load_lane)
        if j in batch.stored:
            batch.stored[j].wait_on(self.load_lane)
        with self.load_lane.context():
            for which, (h, dst) in enumerate(((batch.k[j], slot.k), (batch.v[j], slot.v))):
                if isinstance(h, CompressedHandle):  # packed rows cross, then unpack on the device
                    if length:
                        packed, pstage = slot.packed[which]
                        for p, part in h.parts.items():
                            self.tiers.read_rows(part, getattr(packed, p), 0, length, pstage[p])
                        decompress(packed.narrow(0, 0, length), out=dst[:length])
                    continue
                self.tiers.read_rows(h, dst, 0, length, None if stage is None else stage[which],
                                     dim=batch.seq_dims[j])
            return self.load_lane.record()

    def _store_cache(self, batch: BatchState, j: int, slot_index: int, lo: int, hi: int, ready) -> object:
        """Store-thread task: write tokens [lo, hi) of (j, batch) from its GPU slot back to their tier."""
        slot, stage = self._slot(batch, j, slot_index)
        self.store_lane.wait(ready)
        with self.store_lane.context():
            for which, (h, src) in enumerate(((batch.k[j], slot.k), (batch.v[j], slot.v))):
                if isinstance(h, CompressedHandle):  # quantise the new rows on the device, move packed bytes
                    packed, pstage = slot.packed[which]
                    compress_into(src[lo:hi], packed.narrow(0, lo, hi - lo))
                    for p, part in h.parts.items():
                        self.tiers.write_rows(part, getattr(packed, p), lo, hi, pstage[p])
                    continue
                self.tiers.write_rows(h, src, lo, hi, None if stage is None else stage[which],
                                      dim=batch.seq_dims[j])
            return self.store_lane.record()

    # --- one forward over the block --------------------------------------------------------------------------
    def forward(self, state: BlockState, ids: list[torch.Tensor], positions: list[torch.Tensor],
                key_valid: list[torch.Tensor | None], all_logits: bool = False) -> list[torch.Tensor]:
        """Run new tokens of every batch of the block through the model; returns logits per batch.

        ids/positions: [b, S] per batch (S new tokens each, the same S for the whole block); key_valid: [b, L]
        validity of every cache position so far including the new ones, or None when nothing is padded.
        Logits are [b, V] (last position) or [b, S, V] with `all_logits`.
        """
        s = ids[0].shape[1]
        start = state.length
        if start + s > state.max_len:
            raise ValueError(f"block cache holds {state.max_len} tokens; asked for {start + s}")
        batches = []
        for bs, i, pos, kv in zip(state.batches, ids, positions, key_valid):
            bs.meta = AttnMeta(start, s, kv)
            batches.append(Batch(i, pos.to(self.device)))
        logits = forward(self, batches, _BlockSchedule(self, state, s), ALL_POSITIONS if all_logits else LAST_POSITION)
        state.length = start + s
        return logits

    def stream_layers(self):
        """Yield (pseudo-layer, its weights on the compute device) in order: the next layer's weights are
        already loading while the caller computes with these; the slot is released when the caller moves on.
        Every forward walks this stream (`flexserve.models.forward`): the block forward here, the serving
        engine's paged batches and the pipeline stages, so all of them can stream offloaded weights."""
        n = len(self.layers)
        for j, layer in enumerate(self.layers):
            w = self._weights(j)
            if layer.experts:  # a mixture of experts with experts off the GPU: they run by `ExpertStreamer`
                w = ExpertWeights(w, self.experts, layer.experts)
            for ahead in range(1, PREFETCH_DEPTH + 1):  # keep the load stream queued, never idle
                self._prefetch((j + ahead) % n)
            following = next((m for m in self.layers[j + 1:] + self.layers[:j + 1] if m.experts), None)
            if following is not None and following is not layer:  # the next layer's experts, ahead
                self.experts.prefetch(following.experts)
            yield layer, w
            self._release_weights(j)
            if layer.experts:  # every batch of the block has run the layer: its copied experts can go
                self.experts.release(layer.experts)
        self.experts.end_step(self.layers)  # between steps: the most routed experts may take the GPU's share

    def embed_batch(self, layer: PseudoLayer, w, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of ids [B, S]; a table left in host memory is read row by row (B*S rows cross PCIe)."""
        rows = None
        if layer.gathered:
            rows = layer.offloaded["embed.weight"].data[ids.cpu()].to(self.device, non_blocking=True)
        return embed(self.cfg, w, ids.to(self.device), positions.to(self.device), rows)

    def _decoder_over_batches(self, state: BlockState, li: int, w, hidden: list, batches: list[Batch],
                              act: "_Activations", s: int) -> None:
        """Decoder layer li over every GPU batch of the block, loading batch k+1's cache slot while batch k
        computes and storing the slice batch k wrote behind it."""
        blocks = state.batches
        if all(self._cpu_attends(bs, li, s) for bs in blocks):
            self._cpu_attention_layer(state, li, w, hidden, batches, act)
            return
        start = state.length
        pending: dict[int, tuple[int, Future]] = {}

        def schedule_load(k: int) -> None:
            if k < len(blocks) and self._needs_slot(blocks[k], li, s):
                idx = (li * len(blocks) + k) % 2
                pending[k] = (idx, self.loader.submit(self._load_cache, blocks[k], li, idx, start))

        schedule_load(0)
        for k, bs in enumerate(blocks):
            schedule_load(k + 1)
            x = act.get(k, hidden[k])
            rope = batches[k].rope
            if k in pending:
                idx, fut = pending.pop(k)
                current_wait(fut.result())
                slot, _ = self._slot(bs, li, idx)
                x = decoder_layer(self.cfg, w, x, rope, dense_attend(slot.k, slot.v, bs.meta, bs.seq_dims[li]))
                ready = current_record(self.device)
                fut = self.storer.submit(self._store_cache, bs, li, idx, start, start + s, ready)
                bs.stored[li] = slot.released = _Sync(future=fut)
            elif self._cpu_attends(bs, li, s):
                self._await_store(bs, li)
                x = decoder_layer(self.cfg, w, x, rope, self._cpu_attend(bs.k[li].data, bs.v[li].data, bs.meta))
            else:
                x = decoder_layer(self.cfg, w, x, rope, dense_attend(bs.k[li].data, bs.v[li].data, bs.meta,
                                                                     bs.seq_dims[li]))
            hidden[k] = act.put(k, x)

    def _cpu_attend(self, kc: torch.Tensor, vc: torch.Tensor, meta: AttnMeta):
        """FlexGen's CPU attention: the cache stays in host memory, only q/k/v and the output cross PCIe."""
        return lambda q, k, v: self._attend_on_host("one", self._qkv_to_host("one", q, k, v), kc, vc, meta)

    def _qkv_to_host(self, tag: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Copy q/k/v into reused pinned buffers; returns them and the event marking the copies done."""
        host = [self._pinned(f"attn{i}.{tag}", t).copy_(t, non_blocking=True) for i, t in enumerate((q, k, v))]
        return host, current_record(self.device)

    def _attend_on_host(self, tag: str, qkv_ready, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttnMeta) -> torch.Tensor:
        """Wait for q/k/v to land, attend on the CPU, send the output back (it arrives in stream order).

        Waiting on the q/k/v event also retires the previous output copy out of the same pinned buffer."""
        (qc, kc, vc), ev = qkv_ready
        t0 = time.perf_counter()
        if ev is not None:
            ev.synchronize()
        t1 = time.perf_counter()
        out = self._host_attention(qc, kc, vc, k_cache, v_cache, meta)
        self.timers["cpu_attn_wait_gpu_s"] += t1 - t0
        self.timers["cpu_attn_s"] += time.perf_counter() - t1
        return self._pinned(f"attn_out.{tag}", out).copy_(out).to(self.device, non_blocking=True)

    @staticmethod
    def _await_store(bs: BatchState, li: int) -> None:
        """The host is about to read (li, bs)'s cache in place: its last store must have fully landed."""
        pending = bs.stored.pop(li, None)
        event = pending.stream_event() if pending is not None else None
        if event is not None:
            event.synchronize()

    def _cpu_attention_layer(self, state: BlockState, li: int, w, hidden: list, batches: list[Batch],
                             act: "_Activations") -> None:
        """A decode layer whose caches all live in host memory, pipelined across the block's batches.

        Every batch's q/k/v projection is issued first and copied to pinned memory behind its own event; then
        each batch's attention runs on the CPU as soon as its q/k/v has arrived, while the GPU is already
        projecting later batches (and the load stream streams the next layers' weights)."""
        xs, ready = [], []
        for k, bs in enumerate(state.batches):
            self._await_store(bs, li)
            xs.append(act.get(k, hidden[k]))
            ready.append(self._qkv_to_host(str(k), *attention_in(self.cfg, w, xs[k], batches[k].rope)))
        for k, bs in enumerate(state.batches):
            attn = self._attend_on_host(str(k), ready[k], bs.k[li].data, bs.v[li].data, bs.meta)
            hidden[k] = act.put(k, attention_out(self.cfg, w, xs[k], attn))

    def _host_attention(self, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        """Decode attention on the CPU over a head-major host cache, in the cache's dtype; the result comes
        back in the model's dtype."""
        dt = self.dtype if is_fp8(k_cache) else k_cache.dtype  # an fp8 cache is upcast as it is read
        out = dense_attention(q.to(dt), k.to(dt), v.to(dt), k_cache, v_cache, meta, 2)
        return out.to(self.dtype)

    def _pinned(self, tag: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._pinned_bufs.get(tag)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._pinned_bufs[tag] = torch.empty(like.shape, dtype=like.dtype,
                                                       pin_memory=self.device.type == "cuda")
        return buf

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self.loader.shutdown(wait=True, cancel_futures=True)
        self.storer.shutdown(wait=True, cancel_futures=True)
        self.tiers.close()


class _BlockSchedule(Decoders):
    """The executor's decoder schedule for one forward over a block (see `_decoder_over_batches`); hidden
    states wait between layers on the tier the policy names (`_Activations`)."""

    def __init__(self, ex: OffloadExecutor, state: BlockState, num_new: int):
        self.ex, self.state, self.num_new = ex, state, num_new
        self.act = _Activations(ex, len(state.batches), num_new)

    def hold(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        return self.act.put(k, x)

    def fetch(self, k: int, held: torch.Tensor | None) -> torch.Tensor:
        return self.act.get(k, held)

    def run(self, index: int, w, hidden: list, batches) -> None:
        self.ex._decoder_over_batches(self.state, index, w, hidden, batches, self.act, self.num_new)


class _Activations:
    """Hidden states between layers, kept on the tier the policy names (stream-ordered copies, no host sync).

    The policy's activation shares size the prefill's hidden states (prompt length x hidden size per sequence);
    a decode step's are one token per sequence, 1/prompt_len of that, and stay on the compute device. Sending
    them away cost more than bytes: their copy back sits in the one host-to-device DMA queue behind the next
    layer's weights, so CPU attention waited for the whole weight transfer every layer (OPT-30B with FlexGen's
    policy: 28.5 tok/s with them moving, 41.0 with them resident; bench/RESULTS.md section 1)."""

    def __init__(self, ex: OffloadExecutor, num_batches: int, num_new: int):
        p = ex.policy
        self.ex = ex
        self.tier = [Tier.GPU if num_new == 1 else slot_tier(k, num_batches, p.act_gpu_percent, p.act_cpu_percent)
                     for k in range(num_batches)]
        self.handles = ex._act_handles  # reused across forwards (a disk handle is a file: never re-create it)
        self.current: dict[int, Handle] = {}

    def put(self, k: int, x: torch.Tensor) -> torch.Tensor:
        if self.tier[k] is Tier.GPU:
            return x
        key = (k, self.tier[k], tuple(x.shape), x.dtype)
        h = self.handles.get(key)
        if h is None:
            h = self.handles[key] = self.ex.tiers.allocate(self.tier[k], tuple(x.shape), x.dtype, f"act{k}")
        self.current[k] = h
        self.ex.tiers.write_rows(h, x, 0, x.shape[0], non_blocking=True)
        return None  # type: ignore[return-value]

    def get(self, k: int, x: torch.Tensor | None) -> torch.Tensor:
        if self.tier[k] is Tier.GPU:
            return x
        h = self.current[k]
        out = torch.empty(h.shape, dtype=h.dtype, device=self.ex.device)
        self.ex.tiers.read_rows(h, out, 0, h.shape[0], non_blocking=True)
        return out
