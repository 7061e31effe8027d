"""Asynchronous scheduling: step N+1 is planned while step N computes, with N's tokens fed in on the device.

Whatever the host learns a step late (a stop token, a stop string) must not change what any client receives:
every request gets exactly what the synchronous engine gives it, the extra step a stopped request ran is
dropped, and no KV block is left behind.
"""
import asyncio

import pytest

from flexserve import SamplingParams
from flexserve.engine import runner as runner_module
from flexserve.engine import serving
from flexserve.engine.serving import AsyncEngine, EngineConfig
from flexserve.scheduler import PENDING_TOKEN, Request, ScheduledSeq, SchedulerOutput

from .test_serving import LENGTHS, PROMPTS, _collect, _run, reference  # noqa: F401  (fixture)


def _mixed_params(ref: list[list[int]]) -> list[SamplingParams]:
    """Greedy to max_tokens, greedy stopping on a token met mid-way, seeded random, and log-probabilities."""
    params = []
    for i, out in enumerate(ref):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(max_tokens=LENGTHS[i], temperature=0.0, ignore_eos=True))
        elif kind == 1:  # stops on the token it would sample at step len // 2 (or earlier, where it repeats)
            params.append(SamplingParams(max_tokens=LENGTHS[i], temperature=0.0, ignore_eos=True,
                                         stop_token_ids=[out[len(out) // 2]]))
        elif kind == 2:
            params.append(SamplingParams(max_tokens=LENGTHS[i], temperature=0.8, top_p=0.9, seed=100 + i,
                                         ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=LENGTHS[i], temperature=0.0, ignore_eos=True, logprobs=1))
    return params


def _serve(folder, params, async_scheduling: bool, spy: list | None = None):
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=40,
                                      num_cpu_blocks=400, block_size=8, max_num_seqs=6, prefill_chunk_size=16,
                                      max_num_batched_tokens=64, scheduler="skip-join-mlfq",
                                      async_scheduling=async_scheduling))
    if spy is not None:
        execute = engine.runner.execute

        def counting(plan, sample, fed=None):
            spy.append(len(plan.feed))
            return execute(plan, sample, fed)
        engine.runner.execute = counting

    async def go():
        res = await asyncio.gather(*[_collect(engine, p, sp) for p, sp in zip(PROMPTS, params)])
        return res, engine.stats()
    return _run(engine, go)


def test_async_engine_gives_every_client_what_the_synchronous_one_gives(reference):
    folder, ref = reference
    params = _mixed_params(ref)
    fed: list[int] = []
    async_res, async_stats = _serve(folder, params, True, fed)
    sync_res, sync_stats = _serve(folder, params, False)
    for i, (a, s) in enumerate(zip(async_res, sync_res)):
        assert a[0] == s[0], f"request {i}: tokens differ"
        assert (a[2].finished, a[2].finish_reason) == (s[2].finished, s[2].finish_reason), f"request {i}"
        assert PENDING_TOKEN not in a[0]
    # the greedy rows are the offline references; the stopping ones end at their stop token, with "stop"
    for i in range(0, 16, 4):
        assert async_res[i][0] == ref[i] and async_res[i][2].finish_reason == "length"
    for i in range(1, 16, 4):
        stop = params[i].stop_token_ids[0]
        expect = ref[i][:ref[i].index(stop) + 1]
        assert async_res[i][0] == expect and async_res[i][2].finish_reason == "stop"
    # the async engine did feed tokens it had not read; neither engine left a block behind
    assert sum(fed) > 0
    for stats in (async_stats, sync_stats):
        assert stats["kv_blocks_used"] == 0 and stats["cpu_blocks_used"] == 0
        assert stats["finished_requests"] == 16 and stats["generated_tokens"] == sum(len(r[0]) for r in sync_res)


def test_a_pending_token_outside_a_lone_decode_settles_the_previous_step_first(reference):
    """Feeding from the device covers a lone decode token only; a chunk that would read a pending token
    (the schedulers never plan one, but the engine must not rely on it) settles the step before planning."""
    folder, _ = reference
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64))
    lone, chunk = (Request(rid, prompt_token_ids=[5, 6, 7], max_tokens=8) for rid in ("lone", "chunk"))
    for req in (lone, chunk):
        req.output_token_ids.append(PENDING_TOKEN)
        req.num_output_tokens = 1
    prev = serving._Pending(runner_module.SampledStep(["lone", "chunk"], None), done=set())
    out = SchedulerOutput(scheduled=[ScheduledSeq(lone, 1, 3, False, True, [0]),
                                     ScheduledSeq(chunk, 2, 2, True, True, [1])])
    alone = SchedulerOutput(scheduled=out.scheduled[:1])
    plan = engine._plan(alone, serving._Pending(runner_module.SampledStep(["chunk", "lone"], None), done=set()))
    assert plan.feed == [(0, 1)] and plan.seqs[0].token_ids == [PENDING_TOKEN]  # fed, nothing settled

    def settle(pending):  # what settling does to the requests: the real ids replace the pending ones
        lone.output_token_ids[-1], chunk.output_token_ids[-1] = 41, 42
        pending.settled = True
        return {}
    engine._settle = settle
    plan = engine._plan(out, prev)
    assert prev.settled and plan.feed == []
    assert plan.seqs[0].token_ids == [41] and plan.seqs[1].token_ids == [7, 42]
    engine.runner.close()


def test_request_token_ids_reads_across_prompt_and_outputs():
    req = Request("r", prompt_token_ids=[1, 2, 3], max_tokens=4)
    req.output_token_ids += [7, 8]
    assert req.token_ids(0, 2) == [1, 2] and req.token_ids(2, 4) == [3, 7] and req.token_ids(4, 5) == [8]
    assert req.token_ids(0, 5) == req.all_token_ids


def test_sampled_step_reads_device_tokens_once():
    import torch

    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    picked = runner_module.greedy_tokens(logits)
    step = runner_module.SampledStep(["a", "b"], picked.chosen, _pending=picked)
    out = step.output()
    assert out.token_ids == [1, 0] and out.request_ids == ["a", "b"] and step.output() is out


@pytest.mark.parametrize("flag, expect", [([], True), (["--no-async-scheduling"], False)])
def test_cli_flag(flag, expect):
    import argparse

    from flexserve.cli.serve import add_engine_arguments, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    args = p.parse_args(["--model", "dummy:tiny", *flag]) if _has_model_flag(p) else p.parse_args(flag)
    assert engine_config_from_args(args).async_scheduling is expect


def _has_model_flag(p) -> bool:
    return any("--model" in a.option_strings for a in p._actions)


def test_a_call_runs_on_the_engine_thread_and_its_error_reaches_the_caller(reference):
    import threading

    folder, _ = reference
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=40))

    def boom():
        raise ValueError("boom")

    async def go():
        where = await asyncio.wrap_future(engine.call_in_engine(lambda: threading.current_thread().name))
        with pytest.raises(ValueError, match="boom"):
            await asyncio.wrap_future(engine.call_in_engine(boom))
        return where
    assert _run(engine, go) == "flexserve-engine"
