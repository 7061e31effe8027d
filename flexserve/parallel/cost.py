"""The communication term of tensor and pipeline parallelism, for the planner's cost model."""
from __future__ import annotations

from ..config import ModelConfig


def comm_time(config: ModelConfig, tp: int, pp: int, batch: int, seq: int, bandwidth: float,
              dtype_bytes: int = 2, latency: float = 0.0, pp_bandwidth: float | None = None) -> float:
    """Seconds spent communicating in one forward pass of `batch` sequences with `seq` new tokens each.

    - Tensor parallel: two all-reduces of the hidden states [batch, seq, D] per decoder layer (after the
      o projection and after the down projection). A ring all-reduce moves 2 (tp - 1) / tp of the buffer through
      each rank's link, in 2 (tp - 1) latency-bound steps. Layers are split over the pipeline stages, so the
      all-reduces on the critical path are those of every layer, whichever stage holds it.
    - Pipeline parallel: pp - 1 hops of the hidden states [batch, seq, D] between consecutive stages, plus one
      broadcast of the batch's new token ids (8 bytes each) from the last stage to the others.

    Prefill is `seq = prompt_len`, a decode step `seq = 1`. `bandwidth` (bytes/s) is the tensor-parallel link
    (NVLink within a node); `pp_bandwidth` the stage-to-stage link (defaults to `bandwidth`; across nodes it is
    the network). `latency` is the fixed cost of one message, in seconds. With micro-batches the pipeline
    hops of one micro-batch overlap the compute of another, so this is an upper bound on the exposed time;
    the all-reduces are never overlapped (the next layer needs their result).
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel degrees must be >= 1, got tp={tp}, pp={pp}")
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    hidden_bytes = batch * seq * config.hidden_size * dtype_bytes
    t = 0.0
    if tp > 1:
        per_reduce = 2 * (tp - 1) / tp * hidden_bytes / bandwidth + 2 * (tp - 1) * latency
        t += 2 * config.num_layers * per_reduce
    if pp > 1:
        link = pp_bandwidth or bandwidth
        t += (pp - 1) * (hidden_bytes / link + latency)
        t += (pp - 1) * (batch * 8 / link + latency)  # the token broadcast (a tree would be log2(pp) hops)
    return t
