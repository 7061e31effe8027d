"""One serving step's tokens, flattened, and the attention that reads their context through block tables.

A step computes decode tokens (one per running sequence) and prompt chunks together. Every token is a row
of one flat batch [1, T]; what attention needs per row is its sequence's block table and how many positions
it sees (`ctx_lens` = position + 1, which is also the causal mask inside a chunk). That metadata is built once
per step, with array operations over block tables rather than per-token Python, and shared by both paths:

- GPU: the Triton kernel of `flexserve.kernels.paged_attention` walks the block tables: decode rows one by one
  (split along the context when few and long), prompt chunks in query tiles that share each key tile.
- CPU (and GPUs without Triton): the portable path gathers each sequence's keys into a dense tensor and runs
  the same SDPA as the dense executor (`attend_over`): decodes as one padded batch, each chunk on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..compression.kv import from_cache, write_slots
from ..memory.pinned import upload, upload_parts
from ..kernels.paged_attention import QueryTiles, kernel_available, paged_attention, query_tiles
from ..models.attention import attend_over, causal_mask
from ..models.layers import apply_rope, rope_cos_sin


@dataclass
class SeqChunk:
    """Tokens [start, start + len(token_ids)) of one sequence, computed this step."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool


@dataclass(frozen=True)
class StreamingWindow:
    """StreamingLLM's cache: each query sees the first `sinks` tokens of its sequence (the attention sinks) and
    its own last `window` tokens, so a stream of any length keeps a bounded cache.

    Positions follow StreamingLLM: what counts is a token's place in the cache, not in the text. Keys are stored
    rotated at their text positions, so a window key is already at the right distance from the query (both move
    together); a sink is scored with the query rotated to its cache position, min(p, sinks + window - 1),
    instead (`sink_query`). Without rotary embeddings (learned positions) both queries are the same."""

    sinks: int
    window: int

    def __post_init__(self) -> None:
        if self.window < 1 or self.sinks < 0:
            raise ValueError(f"a sliding window needs window >= 1 and sinks >= 0, got {self.window}, {self.sinks}")


