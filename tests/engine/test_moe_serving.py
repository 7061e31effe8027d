"""The paged serving engine on mixtures of experts: concurrent requests, prompts chunked and batched with decode
rows, weights resident or with the experts off the GPU, give each request transformers' greedy tokens."""
import asyncio

import pytest

from flexserve import Policy, SamplingParams
from flexserve.engine.serving import AsyncEngine, EngineConfig

from ..conftest import hf_greedy

PROMPTS = [[(5 * i + j) % 90 + 3 for j in range(2 + 4 * i)] for i in range(6)]  # 2 .. 22 tokens
LENGTHS = [3 + (i * 3) % 7 for i in range(6)]


async def _tokens(engine, prompt, n):
    toks = []
    async for out in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)):
        toks += out.new_token_ids
    return toks


def _serve(config: EngineConfig) -> list[list[int]]:
    engine = AsyncEngine(config)

    async def main():
        engine.start()
        try:
            return await asyncio.gather(*[_tokens(engine, p, n) for p, n in zip(PROMPTS, LENGTHS)])
        finally:
            await engine.shutdown()
    return asyncio.run(main())


@pytest.mark.parametrize("kind, policy", [
    ("mixtral", None),
    ("qwen2-moe", Policy.from_percent((60, 40, 100, 0, 100, 0), expert_compute="cpu")),
    ("qwen3-moe", Policy.from_percent((60, 40, 100, 0, 100, 0), expert_compute="copy")),
])
def test_serving_matches_transformers(tiny_model, tmp_path, kind, policy):
    folder, hf = tiny_model(kind)
    got = _serve(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64, block_size=8,
                              max_num_seqs=4, prefill_chunk_size=8, max_num_batched_tokens=24, policy=policy,
                              offload_dir=str(tmp_path)))
    assert got == [hf_greedy(hf, p, n) for p, n in zip(PROMPTS, LENGTHS)]
