"""`flexserve bench serve`: replay a request trace against an OpenAI-compatible server, or simulate it.

Three modes (`ServeBenchSettings.mode`), one report (throughput, mean/p50/p99 TTFT, TPOT, JCT, queueing share):

- `url`: replay through HTTP against a running server (`replay`: open loop, latencies as the client sees them).
- `launch`: start an engine and server in this process (127.0.0.1, a free port) for each scheduler, then
  replay the same trace against each.
- `simulate`: no model, no HTTP: the scheduler simulator (`flexserve.scheduler.simulator`) on a cost model;
  it reports exact queueing.

Every request sends its prompt as `prompt_len` random token ids (seeded, the same in every run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np

from ..scheduler.cost import LinearCostModel
from ..scheduler.traces import (AZURE_LIKE_OUTPUT, AZURE_LIKE_PROMPT, LengthDist, TraceRequest, clip_to_context,
                                load_azure_conv, load_csv_trace, synthetic_trace)
from .replay import http_run, http_run_isolated, server_model
from .serve_report import clean_json, format_table, plot_cdfs, read_records, write_records
from .settings import ServeBenchSettings, TraceSettings

SIM_MAX_CONTEXT = 8192  # the simulator's default (Llama-3-8B)


# --- traces ----------------------------------------------------------------------------------------------------
def load_trace(spec: TraceSettings, max_context: int | None) -> list[TraceRequest]:
    """The requests `spec` describes, prompts clipped so that prompt + output fits `max_context`."""
    n = spec.num_requests
    if spec.trace in ("poisson", "gamma"):
        prompt, output = AZURE_LIKE_PROMPT, AZURE_LIKE_OUTPUT
        if spec.prompt_len:  # a new median keeps the shape (sigma) and lets the tail grow with it
            prompt = dataclasses.replace(prompt, median=spec.prompt_len,
                                         max_len=max(prompt.max_len, 8 * spec.prompt_len))
        if spec.output_dist == "pareto":  # most jobs short, a few very long: where preemption pays most
            output = LengthDist("pareto", median=spec.output_len or 16, alpha=spec.output_alpha, max_len=2048)
        elif spec.output_len:
            output = dataclasses.replace(output, median=spec.output_len,
                                         max_len=max(output.max_len, 8 * spec.output_len))
        if spec.max_output_len:
            output = dataclasses.replace(output, max_len=spec.max_output_len)
        trace = synthetic_trace(n, spec.rate or 5.0, cv=1.0 if spec.trace == "poisson" else spec.cv,
                                prompt=prompt, output=output, seed=spec.seed)
        return clip_to_context(trace, max_context) if max_context else trace
    kw = dict(max_requests=n, target_rate=spec.rate, max_context=max_context)
    return load_azure_conv(**kw) if spec.trace == "azure" else load_csv_trace(spec.trace, **kw)


def prompt_ids(trace: list[TraceRequest], seed: int, low: int, high: int) -> list[list[int]]:
    """Random token ids in [low, high) per request, the same for every run of one trace and seed."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, r.prompt_len).tolist() for r in trace]


