"""The serving engine: continuous batching, paged KV, preemption with swaps or recomputation, cancellation.

Every scheduler must give each request exactly the greedy tokens the offline `LLM` gives for it alone,
however often it was preempted and whichever pool its KV cache sat in meanwhile.
"""
import asyncio

import pytest
import torch

from flexserve import LLM, PromptTooLongError, SamplingParams
from flexserve.engine.serving import AsyncEngine, EngineConfig
from flexserve.scheduler import QueueFullError

PROMPTS = [[(7 * i + j) % 90 + 3 for j in range(3 + 5 * i)] for i in range(16)]  # 3 .. 78 tokens
LENGTHS = [4 + (i * 5) % 17 for i in range(16)]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu") as llm:
        return folder, [llm.generate({"prompt_token_ids": p}, greedy(n))[0].outputs[0].token_ids
                        for p, n in zip(PROMPTS, LENGTHS)]


async def _collect(engine, prompt, params):
    toks, text = [], ""
    async for out in engine.generate(prompt, params):
        toks += out.new_token_ids
        text += out.text_delta
    return toks, text, out


def _run(engine, coro_fn):
    async def main():
        engine.start()
        try:
            return await coro_fn()
        finally:
            await engine.shutdown()
    return asyncio.run(main())


@pytest.mark.parametrize("scheduler, gpu_blocks, cpu_blocks, expect", [
    ("fcfs", 400, 64, None),
    ("mlfq", 24, 400, "swaps"),
    ("skip-join-mlfq", 24, 400, "swaps"),
    ("skip-join-mlfq", 24, 2, "recomputes"),
])
def test_concurrent_requests_match_offline(reference, scheduler, gpu_blocks, cpu_blocks, expect):
    _check_concurrent(reference, scheduler, gpu_blocks, cpu_blocks, expect, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream needs a GPU")
def test_swaps_on_the_copy_stream_keep_outputs_exact(reference):
    """On a GPU, swaps (ahead of need ones overlapping the forward) must not change a single token."""
    _check_concurrent(reference, "skip-join-mlfq", 24, 400, "swaps", "cuda")


def _check_concurrent(reference, scheduler, gpu_blocks, cpu_blocks, expect, device):
    folder, ref = reference
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device=device, scheduler=scheduler,
                                      num_gpu_blocks=gpu_blocks, num_cpu_blocks=cpu_blocks, block_size=8,
                                      max_num_seqs=6, prefill_chunk_size=16, max_num_batched_tokens=64))

    async def go():
        res = await asyncio.gather(*[_collect(engine, p, greedy(n)) for p, n in zip(PROMPTS, LENGTHS)])
        return res, engine.stats()
    results, stats = _run(engine, go)
    assert [r[0] for r in results] == ref
    assert all(r[2].finished and r[2].finish_reason == "length" for r in results)
    assert stats["kv_blocks_used"] == 0 and stats["cpu_blocks_used"] == 0 and stats["finished_requests"] == 16
    if expect == "swaps":
        assert stats["num_swaps"] > 0 and stats["num_preemptions"] > 0
    if expect == "recomputes":
        assert stats["num_recomputes"] > 0


def test_abort_frees_blocks_and_queue_full(reference):
    folder, _ = reference
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64,
                                      max_num_seqs=2, max_queue_len=2))

    async def go():
        gen = engine.generate(PROMPTS[5], greedy(100))
        first = await gen.__anext__()
        assert first.new_token_ids
        await gen.aclose()  # the client went away
        for _ in range(200):
            await asyncio.sleep(0.01)
            if engine.stats()["kv_blocks_used"] == 0:
                break
        freed = engine.stats()["kv_blocks_used"]
        # flood: only max_queue_len may wait, the rest are refused with QueueFullError
        tasks = [asyncio.ensure_future(_collect(engine, PROMPTS[i], greedy(30))) for i in range(10)]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return freed, done
    freed, done = _run(engine, go)
    assert freed == 0
    errors = [d for d in done if isinstance(d, BaseException)]
    assert errors and all(isinstance(e, QueueFullError) for e in errors)
    assert any(not isinstance(d, BaseException) for d in done)


