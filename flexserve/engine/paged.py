"""Paged KV cache for the serving engine: block pools on the device and in pinned host memory, and block
swaps between the two pools.

The pools hold every layer: [L, 2 (K/V), num_blocks, block_size, Hkv, hd]. A token at position p of a
sequence lives in slot `table[p // block_size] * block_size + p % block_size` of its layer's pool; attention
through the block tables is in `paged_batch.py`.

Swaps move whole blocks of every layer at once. On CUDA they run on a copy stream from pinned staging
memory, without blocking the host: the compute stream waits on the copy event, and the host-side scatter of
swapped-out blocks is finished at the start of the next step. Copies the scheduler marks "ahead" are issued
after this step's forward is queued, so they overlap its compute (the engine's `_execute`).
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..memory.pinned import pinned_empty


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
        cpu_shape = (cfg.num_layers, 2, num_cpu_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.cpu = pinned_empty(cpu_shape, dtype, pin=device.type == "cuda", zeroed=True, device=device)
        self.is_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._pending: list[tuple[object, torch.Tensor | None, torch.Tensor | None]] = []

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
        far. With `wait`, the copies are complete (host side) or ordered before later compute (device side)
        when this returns; otherwise they are left in flight until `finish_pending()`.
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
            staged_out = None
            if out_pairs:
                g = torch.tensor([p[0] for p in out_pairs], device=self.device)
                staged_out = torch.empty((*self.gpu.shape[:2], len(out_pairs), *self.gpu.shape[3:]),
                                         dtype=self.gpu.dtype, pin_memory=True)
                staged_out.copy_(self.gpu.index_select(2, g), non_blocking=True)
            if in_pairs:
                c = torch.tensor([p[0] for p in in_pairs])
                staged_in = torch.empty((*self.cpu.shape[:2], len(in_pairs), *self.cpu.shape[3:]),
                                        dtype=self.cpu.dtype, pin_memory=True)
                torch.index_select(self.cpu, 2, c, out=staged_in)
                g = torch.tensor([p[1] for p in in_pairs], device=self.device)
                self.gpu.index_copy_(2, g, staged_in.to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self.stream)
        cpu_idx = torch.tensor([p[1] for p in out_pairs]) if out_pairs else None
        self._pending.append((event, staged_out, cpu_idx))
        if wait:
            self.finish_pending()

    def order_before_compute(self) -> None:
        """Make the compute stream wait for the copies in flight (no host wait)."""
        for event, _, _ in self._pending:
            torch.cuda.current_stream(self.device).wait_event(event)

    def finish_pending(self) -> None:
        """Complete every swap in flight: host-side scatter of swapped-out blocks; compute waits for swap-ins."""
        for event, staged_out, cpu_idx in self._pending:
            torch.cuda.current_stream(self.device).wait_event(event)
            if staged_out is not None:
                event.synchronize()
                self.cpu.index_copy_(2, cpu_idx, staged_out)
        self._pending.clear()

    def _swap_sync(self, out_pairs, in_pairs) -> None:
        if out_pairs:
            g = torch.tensor([p[0] for p in out_pairs])
            self.cpu.index_copy_(2, torch.tensor([p[1] for p in out_pairs]), self.gpu.index_select(2, g))
        if in_pairs:
            c = torch.tensor([p[0] for p in in_pairs])
            self.gpu.index_copy_(2, torch.tensor([p[1] for p in in_pairs]), self.cpu.index_select(2, c))
