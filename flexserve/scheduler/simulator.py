"""Discrete-event simulator: the real scheduler and block manager, with a cost model instead of a GPU.

Each event is one engine step: `schedule(now)`, a step time from the cost model (plus swap copies), then
`on_step_done`. Swaps the step must wait for (`swap_out`, `swap_in`) add their copy time; swaps ahead of
need overlap the step's compute when `overlap_swaps` is on (the engine issues them on their own stream).
When nothing can run, the clock jumps to the next arrival. Because the scheduling code is the engine's own,
the simulator's predictions can be checked against real runs of the same trace.

    python -m flexserve.scheduler.simulator --trace azure --rate 8 --num-requests 2000
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .block_manager import BlockManager
from .config import SchedulerConfig
from .cost import IterationTimeFn, LinearCostModel, swap_time_per_block
from .errors import QueueFullError, RequestTooLargeError
from .metrics import LatencyReport, RequestRecord
from .output import SchedulerStats
from .policies import SCHEDULERS, make_scheduler
from .request import Request
from .traces import TraceRequest, load_azure_conv, load_csv_trace, synthetic_trace


@dataclass(frozen=True)
class KVCacheConfig:
    """Block pools of the simulated engine. Defaults: Llama-3-8B bf16 on one H100 with 16-token blocks of
    2 MiB: ~52 GB of HBM left for KV after weights and activations (24,800 blocks), 64 GiB of pinned host
    memory (32,768 blocks). `swap_s_per_block` None means 16 x 128 KiB over PCIe at 53.1 GB/s."""

    num_gpu_blocks: int = 24_800
    num_cpu_blocks: int = 32_768
    block_size: int = 16
    watermark: float = 0.01
    swap_s_per_block: float | None = None
    overlap_swaps: bool = True

    @property
    def swap_seconds_per_block(self) -> float:
        if self.swap_s_per_block is not None:
            return self.swap_s_per_block
        return swap_time_per_block(self.block_size)


@dataclass
class SimResult:
    """Per-request records of one simulated run and its summaries."""

    scheduler: str
    records: list[RequestRecord]
    num_rejected: int
    makespan_s: float
    num_steps: int
    stats: SchedulerStats
    swap_stall_s: float = 0.0  # step time spent waiting for swap copies that compute could not hide
    busy_s: float = 0.0  # total step time

    @property
    def report(self) -> LatencyReport:
        return LatencyReport.of(self.records, self.makespan_s)

    def row(self) -> dict[str, float | str]:
        return {"scheduler": self.scheduler, **self.report.row(), "rejected": self.num_rejected,
                "swap_outs": self.stats.num_swap_outs, "recomputes": self.stats.num_recomputes,
                "preemptions": self.stats.num_preemptions, "steps": self.num_steps,
                "swap_stall_frac": self.swap_stall_s / self.busy_s if self.busy_s else 0.0}


def simulate(trace: Sequence[TraceRequest], scheduler_name: str, config: SchedulerConfig | None = None,
             cost: IterationTimeFn | None = None, kv: KVCacheConfig | None = None,
             prefill_time_fn: Callable[[int], float] | None = None) -> SimResult:
    """Replay `trace` through policy `scheduler_name`; each request generates exactly its `output_len`.

    `cost` is any `iteration_time(num_prefill_tokens, num_decode_seqs, total_context_tokens) -> s`
    (default `LinearCostModel()`); skip-join estimates prefill time from it unless `prefill_time_fn` is given.
    """
    config = config or SchedulerConfig()
    cost = cost or LinearCostModel()
    kv = kv or KVCacheConfig()
    bm = BlockManager(kv.num_gpu_blocks, kv.num_cpu_blocks, kv.block_size, kv.watermark)
    sched = make_scheduler(scheduler_name, config, bm, prefill_time_fn=prefill_time_fn, iteration_time_fn=cost)
    arrivals = sorted(trace, key=lambda r: r.arrival_s)
    requests = [Request(str(i), prompt_len=r.prompt_len, max_tokens=r.output_len, arrival_time=r.arrival_s)
                for i, r in enumerate(arrivals)]
    swap_s = kv.swap_seconds_per_block
    records: list[RequestRecord] = []
    now, next_idx, num_rejected, num_steps = 0.0, 0, 0, 0
    busy_s = stall_s = 0.0
    while next_idx < len(requests) or sched.has_work():
        while next_idx < len(requests) and requests[next_idx].arrival_time <= now:
            try:
                sched.add_request(requests[next_idx])
            except (QueueFullError, RequestTooLargeError):
                num_rejected += 1
            next_idx += 1
        if not sched.has_work():
            now = requests[next_idx].arrival_time
            continue
        out = sched.schedule(now)
        if out.is_empty:
            if next_idx >= len(requests):
                raise RuntimeError(f"{scheduler_name}: {sched.num_unfinished} requests can never be scheduled")
            now = max(now, requests[next_idx].arrival_time)
            sched.on_step_done(now, 0.0, {})
            continue
        compute_s = cost(out.num_prefill_tokens, out.num_decode_seqs, out.total_context_tokens) \
            if out.scheduled else 0.0
        wait_s = swap_s * (len(out.swap_out) + len(out.swap_in))
        ahead_s = swap_s * (len(out.swap_out_ahead) + len(out.swap_in_ahead))
        step_s = wait_s + (max(compute_s, ahead_s) if kv.overlap_swaps else compute_s + ahead_s)
        now += step_s
        num_steps += 1
        busy_s += step_s
        stall_s += step_s - compute_s
        done = sched.on_step_done(now, step_s, {s.request_id: 1 for s in out.scheduled if s.samples})
        records.extend(RequestRecord.from_request(r) for r in done)
    first = arrivals[0].arrival_s if arrivals else 0.0
    return SimResult(scheduler_name, records, num_rejected, now - first, num_steps, sched.stats(), stall_s, busy_s)


def compare(trace: Sequence[TraceRequest], names: Sequence[str] = SCHEDULERS, **kwargs) -> list[SimResult]:
    """The same trace through several policies, everything else equal."""
    return [simulate(trace, name, **kwargs) for name in names]


def format_table(results: Sequence[SimResult]) -> str:
    """A plain-text table of the headline numbers (seconds, tokens/s)."""
    cols = ["scheduler", "jct_mean_s", "jct_p50_s", "jct_p99_s", "ttft_mean_s", "ttft_p99_s", "tpot_mean_s",
            "queueing_frac", "throughput_tok_s", "swap_outs", "swap_stall_frac", "recomputes", "rejected"]
    rows = [r.row() for r in results]
    lines = ["  ".join(f"{c:>16}" for c in cols)]
    for row in rows:
        lines.append("  ".join(f"{row[c]:>16.4g}" if isinstance(row[c], float) else f"{row[c]:>16}"
                               for c in cols))
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flexserve.scheduler.simulator", description=__doc__.split("\n")[0])
    p.add_argument("--trace", default="azure", help="azure | poisson | gamma | path to a CSV")
    p.add_argument("--rate", type=float, default=None, help="target mean arrival rate, requests/s")
    p.add_argument("--cv", type=float, default=3.0, help="gamma trace: inter-arrival coefficient of variation")
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedulers", default=",".join(SCHEDULERS))
    p.add_argument("--gpu-blocks", type=int, default=KVCacheConfig.num_gpu_blocks)
    p.add_argument("--cpu-blocks", type=int, default=KVCacheConfig.num_cpu_blocks)
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    p.add_argument("--num-levels", type=int, default=SchedulerConfig.num_levels)
    p.add_argument("--base-quantum", type=float, default=SchedulerConfig.base_quantum_s)
    p.add_argument("--json", action="store_true", help="one JSON line per scheduler instead of a table")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.trace in ("poisson", "gamma"):
        cv = 1.0 if args.trace == "poisson" else args.cv
        trace = synthetic_trace(args.num_requests, args.rate or 5.0, cv=cv, seed=args.seed)
    else:
        load = load_azure_conv if args.trace == "azure" else (lambda **kw: load_csv_trace(args.trace, **kw))
        trace = load(max_requests=args.num_requests, target_rate=args.rate, max_context=args.max_context)
    config = SchedulerConfig(max_num_seqs=args.max_num_seqs, num_levels=args.num_levels,
                             base_quantum_s=args.base_quantum, max_queue_len=max(1, len(trace)))
    kv = KVCacheConfig(num_gpu_blocks=args.gpu_blocks, num_cpu_blocks=args.cpu_blocks)
    results = compare(trace, args.schedulers.split(","), config=config, kv=kv)
    if args.json:
        for r in results:
            print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.row().items()}))
    else:
        print(format_table(results))


if __name__ == "__main__":
    main()
