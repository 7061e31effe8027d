"""Per-request latency records and their summaries (mean / p50 / p99), shared by the simulator and bench."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .request import Request


@dataclass(frozen=True)
class RequestRecord:
    """What one finished request experienced (seconds)."""

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    jct_s: float
    ttft_s: float
    tpot_s: float | None
    queueing_s: float
    num_preemptions: int
    num_swaps: int
    num_recomputes: int

    @classmethod
    def from_request(cls, req: Request) -> RequestRecord:
        if req.jct is None or req.ttft is None:
            raise ValueError(f"request {req.request_id!r} has not finished")
        return cls(req.request_id, req.arrival_time, req.prompt_len, req.num_output_tokens, req.jct, req.ttft,
                   req.tpot, req.queueing_delay or 0.0, req.num_preemptions, req.num_swaps, req.num_recomputes)


@dataclass(frozen=True)
class Summary:
    mean: float
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
        if arr.size == 0:
            return cls(float("nan"), float("nan"), float("nan"))
        return cls(float(arr.mean()), float(np.percentile(arr, 50)), float(np.percentile(arr, 99)))


@dataclass(frozen=True)
class LatencyReport:
    """Summaries over a run; `queueing_frac` is the share of all job time spent not running."""

    num_finished: int
    jct: Summary
    ttft: Summary
    tpot: Summary
    queueing: Summary
    queueing_frac: float
    throughput_tok_s: float
    throughput_req_s: float

    @classmethod
    def of(cls, records: Sequence[RequestRecord], makespan_s: float) -> LatencyReport:
        total_jct = sum(r.jct_s for r in records)
        tokens = sum(r.output_len for r in records)
        span = makespan_s if makespan_s > 0 else float("nan")
        return cls(len(records), Summary.of(r.jct_s for r in records), Summary.of(r.ttft_s for r in records),
                   Summary.of(r.tpot_s for r in records), Summary.of(r.queueing_s for r in records),
                   sum(r.queueing_s for r in records) / total_jct if total_jct else 0.0,
                   tokens / span, len(records) / span)

    def row(self) -> dict[str, float]:
        """Flat numbers for a table or a JSON line."""
        out: dict[str, float] = {"finished": self.num_finished}
        for name in ("jct", "ttft", "tpot", "queueing"):
            s: Summary = getattr(self, name)
            out.update({f"{name}_mean_s": s.mean, f"{name}_p50_s": s.p50, f"{name}_p99_s": s.p99})
        out.update(queueing_frac=self.queueing_frac, throughput_tok_s=self.throughput_tok_s,
                   throughput_req_s=self.throughput_req_s)
        return out