def test_bad_requests(reference):
    folder, _ = reference
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64))

    async def go():
        with pytest.raises(PromptTooLongError):
            await _collect(engine, [5] * 200, greedy(4))
        # still healthy afterwards, and generation is clipped at the context window (128)
        toks, _, last = await _collect(engine, [5] * 120, greedy(50))
        return toks, last
    toks, last = _run(engine, go)
    assert len(toks) == 8 and last.finish_reason == "length"


def test_stop_strings_logprobs_and_text(tmp_path):
    engine = AsyncEngine(EngineConfig(dtype="float32", device="cpu", num_gpu_blocks=256))
    llm_ids = engine.tokenizer.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])

    async def go():
        full = await _collect(engine, llm_ids, SamplingParams(max_tokens=20, temperature=0))
        stopped = await _collect(engine, llm_ids, SamplingParams(max_tokens=20, temperature=0, stop=[" of"],
                                                                 logprobs=2))
        return full, stopped
    (toks, text, last), (toks2, text2, last2) = _run(engine, go)
    assert "Paris" in text and last.finish_reason == "stop"
    assert text2 == text[:text.index(" of")] and last2.finish_reason == "stop"
    # one logprobs entry per delivered token (an output may carry several when the consumer fell behind)
    assert last2.logprobs and len(last2.logprobs) == len(last2.new_token_ids)
    assert all(t in lp for t, lp in zip(last2.new_token_ids, last2.logprobs)) and toks2[-1] in last2.logprobs[-1]


def test_serving_a_model_whose_weights_are_offloaded(reference, tmp_path):
    """The join: the serving engine streams weights from the CPU and disk tiers through the executor's layer
    stream, with preemption and swapping on, and still gives every request its exact greedy tokens."""
    from flexserve import Policy
    from flexserve.memory.tiers import Tier

    folder, ref = reference
    policy = Policy.from_percent((20, 40, 100, 0, 100, 0))
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", scheduler="skip-join-mlfq",
                                      num_gpu_blocks=24, num_cpu_blocks=400, block_size=8, max_num_seqs=6,
                                      prefill_chunk_size=16, policy=policy, offload_dir=str(tmp_path)))
    tiers = {h.tier for layer in engine.executor.layers for h in layer.offloaded.values()}
    assert tiers == {Tier.CPU, Tier.DISK}

    async def go():
        res = await asyncio.gather(*[_collect(engine, p, greedy(n)) for p, n in zip(PROMPTS, LENGTHS)])
        return res, engine.stats()
    results, stats = _run(engine, go)
    assert [r[0] for r in results] == ref
    assert stats["num_swaps"] > 0 and stats["kv_blocks_used"] == 0


def _decode_graph_engine(folder, device, capture):
    """An engine whose decode-only steps go through DecodeGraphs (captured on CUDA; eager static batch else)."""
    from flexserve.engine.decode_graphs import DecodeGraphs

    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device=device, num_gpu_blocks=400,
                                      block_size=8, max_num_seqs=6, prefill_chunk_size=16,
                                      max_num_batched_tokens=64, cuda_graphs=False))
    engine.runner.graphs = DecodeGraphs(engine.runner.forward, 6, 64, 8, engine.kv.scratch_block, engine.device,
                                        capture=capture)
    return engine


def test_padded_decode_batches_match_offline(reference):
    """The static, padded decode batch of the CUDA-graph path (run eagerly here): padding rows write only the
    scratch block, so every request still gets exactly its offline tokens."""
    folder, ref = reference
    engine = _decode_graph_engine(folder, "cpu", capture=False)
    used = []
    run = engine.graphs.run
    engine.graphs.run = lambda batch: used.append(batch.slots.numel()) or run(batch)

    async def go():
        return await asyncio.gather(*[_collect(engine, p, greedy(n)) for p, n in zip(PROMPTS, LENGTHS)])
    results = _run(engine, go)
    assert [r[0] for r in results] == ref
    assert used and any(n not in engine.graphs.buckets for n in used)  # some batches really were padded


