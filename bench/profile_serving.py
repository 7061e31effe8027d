"""Where a serving step's time goes: the engine without HTTP, per-phase wall times and a torch.profiler table.

    python bench/profile_serving.py --model dummy:llama-3-8b --dtype bfloat16 --requests 256 --trace-out t.json

Submits `--requests` requests at once (prompts 64/128/256/512 tokens cycling, `--max-tokens` each, the
workload of bench/traces/batch256_uniform.csv), times every step's phases (schedule, batch build, forward,
sampling and delivery), and profiles `--profile-steps` decode steps. Prints one `PROFILE_RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from flexserve import SamplingParams  # noqa: E402
from flexserve.engine import paged_batch, runner  # noqa: E402
from flexserve.engine.serving import AsyncEngine, EngineConfig  # noqa: E402


def _count_swaps(schedule, counts: collections.Counter, profiling):
    """Count the blocks each step swaps, by kind: demand swaps (the step's compute waits for them) and swaps
    ahead of need (they may overlap compute), over the whole run and over the profiled steps."""
    def wrapper(*a, **k):
        out = schedule(*a, **k)
        for kind in ("swap_out", "swap_in", "swap_out_ahead", "swap_in_ahead"):
            n = len(getattr(out, kind))
            counts[kind] += n
            if profiling():
                counts["profiled_" + kind] += n
        return out
    return wrapper


def _timed(acc: collections.Counter, label: str, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[label] += time.perf_counter() - t
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="prompts of uniform random length in [LO, HI] instead of 64/128/256/512 cycling")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's own")
    p.add_argument("--prefill-chunk-size", type=int, default=None, help="default: the engine's own")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--profile-after", type=int, default=30, help="steps to run before profiling")
    p.add_argument("--scheduler", default="fcfs", help="fcfs | mlfq | skip-join-mlfq")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --requests")
    p.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="a small pool forces preemption and KV swaps (to see the copy stream in the trace)")
    p.add_argument("--trace-out", default=None, help="write a Chrome trace of the profiled steps here")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="read each step's tokens before planning the next (the synchronous engine)")
    args = p.parse_args()

    engine = AsyncEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                      scheduler=args.scheduler, max_num_seqs=args.max_num_seqs or args.requests,
                                      max_num_batched_tokens=args.max_num_batched_tokens,
                                      prefill_chunk_size=args.prefill_chunk_size,
                                      num_gpu_blocks=args.num_gpu_blocks, max_queue_len=args.requests + 1,
                                      async_scheduling=args.async_scheduling))
    acc: collections.Counter = collections.Counter()
    prof_state = {"prof": None, "done": False}
    sched = engine.scheduler
    sched.schedule = _timed(acc, "schedule", _count_swaps(sched.schedule, swap_blocks := collections.Counter(),
                                                           lambda: prof_state["prof"] is not None
                                                           and not prof_state["done"]))
    sched.on_step_done = _timed(acc, "on_step_done", sched.on_step_done)
    engine.runner.execute = _timed(acc, "forward", engine.runner.execute)
    engine.outputs.deliver = _timed(acc, "deliver", engine.outputs.deliver)
    engine.outputs._advance_text = _timed(acc, "detokenize", engine.outputs._advance_text)
    build = paged_batch.PagedBatch.build
    paged_batch.PagedBatch.build = _timed(acc, "batch_build", build)
    runner.PagedBatch = paged_batch.PagedBatch
    runner.sample = _timed(acc, "sample", runner.sample)
    runner.SampledStep.output = _timed(acc, "wait_tokens", runner.SampledStep.output)

    step_times: list[tuple[int, float]] = []  # (tokens sampled, seconds)
    orig_step = engine.step

    def step():
        # An asynchronous engine is timed from step start to step start: syncing the device each step would
        # take away the overlap it is built for.
        sync = engine.device.type == "cuda" and not engine._async
        if sync:
            torch.cuda.synchronize(engine.device)
        t = time.perf_counter()
        before = engine.counters["generated_tokens"]
        running_decode = engine.counters["steps"] >= args.profile_after and not prof_state["done"]
        if running_decode and prof_state["prof"] is None:
            cuda = engine.device.type == "cuda"
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            prof_state["prof"] = torch.profiler.profile(activities=acts)
            prof_state["prof"].__enter__()
            prof_state["left"] = args.profile_steps
        orig_step()
        if sync:
            torch.cuda.synchronize(engine.device)
        step_times.append((engine.counters["generated_tokens"] - before, time.perf_counter() - t))
        if prof_state["prof"] is not None and not prof_state["done"]:
            prof_state["left"] -= 1
            if prof_state["left"] == 0:
                prof_state["prof"].__exit__(None, None, None)
                prof_state["done"] = True
    engine.step = step

    g = torch.Generator().manual_seed(0)
    lens = [(64, 128, 256, 512)[i % 4] for i in range(args.requests)] if args.prompt_range is None else \
        torch.randint(args.prompt_range[0], args.prompt_range[1] + 1, (args.requests,), generator=g).tolist()
    prompts = [torch.randint(10, min(10_000, engine.model_config.vocab_size), (n,), generator=g).tolist()
               for n in lens]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    async def one(prompt):
        n = 0
        async for out in engine.generate(prompt, params):
            n += len(out.new_token_ids)
        return n

    async def run():
        engine.start()
        t = time.perf_counter()
        counts = await asyncio.gather(*[one(pr) for pr in prompts])
        dt = time.perf_counter() - t
        await engine.shutdown()
        return sum(counts), dt

    tokens, seconds = asyncio.run(run())
    decode = [s for n, s in step_times if n == args.requests]
    stats = engine.stats()
    result = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "steps": len(step_times),
              "swaps": stats["num_swaps"], "preemptions": stats["num_preemptions"],
              "full_decode_steps": len(decode),
              "full_decode_step_ms_median": 1e3 * sorted(decode)[len(decode) // 2] if decode else None,
              "phase_ms_per_step": {k: 1e3 * v / max(1, len(step_times)) for k, v in acc.items()},
              "swap_blocks": dict(swap_blocks)}
    prof = prof_state["prof"]
    if prof is not None:
        key = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
        if args.trace_out:
            prof.export_chrome_trace(args.trace_out)
            result["copy_overlap"] = copy_overlap(args.trace_out)
    result["settings"] = {k: getattr(engine.settings, k) for k in ("max_num_seqs", "max_num_batched_tokens",
                                                                   "prefill_chunk_size", "num_gpu_blocks")}
    print("PROFILE_RESULT " + json.dumps(result))


def copy_overlap(trace_path: str) -> dict:
    """How much of the host<->device copy time (KV swaps) ran while a kernel ran on another stream.

    Reads the Chrome trace: copies are `gpu_memcpy` events, compute is `kernel` events; the fraction is the
    copies' time covered by the union of kernel intervals of other streams, so 1.0 means fully hidden; per
    copying stream, since the compute stream's own small metadata uploads cannot overlap by construction.
    """
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    kernels, copies = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("args", {}).get("stream"))
        if e.get("cat") == "kernel":
            kernels.append(span)
        elif e.get("cat") == "gpu_memcpy" and "Pinned" in e.get("name", ""):
            copies.append(span)
    per_stream: dict = {}
    for lo, hi, stream in copies:
        row = per_stream.setdefault(str(stream), {"copies": 0, "copy_ms": 0.0, "overlapped_ms": 0.0})
        row["copies"] += 1
        row["copy_ms"] += (hi - lo) / 1e3
        pieces = sorted((max(lo, a), min(hi, b)) for a, b, s in kernels if s != stream and a < hi and b > lo)
        end = lo
        for a, b in pieces:
            a = max(a, end)
            if b > a:
                row["overlapped_ms"] += (b - a) / 1e3
                end = b
    for row in per_stream.values():  # the compute stream's own small uploads show up with fraction ~0
        row["overlapped_fraction"] = row["overlapped_ms"] / row["copy_ms"] if row["copy_ms"] else None
    return per_stream

if __name__ == "__main__":
    main()
