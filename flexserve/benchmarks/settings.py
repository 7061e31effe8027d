"""What a benchmark run is asked to do, as typed settings: the `flexserve bench` flags become these, and a
script can build them directly without going through the command line."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.serving import EngineConfig

BENCH_MODEL = "dummy:opt-125m"  # the default model of `bench throughput`: a shape that loads in a second


@dataclass
class ThroughputSettings:
    """One `bench throughput` run: FlexGen's workload of one block of prompts of `prompt_len` tokens, each
    generating `gen_len` tokens. The placement policy is passed beside it (it may need the planner)."""

    model: str = BENCH_MODEL
    dtype: str = "auto"
    device: str | None = None
    offload_dir: str | None = None
    prompt_len: int = 512
    gen_len: int = 32
    h2d_gbps: float | None = None  # host-to-GPU bandwidth for the transfer bound (None: measured at the run)
    disk_gbps: float | None = None  # disk read bandwidth for the bound (None: disk reads left out of it)
    json: bool = False  # print one FLEXSERVE_RESULT line as well
    profile: str | None = None  # write a torch.profiler trace of two decode steps to this file
    engine: str = "offload"  # offload: the zig-zag executor; paged: the serving engine


@dataclass
class TraceSettings:
    """Which requests a serving benchmark replays: a recorded trace (azure, a CSV file) or a synthetic one."""

    trace: str = "azure"  # azure | poisson | gamma | PATH.csv
    rate: float | None = None  # mean arrivals/s (recorded traces are time-scaled to it; synthetic default 5)
    cv: float = 3.0  # gamma: coefficient of variation of the inter-arrival gaps
    num_requests: int = 100
    max_context: int | None = None  # clip prompt + output to this (None: the model's window)
    prompt_len: int | None = None  # synthetic: median prompt length (None: Azure-like)
    output_len: int | None = None  # synthetic: median output length, or the minimum of a Pareto tail
    output_dist: str = "lognormal"  # synthetic: lognormal (light tail) or pareto (heavy tail)
    output_alpha: float = 1.2  # pareto: tail index
    max_output_len: int | None = None  # synthetic: clip outputs here
    seed: int = 0  # of synthetic traces and of the prompt token ids


@dataclass
class ServeBenchSettings:
    """One `bench serve` run: where the requests go (`mode`), which trace, what to write.

    `url` replays against a running server; `launch` starts an in-process server per scheduler; `simulate`
    runs the scheduler simulator on a cost model, no model loaded."""

    mode: str  # url | launch | simulate
    trace: TraceSettings = field(default_factory=TraceSettings)
    url: str | None = None
    api_key: str | None = None  # url: the server's key
    served_model_name: str | None = None  # url: the model id to send (None: the server's first)
    schedulers: list[str] | None = None  # launch/simulate (None: skip-join-mlfq; simulate: every policy)
    engine: EngineConfig | None = None  # launch/simulate: the engine's settings (None: its defaults)
    engine_process: bool | None = None  # launch: engine in a child process (None: `make_engine` decides)
    max_queue_len: int | None = None  # None: every request of the trace may queue (latency, not admission)
    sim_step_overhead_ms: float | None = None  # simulate: fixed time per step (None: the cost model's)
    sim_seq_overhead_us: float | None = None  # simulate: host time per decoding sequence per step
    json: bool = False  # print one SERVE_RESULT line per run as well
    plot: str | None = None  # PNG of the JCT and TTFT CDFs
    records: str | None = None  # CSV of every request's latencies
