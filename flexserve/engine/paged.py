"""Paged KV cache for the serving engine: block pools on the device and in pinned host memory, and block
swaps between the two pools.

The pools hold every layer: [L, 2 (K/V), num_blocks, block_size, Hkv, hd]. A token at position p of a
sequence lives in slot `table[p // block_size] * block_size + p % block_size` of its layer's pool; attention
through the block tables is in `paged_batch.py`.

Swaps move whole blocks of every layer at once. On CUDA they run on a copy stream, without blocking the
host: the compute stream waits on the copy event. The host pool is block-major, so a swap is a device-side
gather plus one DMA copy per run of consecutive host blocks. Copies the scheduler marks "ahead" are issued
after this step's forward is queued, so they overlap its compute (`ModelRunner.execute`).
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..memory.pinned import pinned_empty, upload


class PagedKV:
    """The two block pools and the copies between them."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, num_gpu_blocks: int,
                 num_cpu_blocks: int, block_size: int):
        self.block_size = block_size
        self.device = device
        # One block more than the block manager hands out: the scratch block that padding rows of a
        # CUDA-graph batch write to and read from (see decode_graphs.py); no sequence ever owns it.
        self.scratch_block = num_gpu_blocks
        shape = (cfg.num_layers, 2, num_gpu_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.gpu = torch.zeros(shape, dtype=dtype, device=device)
        # Block-major on the host: each block is one contiguous run of memory, so a swap is a few large DMA
        # copies (consecutive blocks coalesce) instead of a copy per layer per block.
        cpu_shape = (num_cpu_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.cpu = pinned_empty(cpu_shape, dtype, pin=device.type == "cuda", zeroed=True, device=device)
        # Swaps move bytes: an fp8 pool is copied through uint8 views (index copies have no e4m3 kernels)
        self._dev, self._host = (self.gpu.view(torch.uint8), self.cpu.view(torch.uint8)) if dtype.itemsize == 1 \
            else (self.gpu, self.cpu)
        self.is_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.is_cuda else None
        # Copy events not yet ordered before compute. The device buffers of a swap need no keeping: they are
        # allocated on the copy stream, whose later work alone can reuse them, in order.
        self._pending: list[torch.cuda.Event] = []

    def layer_slots(self, layer: int) -> torch.Tensor:
        """[2, num_slots, Hkv, hd] view of one layer's device pool."""
        p = self.gpu[layer]
        return p.view(2, -1, *p.shape[-2:])

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cfg.num_layers * 2 * block_size * cfg.kv_size * torch.empty((), dtype=dtype).element_size()

    # --- swaps -----------------------------------------------------------------------------------------------
    def mark(self):
        """An event at the current point of the compute stream (None without CUDA), for `swap(after=...)`."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def swap(self, out_pairs: list[tuple[int, int]], in_pairs: list[tuple[int, int]], wait: bool,
             after=None) -> None:
        """Copy blocks device->host (out_pairs: (gpu, cpu)) then host->device (in_pairs: (cpu, gpu)).

        The copies start once the compute stream reaches `after` (a `mark()`), or everything queued on it so
        far. With `wait`, the copies are complete when this returns; otherwise they are ordered before the
        compute that `order_before_compute()` / `finish_pending()` releases. The host does no copying: the
        device gathers the blocks into one block-major buffer and DMA moves each run of consecutive host
        blocks in one piece, straight into (or out of) the pinned pool (a host-side gather of a long job's
        up to 256 MB of KV took tens of milliseconds of the engine loop per swap, bench/RESULTS.md 4b).
        """
        if not out_pairs and not in_pairs:
            return
        if not self.is_cuda:
            self._swap_sync(out_pairs, in_pairs)
            return
        if after is not None:  # blocks written by earlier steps are complete before we read them
            self.stream.wait_event(after)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            # Index tensors first, each with an asynchronous upload: a blocking one would make the host wait
            # for every copy already queued on this stream.
            out_pairs, in_pairs = sorted(out_pairs, key=lambda p: p[1]), sorted(in_pairs, key=lambda p: p[0])
            out_ids, in_ids = self._ids(out_pairs, 0), self._ids(in_pairs, 1)
            if out_pairs:
                staged = _gather_block_major(self._dev, out_ids)
                for i, j, c in _runs([p[1] for p in out_pairs]):
                    self._host[c:c + j - i].copy_(staged[i:j], non_blocking=True)
            if in_pairs:
                staged = torch.empty((len(in_pairs), *self._host.shape[1:]), dtype=self._dev.dtype,
                                     device=self.device)
                for i, j, c in _runs([p[0] for p in in_pairs]):
                    staged[i:j].copy_(self._host[c:c + j - i], non_blocking=True)
                self._dev.index_copy_(2, in_ids, _layer_major(staged))
            event = torch.cuda.Event()
            event.record(self.stream)
        self._pending.append(event)
        if wait:
            self.finish_pending(sync=True)

    def _ids(self, pairs: list[tuple[int, int]], which: int) -> torch.Tensor | None:
        if not pairs:
            return None
        return upload([p[which] for p in pairs], torch.long, self.device)

    def order_before_compute(self) -> None:
        """Make the compute stream wait for the copies in flight (no host wait)."""
        for event in self._pending:
            torch.cuda.current_stream(self.device).wait_event(event)

    def finish_pending(self, sync: bool = False) -> None:
        """Order every swap in flight before later compute; with `sync`, also wait for them on the host. The
        host never touches the pinned pool itself (every copy in or out of it runs on the copy stream, in
        order), so the engine loop does not wait: a host block reused by a later swap is ordered after this
        one on that stream."""
        for event in self._pending:
            torch.cuda.current_stream(self.device).wait_event(event)
            if sync:
                event.synchronize()
        self._pending.clear()

    def _swap_sync(self, out_pairs, in_pairs) -> None:
        if out_pairs:
            blocks = _gather_block_major(self._dev, torch.tensor([p[0] for p in out_pairs]))
            self._host.index_copy_(0, torch.tensor([p[1] for p in out_pairs]), blocks)
        if in_pairs:
            blocks = self._host.index_select(0, torch.tensor([p[0] for p in in_pairs]))
            self._dev.index_copy_(2, torch.tensor([p[1] for p in in_pairs]), _layer_major(blocks))


def _gather_block_major(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Blocks `ids` of a [L, 2, num_blocks, ...] pool as one contiguous [n, L, 2, ...] tensor (the host pool's
    layout), in a single gather: no second, permuted copy of a swap's worth of KV on the device."""
    return pool.permute(2, 0, 1, *range(3, pool.dim())).index_select(0, ids)


def _layer_major(blocks: torch.Tensor) -> torch.Tensor:
    """[n, L, 2, ...] -> a [L, 2, n, ...] view."""
    return blocks.permute(1, 2, 0, *range(3, blocks.dim()))


def _runs(ids: list[int]):
    """(start, end, first id) of each run of consecutive ids in a sorted list: one DMA copy per run."""
    i = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or ids[j] != ids[j - 1] + 1:
            yield i, j, ids[i]
            i = j