def token_range(vocab_size: int) -> tuple[int, int]:
    """Ids for random prompts: clear of the low special ids, within the vocabulary."""
    return min(10, vocab_size // 2), min(vocab_size, 10_000)


# --- modes -----------------------------------------------------------------------------------------------------
def run_url(bench: ServeBenchSettings) -> list[dict]:
    spec = bench.trace
    model, window, vocab = server_model(bench.url, bench.api_key)
    model = bench.served_model_name or model
    max_context = min(x for x in (spec.max_context, window) if x) if (spec.max_context or window) else None
    trace = load_trace(spec, max_context)
    prompts = prompt_ids(trace, spec.seed, *token_range(vocab or 1000))
    return [http_run("server", bench.url, trace, prompts, model, bench.api_key)]


def run_launch(bench: ServeBenchSettings) -> list[dict]:
    """One in-process engine and server per scheduler, one after the other, on the same trace and prompts."""
    import gc

    import torch

    shared: dict = {}
    runs = []
    for name in bench.schedulers or ["skip-join-mlfq"]:
        runs.append(_launch_one(bench, name, shared))
        # Free the last engine's weights and KV pools before the next loads: its default pool size is a share
        # of the memory free at that moment, so a leftover engine would shrink the next one's.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return runs


def _launch_one(bench: ServeBenchSettings, scheduler: str, shared: dict) -> dict:
    from ..engine.remote import make_engine
    from ..engine.serving import EngineConfig
    from ..server import ServerThread, build_app

    spec = bench.trace
    # A replay measures latency, not admission control: queue every request unless told otherwise.
    config = dataclasses.replace(bench.engine or EngineConfig(), scheduler=scheduler,
                                 max_queue_len=bench.max_queue_len or max(1024, spec.num_requests))
    engine = make_engine(config, bench.engine_process)
    if not shared:  # the trace and prompts of the first run serve every run
        cfg = engine.model_config
        shared["trace"] = trace = load_trace(spec, min(spec.max_context or cfg.max_position, cfg.max_position))
        shared["prompts"] = prompt_ids(trace, spec.seed, *token_range(cfg.vocab_size))
    try:
        with ServerThread(build_app(engine)) as srv:
            run = http_run_isolated(scheduler, srv.url, shared["trace"], shared["prompts"], engine.model_name)
        st = engine.settings
        run["row"].update(_bound_columns(engine, config, shared, run["row"]["makespan_s"]),
                          max_num_seqs=st.max_num_seqs, max_num_batched_tokens=st.max_num_batched_tokens,
                          prefill_chunk_size=st.prefill_chunk_size, num_gpu_blocks=st.num_gpu_blocks)
        return run
    finally:
        with contextlib.suppress(RuntimeError):  # a step still running after the drain keeps its memory
            engine.release_memory()


def _bound_columns(engine, config, shared: dict, makespan_s: float) -> dict:
    """The run's fraction of the GPU's bound (see `bounds.py`), from the rates the engine measured at start. With
    weights off the GPU, the policy's share of them (`100 - w_gpu_percent`) streams every step at the
    host-to-device rate measured here (disk-resident weights counted at that rate too, so the bound stays a
    bound)."""
    import torch

    from .bounds import stream_bound_s, workload_bound

    rates = engine.rates
    if rates is None:
        return {}
    cfg = engine.model_config
    dtype_bytes = torch.empty((), dtype=engine.dtype).element_size()
    trace = shared["trace"]
    prompts, outputs = [r.prompt_len for r in trace], [r.output_len for r in trace]
    seats = engine.settings.max_num_seqs
    weight_bytes = cfg.stored_weight_bytes(dtype_bytes)
    off_gpu = 0.0 if config.policy is None else 1.0 - config.policy.w_gpu_percent / 100
    bound = workload_bound(cfg, dtype_bytes, weight_bytes * (1.0 - off_gpu), prompts, outputs, seats,
                           rates.matmul_flops, rates.memory_bw)
    extra = {}
    if off_gpu > 0:
        from ..planner.calibrate import copy_bandwidths

        if "h2d_bw" not in shared:  # measured once for every run of this replay
            shared["h2d_bw"] = copy_bandwidths(torch.device("cuda"))["h2d_pinned_bw"]
        h2d = shared["h2d_bw"]
        stream = stream_bound_s(prompts, outputs, seats, engine.settings.max_num_batched_tokens,
                                weight_bytes * off_gpu, h2d)
        bound = dataclasses.replace(bound, stream_s=stream)
        extra = {"h2d_gbps": round(h2d / 1e9, 1)}
    return {**bound.row(makespan_s), "matmul_tflops": round(rates.matmul_flops / 1e12, 1),
            "memory_gbps": round(rates.memory_bw / 1e9, 1), **extra}


def sim_cost(step_overhead_ms: float | None = None, seq_overhead_us: float | None = None) -> LinearCostModel:
    """The simulator's step-time model with these overheads (None: its defaults)."""
    kw = {}
    if step_overhead_ms is not None:
        kw["step_overhead_s"] = step_overhead_ms / 1e3
    if seq_overhead_us is not None:
        kw["s_per_seq"] = seq_overhead_us / 1e6
    return LinearCostModel(**kw)


def run_simulate(bench: ServeBenchSettings) -> list[dict]:
    from ..engine.serving import EngineConfig
    from ..scheduler import SCHEDULERS, SchedulerConfig
    from ..scheduler.simulator import KVCacheConfig, simulate

    trace = load_trace(bench.trace, bench.trace.max_context or SIM_MAX_CONTEXT)
    # The engine's batch limits (not SchedulerConfig's), so that --simulate predicts what --launch measures.
    engine = bench.engine or EngineConfig()
    limits = {k: v for k in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk_size")
              if (v := getattr(engine, k)) is not None}  # unset: the scheduler's own defaults
    config = SchedulerConfig(**limits, **engine.scheduler_options,
                             max_queue_len=bench.max_queue_len or max(1, len(trace)))
    kv = {k: v for k, v in (("num_gpu_blocks", engine.num_gpu_blocks), ("num_cpu_blocks", engine.num_cpu_blocks),
                            ("block_size", engine.block_size)) if v is not None}
    cost = sim_cost(bench.sim_step_overhead_ms, bench.sim_seq_overhead_us)
    runs = []
    for name in bench.schedulers or list(SCHEDULERS):
        res = simulate(trace, name, config=config, kv=KVCacheConfig(**kv), cost=cost)
        row = res.row()
        row.update(mode="simulate", failed=row.pop("rejected"), makespan_s=res.makespan_s,
                   swaps=row.pop("swap_outs"))
        runs.append({"row": row, "records": res.records})
    return runs


# --- the command -----------------------------------------------------------------------------------------------
def run_serve_bench(bench: ServeBenchSettings) -> int:
    """Run every scheduler of `bench`, print the table (and JSON lines), write the plot and records asked for;
    exit status 1 when a run finished no request."""
    modes = {"simulate": run_simulate, "launch": run_launch, "url": run_url}
    runs = modes[bench.mode](bench)
    spec = bench.trace
    extra = {"trace": spec.trace, "rate": spec.rate, "num_requests": spec.num_requests}
    rows = [{**run["row"], **extra} for run in runs]
    print(format_table(rows))
    if bench.plot:
        plot_cdfs(runs, bench.plot)
        print(f"wrote {bench.plot}")
    if bench.records:
        write_records(runs, bench.records)
        print(f"wrote {bench.records}")
    if bench.json:
        for row in rows:
            print("SERVE_RESULT " + json.dumps({k: clean_json(v) for k, v in row.items()}))
    return 1 if any(r["finished"] == 0 for r in rows) else 0


def plot_records(paths: list[str], plot: str) -> int:
    """Plot the runs of earlier `records` files (`PATH` or `PATH=LABEL`) on one CDF figure."""
    plot_cdfs(read_records(paths), plot)
    print(f"wrote {plot}")
    return 0
