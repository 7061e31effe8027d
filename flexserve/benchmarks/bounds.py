"""The hardware bound of a serving workload: the least time a GPU could take to run it, from two rates
measured on that GPU (matmul FLOP/s and memory bytes/s), so that a throughput figure can be read as a fraction of
what the machine allows.

- Prompt tokens are compute: each costs 2 x (decoder parameters) FLOPs plus its causal attention, at the
  matmul rate.
- Output tokens are memory traffic: every decode step reads the resident weights once and each sequence's
  cached keys and values. The fewest decode steps any engine needs is the longest output (tokens of one
  request come one per step) or the output tokens divided by the seats, whichever is larger. At large batches
  the same tokens' matmuls can take longer than that traffic: decode counts whichever of the two is larger.

The bound is the sum of the two (a step does either kind of work at the rate that limits it; mixing them in one
step overlaps little on a GPU that is saturated by either). When part of the weights lives off the GPU (a
served offloaded model), every step also streams those bytes over PCIe, overlapped with the step's compute: the
bound is then the larger of the GPU's time and the stream's, the stream counting the fewest steps any engine
needs (the decode steps above, or all tokens over the step's token budget, whichever is larger). It is the bound of a saturated server: for a trace
whose arrivals are slower than service the makespan is set by the arrivals, and the fraction says how idle
the machine was, not how fast the engine is.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class WorkloadBound:
    prefill_s: float
    decode_s: float
    stream_s: float = 0.0  # weights off the GPU crossing PCIe once per step (overlapping the GPU's work)

    @property
    def total_s(self) -> float:
        return max(self.prefill_s + self.decode_s, self.stream_s)

    def row(self, makespan_s: float) -> dict:
        """Columns for a report: the bound and the fraction of it a run of `makespan_s` reached."""
        row = {"bound_prefill_s": round(self.prefill_s, 3), "bound_decode_s": round(self.decode_s, 3),
               "fraction_of_bound": round(self.total_s / makespan_s, 3) if makespan_s > 0 else None}
        if self.stream_s:
            row["bound_stream_s"] = round(self.stream_s, 3)
        return row


def stream_bound_s(prompt_lens: list[int], output_lens: list[int], max_num_seqs: int, max_batched_tokens: int,
                   streamed_weight_bytes: float, h2d_bw: float) -> float:
    """Least seconds to stream the off-GPU weights once per step over the fewest steps the trace needs: one per
    output token of the longest request, the output tokens over the seats, and every token (prompt and output)
    over the step's token budget, whichever is most."""
    outputs = sum(output_lens)
    steps = max(max(output_lens, default=0), -(-outputs // max(1, max_num_seqs)),
                -(-(sum(prompt_lens) + outputs) // max(1, max_batched_tokens)))
    return steps * streamed_weight_bytes / h2d_bw


def workload_bound(cfg: ModelConfig, dtype_bytes: int, resident_weight_bytes: float, prompt_lens: list[int],
                   output_lens: list[int], max_num_seqs: int, matmul_flops: float, memory_bw: float) -> WorkloadBound:
    """Least seconds for these requests (prompt and output lengths) on a device with these rates."""
    layer_flops = 2 * cfg.num_layers * cfg.num_layer_params()
    attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # per (query, key) pair, QK^T and PV
    prefill = sum(p * layer_flops + attn_flops * p * (p + 1) / 2 for p in prompt_lens) / matmul_flops
    kv_token = cfg.kv_bytes_per_token(dtype_bytes)
    # keys and values each decode token reads: its prompt plus the outputs before it
    kv_read = sum(o * p + o * (o - 1) / 2 for p, o in zip(prompt_lens, output_lens)) * kv_token
    steps = max(max(output_lens, default=0), -(-sum(output_lens) // max(1, max_num_seqs)))
    decode_memory = (steps * resident_weight_bytes + kv_read) / memory_bw
    decode_compute = sum(output_lens) * layer_flops / matmul_flops  # a large batch turns decode compute-bound
    decode = max(decode_memory, decode_compute)
    return WorkloadBound(prefill, decode)
