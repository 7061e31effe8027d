"""16 concurrent streamed requests of different lengths, each equal to what the offline `LLM` gives for its
prompt alone with greedy sampling: no token lost, duplicated or given to the wrong stream.

A tiny random model keeps it fast on a CPU; few seats and few GPU blocks make the skip-join MLFQ preempt and
swap requests while their streams are open.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest

from flexserve import LLM, SamplingParams
from flexserve.engine.remote import EngineProcess, make_engine
from flexserve.engine.serving import EngineConfig

from .conftest import Served

PROMPTS = [[(11 * i + 3 * j) % 90 + 3 for j in range(2 + 5 * i)] for i in range(16)]  # 2 .. 77 tokens
LENGTHS = [3 + (i * 7) % 29 for i in range(16)]  # 3 .. 31 tokens


@pytest.fixture(scope="module", params=["in-process", "engine-process"])
def tiny_server(tiny_model, request):
    """The same server with the engine in the server's process, and in a child process (`EngineProcess`)."""
    folder, _ = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu") as llm:
        ref = [llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=n, temperature=0.0,
                                                                    ignore_eos=True))[0].outputs[0].token_ids
               for p, n in zip(PROMPTS, LENGTHS)]
    config = EngineConfig(model=folder, dtype="float32", device="cpu", scheduler="skip-join-mlfq",
                          num_gpu_blocks=24, num_cpu_blocks=400, block_size=8, max_num_seqs=6,
                          prefill_chunk_size=16, max_num_batched_tokens=64)
    engine = make_engine(config, separate_process=request.param == "engine-process")
    assert isinstance(engine, EngineProcess) == (request.param == "engine-process")
    served = Served(engine)
    yield served, ref
    served.stop()


def _stream(server: Served, prompt: list[int], n: int, chat_style: bool) -> list[int]:
    chunks = server.client().completions.create(
        model=server.model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
        stream_options={"include_usage": True} if chat_style else None,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = []
    for ch in chunks:
        for choice in ch.choices:
            assert choice.index == 0
            ids += choice.model_extra["token_ids"]
    return ids


def test_concurrent_streams_equal_offline_greedy(tiny_server):
    server, ref = tiny_server
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda i: _stream(server, PROMPTS[i], LENGTHS[i], i % 2 == 1), range(16)))
    assert results == ref
    stats = server.wait_idle()
    assert stats["num_preemptions"] > 0  # the streams really were interleaved and preempted



def test_disconnect_aborts_in_the_engine_process():
    """A stream closed after three chunks is aborted in the child engine process and its blocks freed (the
    default SmolLM2 model: slow enough on a CPU that the request is still running when the client leaves)."""
    import httpx

    engine = make_engine(EngineConfig(device="cpu", num_gpu_blocks=256, max_num_seqs=4), separate_process=True)
    server = Served(engine)
    try:
        body = {"model": server.model, "prompt": "Tell me a long story.", "max_tokens": 2000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
            assert engine.stats()["kv_blocks_used"] > 0
        stats = server.wait_idle()
        assert stats["kv_blocks_used"] == 0 and stats["aborted_requests"] == 1
        assert stats["generated_tokens"] < 2000
    finally:
        server.stop()


def test_warm_up_through_the_engine_process(tiny_model):
    """The start-up warm-up a GPU server runs goes through the child-process engine like any request."""
    import asyncio

    folder, _ = tiny_model("llama-gqa")
    engine = make_engine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64,
                                      block_size=8), separate_process=True)

    async def go():
        engine.start()
        try:
            await engine.warm_up()
            for _ in range(100):  # the child pushes its stats every 50 ms
                if engine.stats().get("finished_requests") == 4:
                    break
                await asyncio.sleep(0.05)
            return engine.stats()
        finally:
            await engine.shutdown()
    try:
        stats = asyncio.run(go())
    finally:
        engine.release_memory()
    assert stats["finished_requests"] == 4 and stats["kv_blocks_used"] == 0  # 1, 7, 16, 33 tokens fit 128