def test_decode_graph_buckets():
    from flexserve.engine.decode_graphs import buckets_for

    assert buckets_for(6) == [1, 2, 4, 6]
    assert buckets_for(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert buckets_for(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_decode_graphs_match_offline(reference):
    folder, ref = reference
    engine = _decode_graph_engine(folder, "cuda", capture=True)

    async def go():
        return await asyncio.gather(*[_collect(engine, p, greedy(n)) for p, n in zip(PROMPTS, LENGTHS)])
    results = _run(engine, go)
    assert [r[0] for r in results] == ref
    assert engine.graphs.graphs  # at least one bucket was captured and replayed


def test_outputs_that_queued_up_are_merged():
    """A consumer that fell behind gets the queued tokens as one output, in order, text and logprobs joined;
    an error queued after them still surfaces, after the tokens before it."""
    from flexserve.engine.serving import StepOutput
    from flexserve.engine.streaming import stream_outputs

    async def go():
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        accepted.set_result(None)
        q: asyncio.Queue = asyncio.Queue()
        for i in range(3):
            q.put_nowait(StepOutput("r", [10 + i], f"t{i}", [{10 + i: -0.5}], False, None, 4, i + 1))
        q.put_nowait(RuntimeError("engine failed"))
        got, aborted = [], []
        with pytest.raises(RuntimeError, match="engine failed"):
            async for out in stream_outputs(accepted, q, lambda: aborted.append(True)):
                got.append(out)
        return got, aborted
    got, aborted = asyncio.run(go())
    assert len(got) == 1 and got[0].new_token_ids == [10, 11, 12] and got[0].text_delta == "t0t1t2"
    assert got[0].logprobs == [{10: -0.5}, {11: -0.5}, {12: -0.5}] and got[0].num_output_tokens == 3
    assert aborted == [True]  # the stream ended without its finished output


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_engine_thread_failing_before_its_loop_fails_requests_instead_of_hanging(reference):
    """Everything the engine thread does, its device set-up included, runs under the handler that fails
    waiting clients: a request must get the error, not wait forever."""
    folder, _ = reference
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu"))
    engine.device = type("Dev", (), {"type": "cuda"})()  # set_device of a bogus device raises in the thread

    async def ask():
        with pytest.raises((RuntimeError, ValueError)):
            await asyncio.wait_for(_collect(engine, [1, 2, 3], greedy(2)), timeout=30)
    _run(engine, ask)


def test_warm_up_serves_and_leaves_nothing_behind(reference):
    """The start-up warm-up runs its throw-away requests to the end (lengths up to the context window) and
    leaves the engine idle with every KV block free; a real request afterwards is unaffected."""
    folder, ref = reference
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=400,
                                      block_size=8, max_num_seqs=8, prefill_chunk_size=16))

    async def go():
        await engine.warm_up()
        stats = engine.stats()
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0
        assert stats["generated_tokens"] == 4 * 4  # lengths 1, 7, 16, 33 fit its 128-token window, 4 tokens each
        toks, _, _ = await _collect(engine, PROMPTS[0], greedy(LENGTHS[0]))
        return toks
    assert _run(engine, go) == ref[0]


def test_warm_up_skips_what_the_pool_or_queue_cannot_take(reference):
    """A small KV pool and a short queue refuse some warm-up lengths: the warm-up skips them, not the server."""
    folder, _ = reference
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=3,
                                      block_size=8, max_num_seqs=2, max_queue_len=2))

    async def go():
        await engine.warm_up()
        return engine.stats()
    stats = _run(engine, go)
    assert 0 < stats["finished_requests"] < 4 and stats["kv_blocks_used"] == 0
