"""`flexserve serve`: the HTTP server's flags and the engine flags it shares with `flexserve bench serve`.

Engine flags default to None, meaning "the `EngineConfig` default": the defaults live in one place, and a flag
maps to the `EngineConfig` field of the same name.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from ..scheduler.policies import ALL_SCHEDULERS as SCHEDULER_CHOICES  # torch-free: the parser loads no model code
from .common import add_model_arguments, add_policy_arguments, policy_for_model, serving_plan_from_args

if TYPE_CHECKING:
    from ..engine.serving import EngineConfig

# The flags below that set `SchedulerConfig` fields of the same name.
SCHEDULER_FLAGS = ("num_levels", "base_quantum_s", "quantum_ratio", "starvation_threshold_s",
                   "starvation_check_interval", "tail_guard_s", "tail_guard_seats")


def scheduler_options(args: argparse.Namespace) -> dict:
    """The `SchedulerConfig` fields the scheduler flags set (flags left out keep the field's default)."""
    return {n: getattr(args, n) for n in SCHEDULER_FLAGS if getattr(args, n, None) is not None}


def add_engine_arguments(p: argparse.ArgumentParser, with_scheduler: bool = True) -> None:
    """Flags that map to `EngineConfig` fields (shared by `serve` and `bench serve`, which has its own
    `--schedulers` list instead of `--scheduler`)."""
    g = p.add_argument_group("serving engine")
    if with_scheduler:
        g.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="skip-join-mlfq",
                       help="scheduling policy (default skip-join-mlfq)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences in one step (default: as many 2k-token contexts as the KV pool holds, at most "
                        "256; 64 on a CPU)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens in one step (default: what the GPU computes in ~50 ms for this model, 2048-16384; "
                        "2048 on a CPU)")
    g.add_argument("--attention-sinks", type=int, default=None,
                   help="StreamingLLM: tokens at the start of every sequence that all queries keep seeing "
                        "(needs --sliding-window; default 0)")
    g.add_argument("--sliding-window", type=int, default=None,
                   help="StreamingLLM: each query sees only its last W tokens (plus the sinks); the KV of the "
                        "rest is freed, so generation can run past the context window (default 0: off)")
    g.add_argument("--prefill-chunk-size", type=int, default=None,
                   help="prompt tokens of one request per step (default: the token budget; 512 on a CPU)")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    g.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV blocks on the compute device (default: 90%% of free GPU memory after the weights, less "
                        "one step's activations; 1 GiB on a CPU)")
    g.add_argument("--num-cpu-blocks", type=int, default=None,
                   help="KV blocks in pinned host memory (default: 4 GiB; 1 GiB on a CPU)")
    g.add_argument("--num-levels", type=int, default=None,
                   help="MLFQ: priority queues; the lowest is served first come, first served (default 4)")
    g.add_argument("--base-quantum-s", type=float, default=None,
                   help="MLFQ: iteration time a job may use in the top queue before demotion (default 0.01)")
    g.add_argument("--quantum-ratio", type=float, default=None,
                   help="MLFQ: each lower queue's quantum is this many times the one above (default 2)")
    g.add_argument("--starvation-threshold-s", type=float, default=None,
                   help="skip-join MLFQ: jobs idle this long go back to the top queue (default 3; inf: never)")
    g.add_argument("--starvation-check-interval", type=int, default=None,
                   help="skip-join MLFQ: iterations between starvation checks (default 1000)")
    g.add_argument("--tail-guard-s", type=float, default=None,
                   help="MLFQ: serve a job this many seconds past its arrival ahead of the others, never demoted "
                        "(bounds the long jobs' JCT; default off)")
    g.add_argument("--tail-guard-seats", type=int, default=None,
                   help="MLFQ: jobs served under the tail guard at once (default: every seat)")
    g.add_argument("--max-queue-len", type=int, default=None,
                   help="requests not yet started before new ones get HTTP 429 (default 1024)")
    g.add_argument("--tensor-parallel", "-tp", type=int, default=None,
                   help="split every layer over this many ranks (start with torchrun --nproc-per-node N; rank 0 "
                        "serves HTTP)")
    g.add_argument("--pipeline-parallel", "-pp", type=int, default=None,
                   help="split the layers into this many stages, one rank group each (for a model larger than "
                        "one GPU); tp x pp = the number of torchrun processes")
    g.add_argument("--engine-process", dest="engine_process", action="store_true", default=None,
                   help="run the engine in a child process, so that HTTP streaming and the engine loop do not "
                        "share one interpreter lock (default: on with a GPU, off on a CPU)")
    g.add_argument("--no-engine-process", dest="engine_process", action="store_false",
                   help="run the engine in the server's own process (the default on a CPU)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run decode steps eagerly instead of replaying CUDA graphs (for debugging and A/B runs)")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false", default=None,
                   help="read each step's tokens before planning the next, instead of planning it while the "
                        "step computes (for A/B runs; parallel engines always do)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """`--host/--port/--api-key/--served-model-name` plus the engine flags."""
    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on (1..65535)")
    g.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every /v1 route (also read from FLEXSERVE_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's name)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on Ctrl-C, seconds to let in-flight requests finish before cancelling them")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_arguments(p)


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics). Requests that give no temperature sample at "
                                   "temperature 1, as OpenAI's API does (`flexserve generate` defaults to 0: "
                                   "greedy).")
    add_model_arguments(s)
    add_policy_arguments(s)
    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """`EngineConfig` from parsed flags: every flag named like a field sets it; the placement flags (where the
    verb has them) set `policy`; -tp/-pp above 1 join the torchrun group. Flags left at None keep the field's
    default."""
    from ..engine.serving import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    kw = {n: getattr(args, n) for n in names - {"policy"} if getattr(args, n, None) is not None}
    options = scheduler_options(args)
    if options:
        kw["scheduler_options"] = {**kw.get("scheduler_options", {}), **options}
    if "policy" in names and getattr(args, "policy", None) == "auto":  # placement, KV pool and seats
        kw.update(serving_plan_from_args(args, kw))
    elif "policy" in names and hasattr(args, "percent"):
        kw["policy"] = policy_for_model(args, args.model)
    if kw.get("tensor_parallel", 1) > 1 or kw.get("pipeline_parallel", 1) > 1:  # under torchrun
        from ..parallel.serving import ServingGroup

        kw["join_group"] = ServingGroup.join
    return EngineConfig(**kw)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..server.app import ServerOptions, run_server

    options = ServerOptions(host=args.host, port=args.port, api_key=args.api_key,
                            served_model_name=args.served_model_name, drain_timeout=args.drain_timeout,
                            log_level=args.log_level, engine_process=args.engine_process)
    return run_server(engine_config_from_args(args), options)
