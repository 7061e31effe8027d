"""CUDA graphs for the serving engine's decode-only steps.

A decode step of an 8B model at batch 256 is ~15 ms of GPU work but ~1,500 kernel launches from Python; eager
PyTorch spends ~45 ms on the host issuing them, so the GPU idles most of the step. A CUDA graph replays the
whole forward with one launch. Decode steps have a fixed shape once the batch is padded, so one graph per
batch-size bucket (1, 2, 4, 8, then multiples of 16 up to `max_num_seqs`) covers them; steps with prompt
chunks run eagerly (they are compute-bound, launches do not matter there).

Padding rows must not touch real data: the KV pool has one extra scratch block that no sequence owns; a
padding row writes its key there and attends to that one slot. Every input of the graph lives in a static
buffer that each replay overwrites; the paged-attention kernel reads block tables and context lengths from
device memory, so the captured graph is valid for any contexts that fit the table width.

`DecodeGraphs(..., capture=False)` runs the same padded static batch eagerly: the CPU tests check the
padding and buffer logic that way, and the device test compares captured graphs with the eager engine.
"""
from __future__ import annotations

from typing import Callable

import torch

from .paged_batch import PagedBatch, StreamingWindow


def buckets_for(max_batch: int) -> list[int]:
    """Padded batch sizes: small powers of two, then every multiple of 16, then `max_batch` itself."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_batch} | set(range(16, max_batch, 16)) | {max_batch}
    return sorted(sizes)


class DecodeGraphs:
    """Static buffers for up to `max_batch` decode rows and a captured graph per bucket."""

    def __init__(self, forward: Callable[[PagedBatch], torch.Tensor], max_batch: int, max_blocks: int,
                 block_size: int, scratch_block: int, device: torch.device, capture: bool = True,
                 streaming: StreamingWindow | None = None, inv_freq: torch.Tensor | None = None):
        self.forward = forward  # PagedBatch -> logits of every row [rows, vocab]
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.max_blocks = max_blocks
        self.buckets = buckets_for(max_batch)
        self.capture = capture
        self.device = device
        self.streaming, self.inv_freq = streaming, inv_freq  # a sliding window (StreamingLLM), as the eager steps
        i32 = dict(dtype=torch.int32, device=device)
        self.ids = torch.zeros(1, max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, max_batch, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), self.scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.full((max_batch, max_blocks), scratch_block, **i32)
        self.row_seq = torch.arange(max_batch, **i32)
        self.ctx_lens = torch.ones(max_batch, **i32)
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}  # bucket -> (graph, its logits)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def applies(self, batch: PagedBatch) -> bool:
        """Decode-only (every row a single token, no chunks) and within the largest bucket and table width."""
        rows = batch.slots.numel()
        return (not batch.chunks and batch.num_decode == rows and rows <= self.buckets[-1]
                and batch.block_tables.shape[1] <= self.max_blocks)

    def run(self, batch: PagedBatch) -> torch.Tensor:
        """Logits [rows, vocab] of a decode-only batch, through the graph of its bucket."""
        rows = batch.slots.numel()
        bucket = next(b for b in self.buckets if b >= rows)
        self._load(batch, rows, bucket)
        if not self.capture:
            return self.forward(self._static(bucket))[:rows]
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:rows]

    def _static(self, bucket: int) -> PagedBatch:
        return PagedBatch(ids=self.ids[:, :bucket], positions=self.positions[:, :bucket], slots=self.slots[:bucket],
                          block_tables=self.tables[:bucket], row_seq=self.row_seq[:bucket],
                          ctx_lens=self.ctx_lens[:bucket], block_size=self.block_size, num_decode=bucket,
                          streaming=self.streaming, inv_freq=self.inv_freq)

    def _load(self, batch: PagedBatch, rows: int, bucket: int) -> None:
        """Copy the step's inputs into the static buffers; rows past `rows` become scratch padding."""
        width = batch.block_tables.shape[1]
        self.ids[:, :rows].copy_(batch.ids)
        self.positions[:, :rows].copy_(batch.positions)
        self.slots[:rows].copy_(batch.slots)
        self.tables[:rows, :width].copy_(batch.block_tables)
        self.ctx_lens[:rows].copy_(batch.ctx_lens)
        if bucket > rows:
            self._pad(rows, bucket)

    def _pad(self, lo: int, hi: int) -> None:
        """Rows [lo, hi) become padding: one token at position 0 whose KV goes to the scratch block."""
        self.ids[:, lo:hi].zero_()
        self.positions[:, lo:hi].zero_()
        self.slots[lo:hi].fill_(self.scratch_slot)
        self.tables[lo:hi, 0].fill_(self.scratch_block)
        self.ctx_lens[lo:hi].fill_(1)

    def capture_all(self) -> None:
        """Capture every bucket now, at start-up, so that no request waits for a kernel compile or a capture
        (tens of buckets at ~0.1 s each would otherwise land inside the first seconds of serving)."""
        if not self.capture:
            return
        self._pad(0, self.buckets[-1])
        for bucket in self.buckets:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)

    def _capture(self, bucket: int) -> tuple[object, torch.Tensor]:
        static = self._static(bucket)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph: JIT kernels, cuBLAS workspaces
            self.forward(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(static)
        return graph, logits
