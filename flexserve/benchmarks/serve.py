"""`flexserve bench serve`: replay a request trace against an OpenAI-compatible server, or simulate it.

Three modes, one report (throughput, mean/p50/p99 TTFT, TPOT, JCT, queueing share):

- `--url http://127.0.0.1:8000`: replay through HTTP against a running server (open loop: each request is
  sent at its trace arrival time, whatever the server's backlog).
- `--launch`: start an engine and server in this process (127.0.0.1, a free port) for each of
  `--schedulers`, then replay the same trace against each.
- `--simulate`: no model, no HTTP: the scheduler simulator (`flexserve.scheduler.simulator`) on a cost model.

Every request sends its prompt as `prompt_len` random token ids (seeded, the same in every run) with
`max_tokens` = its recorded output length and `ignore_eos: true`, so it produces exactly that many tokens;
greedy sampling. Latencies are measured by the client: TTFT from sending to the first token, TPOT the mean gap
after it, JCT from sending to the last token. A client cannot see scheduling, so its queueing time is an
estimate: every gap (send to first token, token to token) longer than the run's median inter-token gap (one
engine step) counts its excess as waiting; the simulator reports exact queueing.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..scheduler.metrics import LatencyReport, RequestRecord
from ..scheduler.traces import (AZURE_LIKE_OUTPUT, AZURE_LIKE_PROMPT, LengthDist, TraceRequest, clip_to_context,
                                load_azure_conv, load_csv_trace, synthetic_trace)
from ..server.args import add_engine_arguments, scheduler_options

SIM_MAX_CONTEXT = 8192  # the simulator's default (Llama-3-8B)
COUNTERS = ("preemptions", "swaps", "recomputes")


def add_serve_bench_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="replay against this running server, e.g. http://127.0.0.1:8000")
    mode.add_argument("--launch", action="store_true", help="start an in-process server per scheduler, then replay")
    mode.add_argument("--simulate", action="store_true", help="run the scheduler simulator instead of a model")
    mode.add_argument("--plot-records", default=None,
                      help="comma list of --records CSVs (PATH or PATH=LABEL, no commas in labels): plot their "
                           "runs on one --plot figure; runs nothing")
    t = p.add_argument_group("trace")
    t.add_argument("--trace", default="azure", help="azure | poisson | gamma | PATH.csv (default azure)")
    t.add_argument("--rate", type=float, default=None,
                   help="mean arrival rate, requests/s (azure/CSV: time-scaled to it; synthetic default 5)")
    t.add_argument("--cv", type=float, default=3.0, help="gamma: coefficient of variation of inter-arrival gaps")
    t.add_argument("--num-requests", type=int, default=100)
    t.add_argument("--max-context", type=int, default=None,
                   help="clip prompts so prompt + output fits (default: the model's window; simulate: 8192)")
    t.add_argument("--prompt-len", type=int, default=None, help="synthetic: median prompt length (default 1020)")
    t.add_argument("--output-len", type=int, default=None,
                   help="synthetic: median output length (default 129), or the minimum with --output-dist pareto")
    t.add_argument("--output-dist", choices=("lognormal", "pareto"), default="lognormal",
                   help="synthetic: output lengths log-normal (Azure-like, light tail) or Pareto (heavy tail)")
    t.add_argument("--output-alpha", type=float, default=1.2, help="--output-dist pareto: tail index (smaller: heavier)")
    t.add_argument("--max-output-len", type=int, default=None, help="synthetic: clip outputs here (default 1000, "
                   "or 2048 with --output-dist pareto)")
    t.add_argument("--seed", type=int, default=0, help="seed of synthetic traces and of the prompt token ids")
    p.add_argument("--schedulers", default=None,
                   help="comma list for --launch/--simulate (default: skip-join-mlfq; simulate: all three)")
    p.add_argument("--sim-step-overhead-ms", type=float, default=None,
                   help="--simulate: fixed time per step (default 7.0: Llama-3-8B weight reads + launches)")
    p.add_argument("--sim-seq-overhead-us", type=float, default=None,
                   help="--simulate: host time per decoding sequence per step (scheduling, detokenizing, "
                        "streaming; default 0)")
    p.add_argument("--api-key", default=None, help="--url: the server's API key")
    p.add_argument("--served-model-name", default=None, help="--url: model id to send (default: the server's)")
    p.add_argument("--json", action="store_true", help="print one `SERVE_RESULT {json}` line per run")
    p.add_argument("--plot", default=None, help="write JCT and TTFT CDF plots (one curve per run) to this PNG")
    p.add_argument("--records", default=None,
                   help="write every request's latencies (one CSV row per request and run) to this file; "
                        "`--plot-records A.csv,B.csv --plot P.png` plots runs made apart on one figure")
    add_engine_arguments(p, with_scheduler=False)


# --- traces ----------------------------------------------------------------------------------------------------
def load_trace(args, max_context: int | None) -> list[TraceRequest]:
    n = args.num_requests
    if args.trace in ("poisson", "gamma"):
        prompt, output = AZURE_LIKE_PROMPT, AZURE_LIKE_OUTPUT
        if args.prompt_len:  # a new median keeps the shape (sigma) and lets the tail grow with it
            prompt = dataclasses.replace(prompt, median=args.prompt_len,
                                         max_len=max(prompt.max_len, 8 * args.prompt_len))
        if args.output_dist == "pareto":  # most jobs short, a few very long: where preemption pays most
            output = LengthDist("pareto", median=args.output_len or 16, alpha=args.output_alpha, max_len=2048)
        elif args.output_len:
            output = dataclasses.replace(output, median=args.output_len,
                                         max_len=max(output.max_len, 8 * args.output_len))
        if args.max_output_len:
            output = dataclasses.replace(output, max_len=args.max_output_len)
        trace = synthetic_trace(n, args.rate or 5.0, cv=1.0 if args.trace == "poisson" else args.cv,
                                prompt=prompt, output=output, seed=args.seed)
        return clip_to_context(trace, max_context) if max_context else trace
    kw = dict(max_requests=n, target_rate=args.rate, max_context=max_context)
    return load_azure_conv(**kw) if args.trace == "azure" else load_csv_trace(args.trace, **kw)


def prompt_ids(trace: list[TraceRequest], seed: int, low: int, high: int) -> list[list[int]]:
    """Random token ids in [low, high) per request, the same for every run of one trace and seed."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, r.prompt_len).tolist() for r in trace]


