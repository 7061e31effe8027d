"""Helpers for driving a scheduler by hand, step by step, the way the engine does."""
from __future__ import annotations

from flexserve.scheduler import BlockManager, Request, SchedulerConfig, SchedulerOutput, make_scheduler


def step(sched, now: float, dt: float = 0.02) -> SchedulerOutput:
    """One engine step: schedule, 'run' for dt seconds, report one token for every sampling sequence."""
    out = sched.schedule(now)
    assert_disjoint_tables(sched)
    sched.on_step_done(now + dt, dt, {s.request_id: 1 for s in out.scheduled if s.samples})
    return out


def assert_disjoint_tables(sched) -> None:
    """No block is held by two requests, on either tier, and the free lists hold no owned block."""
    bm = sched.block_manager
    gpu, cpu = [], []
    for rid in list(bm._gpu_tables):
        gpu += bm.block_table(rid)
    for rid in list(bm._cpu_tables):
        cpu += bm.cpu_block_table(rid)
    assert len(gpu) == len(set(gpu)) and len(cpu) == len(set(cpu))
    assert not set(gpu) & set(bm._free_gpu)
    assert not set(cpu) & (set(bm._free_cpu) | set(bm._cpu_released_this_step))
    assert len(gpu) + bm.num_free_gpu_blocks == bm.num_gpu_blocks


def req(rid: str, prompt_len: int = 8, max_tokens: int = 4, arrival: float = 0.0) -> Request:
    return Request(rid, prompt_len=prompt_len, max_tokens=max_tokens, arrival_time=arrival)


def make(name: str, gpu_blocks: int = 64, cpu_blocks: int = 64, block_size: int = 4, watermark: float = 0.0,
         prefill_time_fn=lambda n: 1e-3 * n, **config):
    """A scheduler over a small pool (4-token blocks, no watermark or reserve unless asked); skip-join's
    prefill estimate is 1 ms per prompt token, so a prompt of n tokens joins the first level with
    10 ms x 2^i >= n ms. The scripts were written for FastServe's eight levels (the default is now four), so
    that is the shape unless a test asks for another."""
    bm = BlockManager(gpu_blocks, cpu_blocks, block_size, watermark=watermark)
    cfg = SchedulerConfig(**{"gpu_reserve_frac": 0.0, "num_levels": 8, **config})
    return make_scheduler(name, cfg, bm, prefill_time_fn=prefill_time_fn)


def run_to_completion(sched, now: float = 0.0, dt: float = 0.02, max_steps: int = 10_000) -> float:
    """Step until no work is left; returns the clock."""
    for _ in range(max_steps):
        if not sched.has_work():
            return now
        step(sched, now, dt)
        now += dt
    raise AssertionError("scheduler did not finish its work")
