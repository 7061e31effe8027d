"""Run under torchrun by test_tp_serving.py: the serving engine with tensor/pipeline parallelism on gloo/CPU.

Rank 0 serves concurrent requests through the engine's async API (with preemption and KV swaps when the
pool is small); the other ranks follow its steps. Rank 0 prints one JSON line: tokens per request, stats.
"""
import asyncio
import json
import sys

from flexserve import SamplingParams
from flexserve.engine.serving import AsyncEngine, EngineConfig
from flexserve.parallel.serving import ServingGroup

folder, scheduler, gpu_blocks, prompts, lengths = sys.argv[1], sys.argv[2], int(sys.argv[3]), *json.loads(sys.argv[4])
tp, pp = (int(v) for v in sys.argv[5].split("x")) if len(sys.argv) > 5 else (2, 1)
engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", scheduler=scheduler, tensor_parallel=tp,
                                  pipeline_parallel=pp,
                                  num_gpu_blocks=gpu_blocks, num_cpu_blocks=400, block_size=8, max_num_seqs=6,
                                  prefill_chunk_size=16, max_num_batched_tokens=64, join_group=ServingGroup.join))
if not engine.tp.is_driver:
    from flexserve.parallel.serving import exit_worker

    engine.run_worker()
    exit_worker(0)


async def one(p, n):
    toks = []
    async for out in engine.generate(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)):
        toks += out.new_token_ids
    return toks


async def main():
    engine.start()
    try:
        res = await asyncio.gather(*[one(p, n) for p, n in zip(prompts, lengths)])
        return res, engine.stats()
    finally:
        await engine.shutdown()

tokens, stats = asyncio.run(main())
print("TP_ENGINE " + json.dumps({"tokens": tokens, "swaps": stats["num_swaps"], "blocks_used": stats["kv_blocks_used"],
                                 "heads": engine.model_config.num_heads,
                                 "layers": engine.model_config.num_layers}), flush=True)
