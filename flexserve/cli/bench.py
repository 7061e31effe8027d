"""`flexserve bench throughput` (FlexGen's offline benchmark) and `flexserve bench serve` (replay a request
trace against a server, or simulate it): their flags, and the typed settings the benchmarks run from."""
from __future__ import annotations

import argparse

from ..benchmarks.settings import BENCH_MODEL, ServeBenchSettings, ThroughputSettings, TraceSettings
from .common import add_model_arguments, add_policy_arguments, policy_for_model
from .serve import add_engine_arguments, engine_config_from_args


def add_throughput_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--h2d-gbps", type=float, default=None,
                   help="host-to-GPU bandwidth for the bound (default: measured now with pinned memory, "
                        "as `flexserve calibrate` does)")
    p.add_argument("--disk-gbps", type=float, default=None, help="disk read bandwidth for the bound")
    p.add_argument("--json", action="store_true", help="print one JSON line at the end")
    p.add_argument("--profile", default=None, help="write a torch.profiler trace to this file and print its top "
                   "operators: the last 2 decode steps (offload engine) or the whole timed block (paged engine)")
    p.add_argument("--engine", choices=["offload", "paged"], default="offload",
                   help="offload: the zig-zag offloading executor (default); paged: the serving engine (paged "
                        "KV cache, CUDA-graph decode), for resident or weights-only-offloaded models")


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
    add_policy_arguments(p)  # --launch: where the served model's weights live (`flexserve serve`'s flags)


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks: throughput (offline) or serve (online)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bt = bsub.add_parser("throughput", help="offloaded generation throughput (FlexGen's benchmark)")
    add_model_arguments(bt)
    add_policy_arguments(bt)
    add_throughput_arguments(bt)
    bt.set_defaults(func=cmd_bench_throughput)
    bs = bsub.add_parser("serve", help="replay a request trace against the serving engine")
    add_model_arguments(bs)
    add_serve_bench_arguments(bs)
    bs.set_defaults(func=cmd_bench_serve)


def check_range(args: argparse.Namespace, least: dict[str, float], above: dict[str, float] = {}) -> None:
    """Refuse flags set below their least value (`least`: >=, `above`: >), naming the flag."""
    from ..errors import ConfigError

    for name, low in least.items():
        value = getattr(args, name, None)
        if value is not None and not value >= low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low:g}, got {value:g}")
    for name, low in above.items():
        value = getattr(args, name, None)
        if value is not None and not value > low:
            raise ConfigError(f"--{name.replace('_', '-')} must be > {low:g}, got {value:g}")


def throughput_settings(args: argparse.Namespace) -> ThroughputSettings:
    """`ThroughputSettings` from the `bench throughput` flags."""
    check_range(args, {"prompt_len": 1, "gen_len": 1}, {"h2d_gbps": 0, "disk_gbps": 0})
    return ThroughputSettings(model=args.model or BENCH_MODEL, dtype=args.dtype, device=args.device, offload_dir=args.offload_dir,
                              prompt_len=args.prompt_len, gen_len=args.gen_len, h2d_gbps=args.h2d_gbps,
                              disk_gbps=args.disk_gbps, json=args.json, profile=args.profile, engine=args.engine)


def trace_settings(args: argparse.Namespace) -> TraceSettings:
    """`TraceSettings` from the `bench serve` trace flags."""
    check_range(args, {"num_requests": 1, "max_context": 2, "prompt_len": 1, "output_len": 1, "max_output_len": 1,
                       "sim_step_overhead_ms": 0, "sim_seq_overhead_us": 0},
                {"rate": 0, "cv": 0, "output_alpha": 0})
    return TraceSettings(trace=args.trace, rate=args.rate, cv=args.cv, num_requests=args.num_requests,
                         max_context=args.max_context, prompt_len=args.prompt_len, output_len=args.output_len,
                         output_dist=args.output_dist, output_alpha=args.output_alpha,
                         max_output_len=args.max_output_len, seed=args.seed)


def serve_bench_settings(args: argparse.Namespace) -> ServeBenchSettings:
    """`ServeBenchSettings` from the `bench serve` flags (any mode but --plot-records)."""
    mode = "simulate" if args.simulate else "launch" if args.launch else "url"
    return ServeBenchSettings(
        mode=mode, trace=trace_settings(args), url=args.url, api_key=args.api_key,
        served_model_name=args.served_model_name,
        schedulers=args.schedulers.split(",") if args.schedulers else None,
        engine=engine_config_from_args(args), engine_process=args.engine_process, max_queue_len=args.max_queue_len,
        sim_step_overhead_ms=args.sim_step_overhead_ms, sim_seq_overhead_us=args.sim_seq_overhead_us,
        json=args.json, plot=args.plot, records=args.records)


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from ..benchmarks.throughput import run_throughput

    settings = throughput_settings(args)
    policy = policy_for_model(args, settings.model, settings.prompt_len, settings.gen_len)
    return run_throughput(settings, policy)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from ..benchmarks.serve import plot_records, run_serve_bench

    if args.plot_records:
        if not args.plot:
            raise SystemExit("--plot-records needs --plot PATH.png")
        return plot_records(args.plot_records.split(","), args.plot)
    return run_serve_bench(serve_bench_settings(args))