def token_range(vocab_size: int) -> tuple[int, int]:
    """Ids for random prompts: clear of the low special ids, within the vocabulary."""
    return min(10, vocab_size // 2), min(vocab_size, 10_000)


# --- HTTP replay -----------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """What the client saw of one request."""

    index: int
    send: float
    token_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    error: str | None = None


async def _send(client, url: str, headers: dict, body: dict, timing: Timing) -> None:
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            timing.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                timing.error = obj["error"].get("message", "error")
                return
            now = time.perf_counter()
            for choice in obj.get("choices") or ():
                n = len(choice["token_ids"]) if "token_ids" in choice else int(bool(choice.get("text")))
                timing.token_times.extend([now] * n)
            if obj.get("usage"):
                timing.num_tokens = obj["usage"]["completion_tokens"]
    timing.num_tokens = timing.num_tokens or len(timing.token_times)


async def replay(base_url: str, trace: list[TraceRequest], prompts: list[list[int]], model: str,
                 api_key: str | None = None, progress: bool = True) -> tuple[list[Timing], float]:
    """Send every request at its arrival time; returns what the client saw and the makespan (s)."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"
    bar = tqdm(total=len(trace), desc="requests", unit="req", disable=not progress)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int, req: TraceRequest) -> Timing:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
            timing = Timing(i, time.perf_counter())
            body = {"model": model, "prompt": prompts[i], "max_tokens": req.output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                    "return_token_ids": True}
            try:
                await _send(client, url, {**headers, "X-Request-Id": f"bench-{i}"}, body, timing)
            except Exception as e:  # a dropped connection fails one request, not the run
                timing.error = f"{type(e).__name__}: {e}"
            bar.update(1)
            return timing

        timings = await asyncio.gather(*(one(i, r) for i, r in enumerate(trace)))
    bar.close()
    ends = [t.token_times[-1] for t in timings if t.token_times]
    return list(timings), (max(ends) - t0) if ends else 0.0


def records_from_timings(trace: list[TraceRequest], timings: list[Timing]) -> list[RequestRecord]:
    """Client-side latencies; queueing estimated as the excess of every gap over one typical step."""
    ok = [t for t in timings if t.error is None and t.token_times]
    gaps = np.concatenate([np.diff(t.token_times) for t in ok] or [np.zeros(0)])
    gaps = gaps[gaps > 0]  # tokens of one chunk share a time stamp
    step = float(np.median(gaps)) if gaps.size else 0.0
    records = []
    for t in ok:
        times = np.asarray([t.send] + t.token_times)
        waits = np.clip(np.diff(times) - step, 0.0, None)
        first, last, n = t.token_times[0], t.token_times[-1], t.num_tokens
        r = trace[t.index]
        records.append(RequestRecord(str(t.index), r.arrival_s, r.prompt_len, n, last - t.send, first - t.send,
                                     (last - first) / (n - 1) if n > 1 else None, float(waits.sum()), 0, 0, 0))
    return records


def scrape_counters(base_url: str, api_key: str | None = None) -> dict[str, float]:
    """flexserve's preemption/swap/recompute counters from /metrics (empty for other servers)."""
    import httpx

    try:
        text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for c in COUNTERS:
            if name == f"flexserve_{c}_total":
                out[c] = float(value)
    return out


def server_model(base_url: str, api_key: str | None) -> tuple[str, int | None, int | None]:
    """The first model id the server lists, its context window and vocabulary size when it says
    (`max_model_len` as vLLM; `vocab_size` is flexserve's)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    card = resp.json()["data"][0]
    return card["id"], card.get("max_model_len"), card.get("vocab_size")


def _raise_fd_limit() -> None:
    """Each request in flight holds a socket (two with --launch): lift the soft limit on open files."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


def http_run(label: str, base_url: str, trace, prompts, model: str, api_key: str | None) -> dict:
    _raise_fd_limit()
    before = scrape_counters(base_url)
    timings, makespan = asyncio.run(replay(base_url, trace, prompts, model, api_key))
    after = scrape_counters(base_url)
    records = records_from_timings(trace, timings)
    failed = [t.error for t in timings if t.error is not None or not t.token_times]
    row = {"scheduler": label, "mode": "http", **LatencyReport.of(records, makespan).row(),
           "failed": len(failed), "makespan_s": makespan,
           **{c: after.get(c, 0) - before.get(c, 0) for c in COUNTERS if c in after}}
    if failed:
        row["first_error"] = failed[0] or "no tokens"
    return {"row": row, "records": records}


# --- modes -----------------------------------------------------------------------------------------------------
def run_url(args) -> list[dict]:
    model, window, vocab = server_model(args.url, args.api_key)
    model = args.served_model_name or model
    max_context = min(x for x in (args.max_context, window) if x) if (args.max_context or window) else None
    trace = load_trace(args, max_context)
    prompts = prompt_ids(trace, args.seed, *token_range(vocab or 1000))
    return [http_run("server", args.url, trace, prompts, model, args.api_key)]


def run_launch(args) -> list[dict]:
    """One in-process engine and server per scheduler, one after the other, on the same trace and prompts."""
    import gc

    import torch

    shared: dict = {}
    runs = []
    for name in (args.schedulers or "skip-join-mlfq").split(","):
        runs.append(_launch_one(args, name, shared))
        # Free the last engine's weights and KV pools before the next loads: its default pool size is a share
        # of the memory free at that moment, so a leftover engine would shrink the next one's.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return runs


def _launch_one(args, scheduler: str, shared: dict) -> dict:
    from ..engine.remote import make_engine
    from ..server import ServerThread, build_app
    from ..server.app import engine_config_from_args

    run_args = copy.copy(args)
    run_args.scheduler = scheduler
    # A replay measures latency, not admission control: queue every request unless told otherwise.
    run_args.max_queue_len = args.max_queue_len or max(1024, args.num_requests)
    engine = make_engine(engine_config_from_args(run_args), getattr(args, "engine_process", None))
    if not shared:  # the trace and prompts of the first run serve every run
        cfg = engine.model_config
        shared["trace"] = trace = load_trace(args, min(args.max_context or cfg.max_position, cfg.max_position))
        shared["prompts"] = prompt_ids(trace, args.seed, *token_range(cfg.vocab_size))
    try:
        with ServerThread(build_app(engine)) as srv:
            return http_run_isolated(scheduler, srv.url, shared["trace"], shared["prompts"], engine.model_name)
    finally:
        with contextlib.suppress(RuntimeError):  # a step still running after the drain keeps its memory
            engine.release_memory()


def http_run_isolated(label: str, base_url: str, trace, prompts, model: str) -> dict:
    """`http_run` in a child process: the client's HTTP and JSON work must not compete for the server
    process's interpreter lock, or the benchmark would measure its own client."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(http_run, label, base_url, trace, prompts, model, None).result()


def sim_cost(args):
    """The simulator's step-time model with the overheads the flags set (None: its defaults)."""
    from ..scheduler.cost import LinearCostModel

    kw = {}
    if getattr(args, "sim_step_overhead_ms", None) is not None:
        kw["step_overhead_s"] = args.sim_step_overhead_ms / 1e3
    if getattr(args, "sim_seq_overhead_us", None) is not None:
        kw["s_per_seq"] = args.sim_seq_overhead_us / 1e6
    return LinearCostModel(**kw)


def run_simulate(args) -> list[dict]:
    from ..scheduler import SCHEDULERS, SchedulerConfig
    from ..scheduler.simulator import KVCacheConfig, simulate

    from ..engine.serving import EngineConfig

    trace = load_trace(args, args.max_context or SIM_MAX_CONTEXT)
    # The engine's batch limits (not SchedulerConfig's), so that --simulate predicts what --launch measures.
    engine_defaults = EngineConfig()
    sched = {k: getattr(args, k) if getattr(args, k) is not None else getattr(engine_defaults, k)
             for k in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk_size")}
    sched.update(scheduler_options(args))
    config = SchedulerConfig(**sched, max_queue_len=args.max_queue_len or max(1, len(trace)))
    kv = {k: v for k, v in (("num_gpu_blocks", args.num_gpu_blocks), ("num_cpu_blocks", args.num_cpu_blocks),
                            ("block_size", args.block_size)) if v is not None}
    runs = []
    for name in (args.schedulers or ",".join(SCHEDULERS)).split(","):
        res = simulate(trace, name, config=config, kv=KVCacheConfig(**kv), cost=sim_cost(args))
        row = res.row()
        row.update(mode="simulate", failed=row.pop("rejected"), makespan_s=res.makespan_s,
                   swaps=row.pop("swap_outs"))
        runs.append({"row": row, "records": res.records})
    return runs


# --- report ----------------------------------------------------------------------------------------------------
TABLE_COLUMNS = ["scheduler", "finished", "failed", "throughput_tok_s", "throughput_req_s", "ttft_mean_s",
                 "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p50_s", "tpot_p99_s", "jct_mean_s", "jct_p50_s",
                 "jct_p99_s", "queueing_frac"]


def format_table(rows: list[dict]) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def plot_cdfs(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "jct_s", "job completion time"), (axes[1], "ttft_s", "time to first token")):
        for run in runs:
            values = np.sort([getattr(r, key) for r in run["records"]])
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=run["row"]["scheduler"])
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_records(runs: list[dict], path: str) -> None:
    """Per-request records of every run, with the run's scheduler, as CSV (`read_records` reads them back)."""
    import csv

    names = [f.name for f in dataclasses.fields(RequestRecord)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scheduler", *names])
        for run in runs:
            for rec in run["records"]:
                w.writerow([run["row"]["scheduler"], *(getattr(rec, n) for n in names)])


def read_records(paths: list[str]) -> list[dict]:
    """Runs from `write_records` files (plain or .gz), in file order, one run per scheduler name per file.
    `PATH=LABEL` names the file's run LABEL (two runs of one policy with different flags), or its runs
    "LABEL: scheduler" when it holds several."""
    import csv
    import gzip

    from ..errors import ConfigError

    types = {f.name: f.type for f in dataclasses.fields(RequestRecord)}
    cast = {"str": str, "int": int, "float": float, "float | None": lambda v: float(v) if v else None}
    runs: list[dict] = []
    for entry in paths:
        path, _, label = entry.partition("=")
        by_name: dict[str, list[RequestRecord]] = {}
        try:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt", newline="") as f:
                for row in csv.DictReader(f):
                    name = row.pop("scheduler")
                    by_name.setdefault(name, []).append(RequestRecord(**{k: cast[types[k]](v) for k, v in row.items()}))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: not a --records file ({e})") from e
        for name, recs in by_name.items():
            shown = (label if len(by_name) == 1 else f"{label}: {name}") if label else name
            runs.append({"row": {"scheduler": shown}, "records": recs})
    return runs


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def run_serve_bench(args) -> int:
    if args.plot_records:
        if not args.plot:
            raise SystemExit("--plot-records needs --plot PATH.png")
        plot_cdfs(read_records(args.plot_records.split(",")), args.plot)
        print(f"wrote {args.plot}")
        return 0
    runs = run_simulate(args) if args.simulate else run_launch(args) if args.launch else run_url(args)
    extra = {"trace": args.trace, "rate": args.rate, "num_requests": args.num_requests}
    rows = [{**run["row"], **extra} for run in runs]
    print(format_table(rows))
    if args.plot:
        plot_cdfs(runs, args.plot)
        print(f"wrote {args.plot}")
    if args.records:
        write_records(runs, args.records)
        print(f"wrote {args.records}")
    if args.json:
        for row in rows:
            print("SERVE_RESULT " + json.dumps({k: _clean(v) for k, v in row.items()}))
    return 1 if any(r["finished"] == 0 for r in rows) else 0