@dataclass
class PagedBatch:
    """Flattened tokens of one step (single-token rows first, then prompt chunks) and their attention metadata."""

    ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    slots: torch.Tensor  # [T] where each new token's K/V is written
    block_tables: torch.Tensor  # [R, max_blocks] int32, one row per sequence (in flattened order)
    row_seq: torch.Tensor  # [T] int32: the block-table row of each token
    ctx_lens: torch.Tensor  # [T] int32: positions each token attends to (its position + 1)
    block_size: int
    num_decode: int  # leading single-token rows (one per sequence)
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)  # (offset, n, start, table row)
    sample_rows: torch.Tensor | None = None  # [Ns] rows of T whose logits are sampled
    sampled: list[int] = field(default_factory=list)  # index in the input `seqs` of each sampled row, in order
    seq_rows: list[int] = field(default_factory=list)  # first row of each input seq in the flat batch
    streaming: StreamingWindow | None = None
    inv_freq: torch.Tensor | None = None  # rotary frequencies (for the sinks' query under `streaming`)
    _gather: dict = field(default_factory=dict)  # per-step attention metadata (slots, tiles), built on first use

    @classmethod
    def build(cls, seqs: list[SeqChunk], block_size: int, device: torch.device,
              streaming: StreamingWindow | None = None, inv_freq: torch.Tensor | None = None) -> "PagedBatch":
        order = [i for i, s in enumerate(seqs) if len(s.token_ids) == 1] + \
                [i for i, s in enumerate(seqs) if len(s.token_ids) != 1]
        num_decode = sum(1 for s in seqs if len(s.token_ids) == 1)
        lens = np.array([len(seqs[i].token_ids) for i in order], dtype=np.int64)
        starts = np.array([seqs[i].start for i in order], dtype=np.int64)
        max_blocks = max(1, max(len(seqs[i].block_table) for i in order))
        tables = np.zeros((len(order), max_blocks), dtype=np.int32)
        for r, i in enumerate(order):
            tables[r, :len(seqs[i].block_table)] = seqs[i].block_table
        np.maximum(tables, 0, out=tables)  # released blocks (outside a window) are never read: any valid id
        row_seq = np.repeat(np.arange(len(order), dtype=np.int64), lens)
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        positions = starts[row_seq] + (np.arange(len(row_seq)) - offsets[row_seq])
        slots = tables[row_seq, positions // block_size].astype(np.int64) * block_size + positions % block_size
        ids = [t for i in order for t in seqs[i].token_ids]
        sampled = [i for i in order if seqs[i].sample]
        sample_rows = [int(offsets[r] + lens[r] - 1) for r, i in enumerate(order) if seqs[i].sample]
        chunks = [(int(offsets[r]), int(lens[r]), int(starts[r]), r) for r in range(num_decode, len(order))]
        seq_rows = [0] * len(seqs)
        for r, i in enumerate(order):
            seq_rows[i] = int(offsets[r])

        # Two uploads instead of seven: every int64 array in one page-locked buffer, every int32 one in another
        # (each part 16-byte aligned, so that the kernels reading them never meet a new alignment pattern)
        ids_d, pos_d, slots_d, rows_d = upload_parts([ids, positions, slots, sample_rows], torch.long, device)
        tables_d, row_seq_d, ctx_d = upload_parts([tables, row_seq, positions + 1], torch.int32, device)
        return cls(ids=ids_d[None], positions=pos_d[None], slots=slots_d, block_tables=tables_d.view(tables.shape),
                   row_seq=row_seq_d, ctx_lens=ctx_d, block_size=block_size, num_decode=num_decode, chunks=chunks,
                   sample_rows=rows_d, sampled=sampled, seq_rows=seq_rows, streaming=streaming, inv_freq=inv_freq)

    def feed(self, tokens: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Set single-token inputs from tokens still on the device: for each (input seq i, j), the token of
        seq i is `tokens[j]` (the previous step sampled it; the host has not read it yet)."""
        if not pairs:
            return
        both = upload([[self.seq_rows[i] for i, _ in pairs], [j for _, j in pairs]], torch.long, self.ids.device)
        self.ids[0].index_copy_(0, both[0], tokens.index_select(0, both[1]))

    def context_slots(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """[len(rows), length] pool slots of positions 0..length-1 of the given block-table rows."""
        pos = torch.arange(length, device=self.block_tables.device)
        blocks = self.block_tables[rows][:, pos // self.block_size].long()
        return blocks * self.block_size + pos % self.block_size

    def decode_gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Portable path: slots [Bd, Lmax] of every single-token row's context, and its mask [Bd, 1, 1, Lmax]."""
        if "decode" not in self._gather:
            nd = self.num_decode
            ctx = self.ctx_lens[:nd].long()
            lmax = int(ctx.max())
            slots = self.context_slots(self.row_seq[:nd].long(), lmax)
            mask = torch.arange(lmax, device=ctx.device)[None, :] < ctx[:, None]
            self._gather["decode"] = (slots, mask[:, None, None, :])
        return self._gather["decode"]

    def tiles(self, group: int, dtype: torch.dtype) -> QueryTiles | None:
        """The kernel's query tiles over this step's prompt chunks (None without chunks), built on first use and
        shared by every layer."""
        if not self.chunks:
            return None
        key = ("tiles", group, dtype)
        if key not in self._gather:
            self._gather[key] = query_tiles(self.chunks, group, dtype, self.block_tables.device)
        return self._gather[key]

    def sink_query(self, q: torch.Tensor) -> torch.Tensor:
        """q [1, T, H, hd] (rotated at each token's position) rotated back to the cache position the sinks see."""
        if self.inv_freq is None or self.streaming is None:
            return q
        if "sink_rope" not in self._gather:
            w = self.streaming
            shift = self.positions.clamp(max=w.sinks + w.window - 1) - self.positions  # [1, T], <= 0
            self._gather["sink_rope"] = rope_cos_sin(self.inv_freq, shift, q.dtype)
        return apply_rope(q, *self._gather["sink_rope"])

    def window_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Portable streaming path: slots [T, sinks + window] of each row's visible keys (sinks first, then its
        window, oldest first) and which of them exist [T, sinks + window]."""
        if "window" not in self._gather:
            w = self.streaming
            qpos = (self.ctx_lens - 1).long()[:, None]  # [T, 1]
            j = torch.arange(w.sinks + w.window, device=qpos.device)[None, :]
            is_sink = j < w.sinks
            pos = torch.where(is_sink, j, qpos - w.window + 1 + (j - w.sinks))
            valid = torch.where(is_sink, j <= qpos, pos >= w.sinks)
            pos = pos.clamp(min=0)
            blocks = self.block_tables[self.row_seq.long()[:, None], pos // self.block_size].long()
            self._gather["window"] = (blocks * self.block_size + pos % self.block_size, valid)
        return self._gather["window"]

    def chunk_gather(self, row: int, length: int) -> torch.Tensor:
        key = ("chunk", row)
        if key not in self._gather:
            rows = torch.tensor([row], device=self.block_tables.device)
            self._gather[key] = self.context_slots(rows, length)[0]
        return self._gather[key]


def paged_attend(kv_slots: torch.Tensor, batch: PagedBatch):
    """The attend(q, k, v) callable of `decoder_layer` for one layer's pool ([2, slots, Hkv, hd])."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [1, T, H, hd]; k, v: [1, T, Hkv, hd]
        write_slots(kv_slots[0], batch.slots, k[0])  # an fp8 pool stores saturated e4m3
        write_slots(kv_slots[1], batch.slots, v[0])
        w = batch.streaming
        if kernel_available(q):
            extra = {} if w is None else dict(window=w.window, sinks=w.sinks, q_sink=batch.sink_query(q)[0])
            out = paged_attention(q[0], kv_slots[0], kv_slots[1], batch.block_tables, batch.row_seq,
                                  batch.ctx_lens, batch.block_size, batch.num_decode,
                                  batch.tiles(q.shape[2] // k.shape[2], q.dtype), **extra)
            return out.reshape(1, out.shape[0], -1)
        if w is not None:
            return _window_attend(kv_slots, batch, q)
        return _gather_attend(kv_slots, batch, q)
    return attend


def _window_attend(kv_slots: torch.Tensor, batch: PagedBatch, q: torch.Tensor, rows_per_pass: int = 256
                   ) -> torch.Tensor:
    """The portable streaming path: every row's sinks and window gathered ([T, sinks + window] keys), scored in
    float32, sinks with the sink query. Rows go `rows_per_pass` at a time to bound the gathered copy."""
    slots, valid = batch.window_slots()
    q_sink = batch.sink_query(q)[0]
    t, h, hd = q.shape[1:]
    sinks = batch.streaming.sinks
    outs = []
    for lo in range(0, t, rows_per_pass):
        hi = min(t, lo + rows_per_pass)
        keys = kv_slots[0][slots[lo:hi]].float()  # [r, L, Hkv, hd]
        values = kv_slots[1][slots[lo:hi]].float()
        group = h // keys.shape[2]
        keys, values = keys.repeat_interleave(group, 2), values.repeat_interleave(group, 2)  # [r, L, H, hd]
        scores = torch.einsum("rhd,rlhd->rhl", q[0, lo:hi].float(), keys)
        scores[..., :sinks] = torch.einsum("rhd,rlhd->rhl", q_sink[lo:hi].float(), keys[:, :sinks])
        scores = (scores * hd ** -0.5).masked_fill(~valid[lo:hi, None, :], float("-inf"))
        out = torch.einsum("rhl,rlhd->rhd", scores.softmax(-1), values)
        outs.append(out.reshape(hi - lo, h * hd).to(q.dtype))
    return torch.cat(outs, 0)[None]


def _gather_attend(kv_slots: torch.Tensor, batch: PagedBatch, q: torch.Tensor) -> torch.Tensor:
    """The portable path: dense copies of each context, then SDPA. Same result as the kernel."""
    outs = []
    nd = batch.num_decode
    if nd:
        slots, mask = batch.decode_gather()
        keys = from_cache(kv_slots[0][slots], q.dtype).transpose(1, 2)  # [Bd, Hkv, Lmax, hd]
        values = from_cache(kv_slots[1][slots], q.dtype).transpose(1, 2)
        outs.append(attend_over(q[0, :nd, None], keys, values, mask)[:, 0])  # [Bd, H*hd]
    for offset, n, start, row in batch.chunks:
        gather = batch.chunk_gather(row, start + n)
        keys = from_cache(kv_slots[0][gather], q.dtype).transpose(0, 1)[None]  # [1, Hkv, L, hd]
        values = from_cache(kv_slots[1][gather], q.dtype).transpose(0, 1)[None]
        mask = causal_mask(start, n, q.device) if start else None
        outs.append(attend_over(q[:, offset:offset + n], keys, values, mask, causal=start == 0)[0])
    return torch.cat(outs, 0)[None]
