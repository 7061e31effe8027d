"""Paged KV cache for the serving engine: block pools on the device and in pinned host memory, the
attention that reads through block tables, and block swaps between the two pools.

The pools hold every layer: [L, 2 (K/V), num_blocks * block_size, Hkv, hd]. A token at position p of a
sequence lives in slot `table[p // block_size] * block_size + p % block_size`. Attention gathers a sequence's
keys through its slots and runs the same SDPA as the dense path (`attend_over`), so the math is shared; the
gather costs one extra read of the context, which is the price of a portable (CPU and GPU) paged path.

Swaps move whole blocks of every layer at once. On CUDA they run on a copy stream from pinned staging
memory, without blocking the host: the compute stream waits on the copy event, and the host-side scatter of
swapped-out blocks is finished at the start of the next step. Copies the scheduler marks "ahead" are still
ordered before this step's compute; letting them overlap it is future work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..models.attention import attend_over, causal_mask


class PagedKV:
    """The two block pools and the copies between them."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, num_gpu_blocks: int,
                 num_cpu_blocks: int, block_size: int):
        self.block_size = block_size
        self.device = device
        shape = (cfg.num_layers, 2, num_gpu_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.gpu = torch.zeros(shape, dtype=dtype, device=device)
        cpu_shape = (cfg.num_layers, 2, num_cpu_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.cpu = torch.zeros(cpu_shape, dtype=dtype, pin_memory=device.type == "cuda")
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
    def swap(self, out_pairs: list[tuple[int, int]], in_pairs: list[tuple[int, int]], wait: bool) -> None:
        """Copy blocks device->host (out_pairs: (gpu, cpu)) then host->device (in_pairs: (cpu, gpu)).

        With `wait`, the copies are complete (host side) or ordered before later compute (device side) when
        this returns; otherwise they are left in flight until `finish_pending()`.
        """
        if not out_pairs and not in_pairs:
            return
        if not self.is_cuda:
            self._swap_sync(out_pairs, in_pairs)
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # blocks written by earlier steps are complete before we read them
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


@dataclass
class SeqChunk:
    """Tokens [start, start + len(token_ids)) of one sequence, computed this step."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool


@dataclass
class PagedBatch:
    """Flattened tokens of one step (decodes first, then prompt chunks) and the index tensors to attend."""

    ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    slots: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int
    decode_gather: torch.Tensor | None = None  # [Bd, Lmax] slots of each decode sequence's context
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, Lmax]
    chunks: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)  # (offset, n, start, gather)
    sample_rows: torch.Tensor | None = None  # [Ns] rows of T whose logits are sampled
    sampled: list[int] = field(default_factory=list)  # index in the input `seqs` of each sampled row, in order

    @classmethod
    def build(cls, seqs: list[SeqChunk], block_size: int, device: torch.device) -> "PagedBatch":
        def slots_of(table: list[int], lo: int, hi: int) -> list[int]:
            return [table[p // block_size] * block_size + p % block_size for p in range(lo, hi)]

        ids, pos, slots, sample_rows, sampled = [], [], [], [], []
        order = [i for i, s in enumerate(seqs) if len(s.token_ids) == 1] + \
                [i for i, s in enumerate(seqs) if len(s.token_ids) != 1]
        decodes = [seqs[i] for i in order if len(seqs[i].token_ids) == 1]
        chunks = [seqs[i] for i in order if len(seqs[i].token_ids) != 1]
        for i in order:
            s = seqs[i]
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            pos.extend(range(s.start, s.start + n))
            slots.extend(slots_of(s.block_table, s.start, s.start + n))
            if s.sample:
                sample_rows.append(len(ids) - 1)
                sampled.append(i)
        batch = cls(torch.tensor([ids], device=device), torch.tensor([pos], device=device),
                    torch.tensor(slots, device=device), len(decodes),
                    sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device), sampled=sampled)
        if decodes:
            lmax = max(s.start + 1 for s in decodes)
            gather = torch.zeros(len(decodes), lmax, dtype=torch.long)
            mask = torch.zeros(len(decodes), lmax, dtype=torch.bool)
            for i, s in enumerate(decodes):
                ctx = s.start + 1
                gather[i, :ctx] = torch.tensor(slots_of(s.block_table, 0, ctx))
                mask[i, :ctx] = True
            batch.decode_gather = gather.to(device)
            batch.decode_mask = mask[:, None, None, :].to(device)
        offset = len(decodes)
        for s in chunks:
            n = len(s.token_ids)
            gather = torch.tensor(slots_of(s.block_table, 0, s.start + n), device=device)
            batch.chunks.append((offset, n, s.start, gather))
            offset += n
        return batch


def paged_attend(kv_slots: torch.Tensor, batch: PagedBatch):
    """The attend(q, k, v) callable of `decoder_layer` for one layer's pool ([2, slots, Hkv, hd])."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [1, T, H, hd]; k, v: [1, T, Hkv, hd]
        kv_slots[0].index_copy_(0, batch.slots, k[0])
        kv_slots[1].index_copy_(0, batch.slots, v[0])
        outs = []
        nd = batch.num_decode
        if nd:
            keys = kv_slots[0][batch.decode_gather].transpose(1, 2)  # [Bd, Hkv, Lmax, hd]
            values = kv_slots[1][batch.decode_gather].transpose(1, 2)
            outs.append(attend_over(q[0, :nd, None], keys, values, batch.decode_mask)[:, 0])  # [Bd, H*hd]
        for offset, n, start, gather in batch.chunks:
            keys = kv_slots[0][gather].transpose(0, 1)[None]  # [1, Hkv, L, hd]
            values = kv_slots[1][gather].transpose(0, 1)[None]
            mask = causal_mask(start, n, q.device) if start else None
            outs.append(attend_over(q[:, offset:offset + n], keys, values, mask, causal=start == 0)[0])
        return torch.cat(outs, 0)[None]
    return attend
