"""StreamingLLM in the serving engine: a window that covers the whole sequence changes nothing; a stream
longer than the context keeps generating with a bounded KV footprint; what cannot stream says so."""
import asyncio

import pytest

from flexserve import LLM, PromptTooLongError, SamplingParams
from flexserve.engine.serving import AsyncEngine, EngineConfig
from flexserve.errors import ConfigError, PolicyError

PROMPT = [(5 * j + 2) % 90 + 3 for j in range(20)]


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _generate(engine, prompt, params, watch=None):
    async def main():
        engine.start()
        try:
            toks = []
            async for out in engine.generate(prompt, params):
                toks += out.new_token_ids
                if watch is not None:
                    watch.append(engine.stats()["kv_blocks_used"])
            return toks, out
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def test_window_covering_everything_equals_full_attention(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu") as llm:
        want = llm.generate({"prompt_token_ids": PROMPT}, _greedy(30))[0].outputs[0].token_ids
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64, block_size=4,
                                      attention_sinks=4, sliding_window=64))
    got, _ = _generate(engine, PROMPT, _greedy(30))
    assert got == want


def test_stream_past_the_context_window_with_bounded_kv(tiny_model):
    folder, _ = tiny_model("llama-gqa")  # context window 128 positions
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=16, block_size=4,
                                      prefill_chunk_size=8, attention_sinks=4, sliding_window=16))
    used = []
    toks, last = _generate(engine, PROMPT, _greedy(300), watch=used)
    assert len(toks) == 300 and last.finish_reason == "length"  # 320 positions, past the window of 128
    assert max(used) <= engine.blocks.max_blocks_held(10 ** 9, 8) <= 8  # 16 blocks would hold 64 tokens
    # without a window the same request is clipped to the context window
    plain = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64, block_size=4))
    clipped, _ = _generate(plain, PROMPT, _greedy(300))
    assert len(clipped) == 128 - len(PROMPT)
    assert toks[:len(clipped)] != clipped  # the window (16 tokens) changes what the model sees early on


def test_streaming_needs_rotary_positions_and_a_window(tiny_model):
    folder, _ = tiny_model("opt")
    with pytest.raises(PolicyError, match="rotary"):
        AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", sliding_window=16))
    with pytest.raises(ConfigError, match="sliding window"):
        EngineConfig(attention_sinks=4)
    with pytest.raises(PromptTooLongError):  # the plain engine still refuses a prompt over the window
        engine = AsyncEngine(EngineConfig(model=tiny_model("llama-gqa")[0], dtype="float32", device="cpu",
                                          num_gpu_blocks=64))
        engine.validate(list(range(3, 93)) * 2, _greedy(4))


def test_llm_with_a_window_streams_past_the_context(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu") as full:
        want = full.generate({"prompt_token_ids": PROMPT}, _greedy(30))[0].outputs[0].token_ids
    with LLM(folder, dtype="float32", device="cpu", sliding_window=64, attention_sinks=4) as wide:
        assert wide.generate({"prompt_token_ids": PROMPT}, _greedy(30))[0].outputs[0].token_ids == want
    with LLM(folder, dtype="float32", device="cpu", sliding_window=16, attention_sinks=4) as llm:
        outs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:5]}],
                            [_greedy(200), SamplingParams(max_tokens=150, n=2, seed=3, logprobs=1, ignore_eos=True)])
        assert len(outs[0].outputs[0].token_ids) == 200  # 220 positions: past the window of 128
        assert outs[0].outputs[0].finish_reason == "length"
        a, b = outs[1].outputs
        assert len(a.token_ids) == len(b.token_ids) == 150 and a.token_ids != b.token_ids  # two seeded samples
        assert len(a.logprobs) == 150 and a.cumulative_logprob < 0
        again = llm.generate({"prompt_token_ids": PROMPT}, _greedy(200))[0].outputs[0].token_ids
        assert again == outs[0].outputs[0].token_ids  # the engine keeps serving across calls
