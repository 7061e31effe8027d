"""`flexserve bench throughput --engine paged`: FlexGen's offline benchmark on the serving engine.

The same workload as the offloading executor's benchmark (one block of `gpu_batch_size x num_gpu_batches`
random prompts of `--prompt-len` tokens, `--gen-len` tokens each, greedy, eos ignored), run through the paged
engine instead: one prefill step for the whole block, then decode steps that run as CUDA graphs over the
paged-attention kernel. Resident weights (or weights-only offloading) are what this engine serves; it is the
fast path for a model that fits, and it reports the same prefill / decode / total figures (decode =
block x (G - 1) / decode time, the decode time starting when the last sequence got its first token).
"""
from __future__ import annotations

import asyncio
import time

import psutil
import torch

from ..offload.policy import Policy
from .settings import ThroughputSettings


def _profiler(dev: torch.device):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else []))


def _report(prof, dev: torch.device, path: str, rows: int = 15) -> None:
    """Write the trace to `path` and print the operators and kernels that took the most device time, then
    host time."""
    prof.export_chrome_trace(path)
    averages = prof.key_averages()
    for key in (["self_cuda_time_total"] if dev.type == "cuda" else []) + ["self_cpu_time_total"]:
        print(averages.table(sort_by=key, row_limit=rows, max_name_column_width=60))


def run_paged_throughput(args: ThroughputSettings, policy: Policy | None) -> int:
    from ..engine.sampling import SamplingParams
    from ..engine.serving import AsyncEngine, EngineConfig
    from .throughput import print_result

    block = (policy.gpu_batch_size * policy.num_gpu_batches) if policy is not None else 32
    t0 = time.perf_counter()
    engine = AsyncEngine(EngineConfig(
        model=args.model or "dummy:opt-125m", dtype=args.dtype, device=args.device, scheduler="fcfs",
        max_num_seqs=block, max_num_batched_tokens=block * args.prompt_len, prefill_chunk_size=args.prompt_len,
        policy=policy, offload_dir=args.offload_dir, max_queue_len=2 * block + 1))
    load_s = time.perf_counter() - t0
    cfg, dev = engine.model_config, engine.device
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, cfg.vocab_size, (block, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)

    async def one(prompt, p, first: list[float]) -> int:
        n = 0
        async for out in engine.generate(prompt, p):
            if n == 0 and out.new_token_ids:
                first.append(time.perf_counter())
            n += len(out.new_token_ids)
        return n

    async def run_all(batch, p) -> tuple[float, float, float, int]:
        first: list[float] = []
        t = time.perf_counter()
        counts = await asyncio.gather(*[one(q, p, first) for q in batch])
        return t, max(first), time.perf_counter(), sum(counts)

    async def main():
        engine.start()
        try:
            await engine.warm_up()  # kernels compile and decode graphs are captured before the clock starts
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            if not args.profile:
                return await run_all(prompts, params)
            # the whole timed block, prefill and every decode step, recorded on the engine's own thread
            prof = _profiler(dev)
            await asyncio.wrap_future(engine.call_in_engine(prof.__enter__))
            try:
                return await run_all(prompts, params)
            finally:
                await asyncio.wrap_future(engine.call_in_engine(lambda: prof.__exit__(None, None, None)))
                _report(prof, dev, args.profile)
        finally:
            await engine.shutdown()

    start, first_all, end, tokens = asyncio.run(main())
    prefill_s, decode_s = first_all - start, end - first_all
    decode_tps = block * (args.gen_len - 1) / decode_s if args.gen_len > 1 and decode_s > 0 else 0.0
    result = {
        "engine": "paged", "model": args.model or "dummy:opt-125m",
        "policy": policy.percent_flags() if policy is not None else "resident",
        "dtype": str(engine.dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "prompt_len": args.prompt_len, "gen_len": args.gen_len, "block": block, "load_s": round(load_s, 2),
        "generated_tokens": tokens, "cuda_graphs": engine.graphs is not None,
        "prefill_tok_s": block * args.prompt_len / prefill_s, "decode_tok_s": decode_tps,
        "total_tok_s": block * args.gen_len / (prefill_s + decode_s),
        "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
        "peak_cpu_rss_gb": psutil.Process().memory_info().rss / 1e9,
    }
    print_result(result, args.json)
    return 0 if tokens == block * args.gen_len else 1
