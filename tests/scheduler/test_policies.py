"""Scripted request sequences through the three policies: placement, demotion, promotion, preemption,
swapping, recomputation, admission limits and abort."""
import pytest

from flexserve.scheduler import QueueFullError, RequestTooLargeError, SequenceStatus

from .helpers import make, req, run_to_completion, step


def test_unknown_scheduler_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="fcfs, mlfq, skip-join-mlfq"):
        make("lifo")


@pytest.mark.parametrize("prompt_len, level", [(5, 0), (10, 0), (15, 1), (30, 2), (100, 4), (600, 6), (10_000, 7)])
def test_skip_join_places_a_job_in_the_first_queue_whose_quantum_covers_its_prefill(prompt_len, level):
    # prefill estimate 1 ms/token; quanta 10, 20, 40, 80, 160, 320, 640 ms, then the unbounded last level
    sched = make("skip-join-mlfq", gpu_blocks=4096)
    sched.add_request(req("a", prompt_len=prompt_len))
    assert sched.get_request("a").level == level
    assert sched.stats().queue_len_per_level[level] == 1


def test_plain_mlfq_puts_every_new_job_in_the_top_queue():
    sched = make("mlfq", gpu_blocks=4096)
    for i, n in enumerate([5, 600, 10_000]):  # prompts skip-join would place at levels 0, 6 and 7
        sched.add_request(req(f"r{i}", prompt_len=n))
    assert [sched.get_request(f"r{i}").level for i in range(3)] == [0, 0, 0]
    assert sched.stats().queue_len_per_level[0] == 3 and sum(sched.stats().queue_len_per_level) == 3


def test_a_job_is_demoted_each_time_it_uses_up_its_quantum():
    sched = make("mlfq", max_num_seqs=1)
    sched.add_request(req("a", prompt_len=4, max_tokens=100))
    levels = []
    for i in range(8):
        step(sched, 0.02 * i, dt=0.02)
        levels.append(sched.get_request("a").level)
    # 20 ms steps against quanta 10, 20, 40, 80 ms: one step at levels 0 and 1, two at 2, four at 3
    assert levels == [1, 2, 2, 3, 3, 3, 3, 4]
    assert sched.stats().num_demotions == 4


def test_the_last_level_never_demotes():
    sched = make("mlfq", num_levels=2, max_num_seqs=1)
    sched.add_request(req("a", prompt_len=4, max_tokens=50))
    for i in range(10):
        step(sched, i, dt=1.0)
    assert sched.get_request("a").level == 1


def test_an_arrival_preempts_a_demoted_job_at_the_next_step_and_its_kv_stays_on_the_gpu():
    sched = make("mlfq", max_num_seqs=1)
    sched.add_request(req("old", prompt_len=8, max_tokens=100))
    for i in range(3):
        step(sched, 0.02 * i)
    table = sched.block_manager.block_table("old")
    sched.add_request(req("new", prompt_len=8, max_tokens=100, arrival=0.06))
    out = step(sched, 0.06)
    assert [s.request_id for s in out.scheduled] == ["new"]
    assert out.preempted == ["old"] and not out.swap_out
    assert sched.get_request("old").status is SequenceStatus.PREEMPTED
    assert sched.block_manager.block_table("old") == table


def test_fcfs_runs_jobs_to_completion_in_arrival_order():
    sched = make("fcfs", max_num_seqs=1)
    for i, n in enumerate([9, 2, 5]):
        sched.add_request(req(f"r{i}", max_tokens=n, arrival=0.001 * i))
    order = []
    now = 0.0
    while sched.has_work():
        out = sched.schedule(now)
        order += [s.request_id for s in out.scheduled]
        now += 0.02
        done = sched.on_step_done(now, 0.02, {s.request_id: 1 for s in out.scheduled if s.samples})
        assert all(r.num_output_tokens == r.max_tokens for r in done)
    assert order == ["r0"] * 9 + ["r1"] * 2 + ["r2"] * 5
    assert sched.stats().num_preemptions == 0


def test_fcfs_never_lets_a_later_short_job_displace_a_running_one():
    sched = make("fcfs", max_num_seqs=1)
    sched.add_request(req("long", max_tokens=50))
    step(sched, 0.0)
    sched.add_request(req("short", max_tokens=1, arrival=0.01))
    for i in range(1, 10):
        out = step(sched, 0.02 * i)
        assert [s.request_id for s in out.scheduled] == ["long"]


def test_starved_job_is_promoted_to_the_top_queue():
    sched = make("skip-join-mlfq", max_num_seqs=1, starvation_threshold_s=0.05, starvation_check_interval=1)
    sched.add_request(req("a", prompt_len=4, max_tokens=100))
    now = 0.0
    for _ in range(4):
        step(sched, now)
        now += 0.02
    assert sched.get_request("a").level == 3
    sched.add_request(req("b", prompt_len=4, max_tokens=100, arrival=now))
    ran = []
    for _ in range(4):
        ran += [s.request_id for s in step(sched, now).scheduled]
        now += 0.02
    # b holds the seat for 3 steps; a, idle since 0.08 s, is promoted at 0.14 s and runs next, ahead of b
    assert ran == ["b", "b", "b", "a"]
    assert sched.stats().num_promotions == 1


def test_short_of_gpu_blocks_the_lowest_priority_job_is_swapped_out_first():
    sched = make("mlfq", gpu_blocks=12, cpu_blocks=64, max_num_seqs=1)
    bm = sched.block_manager
    sched.add_request(req("low", prompt_len=8, max_tokens=30))
    for i in range(6):  # low sinks to level 3
        step(sched, 0.02 * i)
    sched.add_request(req("mid", prompt_len=8, max_tokens=30, arrival=0.12))
    for i in range(6, 8):  # mid: levels 0 -> 2
        step(sched, 0.02 * i)
    low_table, mid_table = bm.block_table("low"), bm.block_table("mid")
    assert sched.get_request("mid").level < sched.get_request("low").level
    # a new job needing one block more than is free: evicting the lowest job is enough
    sched.add_request(req("new", prompt_len=(bm.num_free_gpu_blocks + 1) * 4, max_tokens=2, arrival=0.16))
    out = step(sched, 0.16)
    assert [s.request_id for s in out.scheduled] == ["new"]
    assert [gpu for gpu, _ in out.swap_out] == low_table
    assert sched.get_request("low").status is SequenceStatus.SWAPPED
    assert bm.block_table("mid") == mid_table and not out.recompute


def test_a_swapped_job_is_swapped_in_no_later_than_the_step_it_runs_in():
    sched = make("mlfq", gpu_blocks=12, cpu_blocks=64, max_num_seqs=1)
    bm = sched.block_manager
    sched.add_request(req("a", prompt_len=8, max_tokens=20))
    for i in range(4):
        step(sched, 0.02 * i)
    sched.add_request(req("b", prompt_len=4 * bm.num_free_gpu_blocks + 4, max_tokens=3, arrival=0.08))
    now, swapped_in_to = 0.08, None
    while sched.has_work():
        out = sched.schedule(now)
        for cpu_gpu in (out.swap_in + out.swap_in_ahead):
            assert cpu_gpu[1] not in [g for g, _ in out.swap_out_ahead]
        pairs = out.swap_in + out.swap_in_ahead
        if pairs and sched.get_request("a") and bm.block_table("a"):
            swapped_in_to = [gpu for _, gpu in pairs]
        for s in out.scheduled:
            if s.request_id == "a" and sched.get_request("a").num_swaps:
                assert s.block_table[:len(swapped_in_to)] == swapped_in_to  # the copy lands where it reads
        now += 0.02
        sched.on_step_done(now, 0.02, {s.request_id: 1 for s in out.scheduled if s.samples})
    assert swapped_in_to is not None
    bm.begin_step()
    assert bm.num_free_gpu_blocks == 12 and bm.num_free_cpu_blocks == 64


def test_with_the_host_full_too_the_victim_is_dropped_for_recomputation():
    sched = make("mlfq", gpu_blocks=4, cpu_blocks=0, max_num_seqs=1)
    sched.add_request(req("a", prompt_len=8, max_tokens=6))
    step(sched, 0.0)  # a: level 1
    sched.add_request(req("b", prompt_len=8, max_tokens=6, arrival=0.02))
    step(sched, 0.02)  # b (level 0) takes the seat and prefills into the last two blocks; now level 1 too
    out = step(sched, 0.04)  # b ran last step, so it keeps the seat; it needs a third block: a is lower
    assert [s.request_id for s in out.scheduled] == ["b"]
    assert out.recompute == ["a"] and not out.swap_out
    a = sched.get_request("a")
    assert a.num_computed_tokens == 0 and a.num_output_tokens == 1 and a.num_recomputes == 1
    seqs = []
    now = 0.06
    while sched.has_work():
        out = step(sched, now)
        seqs += [(s.request_id, s.start_pos, s.num_tokens, s.is_prefill) for s in out.scheduled]
        now += 0.02
    assert ("a", 0, 9, True) in seqs  # prompt and its first output are computed again
    assert sched.stats().num_recomputes == 1 and sched.stats().num_finished == 2


def test_a_new_job_never_pushes_others_kv_out_for_recomputation():
    sched = make("mlfq", gpu_blocks=4, cpu_blocks=0, max_num_seqs=1)
    sched.add_request(req("a", prompt_len=13, max_tokens=4))  # fills all 4 blocks
    step(sched, 0.0)
    sched.add_request(req("b", prompt_len=4, max_tokens=1, arrival=0.02))
    out = step(sched, 0.02)
    assert [s.request_id for s in out.scheduled] == ["a"] and not out.recompute


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_its_end():
    sched = make("fcfs", prefill_chunk_size=8, gpu_blocks=64)
    sched.add_request(req("a", prompt_len=20, max_tokens=2))
    seqs = []
    for i in range(5):
        seqs += [(s.start_pos, s.num_tokens, s.is_prefill, s.samples) for s in step(sched, i).scheduled]
    assert seqs == [(0, 8, True, False), (8, 8, True, False), (16, 4, True, True), (20, 1, False, True)]
    assert not sched.has_work()


def test_a_long_prompt_cannot_take_the_token_budget_of_running_decodes():
    sched = make("mlfq", max_num_batched_tokens=16, max_num_seqs=8, prefill_chunk_size=64, gpu_blocks=256)
    for i in range(3):
        sched.add_request(req(f"d{i}", prompt_len=4, max_tokens=100))
    step(sched, 0.0)
    sched.add_request(req("big", prompt_len=200, max_tokens=2, arrival=0.02))
    out = step(sched, 0.02)
    tokens = {s.request_id: s.num_tokens for s in out.scheduled}
    assert tokens == {"big": 13, "d0": 1, "d1": 1, "d2": 1} and out.num_batched_tokens == 16


def test_bounded_queue_raises_queue_full_and_counts_rejections():
    sched = make("fcfs", max_queue_len=2, max_num_seqs=1)
    sched.add_request(req("a"))
    sched.add_request(req("b"))
    with pytest.raises(QueueFullError) as err:
        sched.add_request(req("c"))
    assert err.value.http_status == 429
    assert sched.stats().num_rejected == 1
    step(sched, 0.0)  # a starts, so only b is queued
    sched.add_request(req("c"))


def test_a_request_that_can_never_fit_is_refused_up_front():
    sched = make("fcfs", gpu_blocks=4, block_size=4)
    with pytest.raises(RequestTooLargeError):
        sched.add_request(req("a", prompt_len=16, max_tokens=2))
    sched.add_request(req("b", prompt_len=16, max_tokens=1))


@pytest.mark.parametrize("name", ["fcfs", "mlfq", "skip-join-mlfq"])
def test_abort_frees_blocks_wherever_they_are(name):
    sched = make(name, gpu_blocks=8, cpu_blocks=8, max_num_seqs=1)
    bm = sched.block_manager
    sched.add_request(req("a", prompt_len=12, max_tokens=10))
    step(sched, 0.0)
    bm.swap_out("a")  # as if evicted
    sched.get_request("a").status = SequenceStatus.SWAPPED
    sched.add_request(req("b", prompt_len=12, max_tokens=10))
    step(sched, 0.02)
    sched.add_request(req("c"))  # never started
    assert sched.abort("a") and sched.abort("b") and sched.abort("c")
    assert not sched.abort("a") and not sched.abort("nope")
    assert not sched.has_work() and sched.stats().num_aborted == 3
    bm.begin_step()
    assert bm.num_free_gpu_blocks == 8 and bm.num_free_cpu_blocks == 8


def test_tokens_reported_as_ids_are_appended_and_finish_on_stop():
    sched = make("fcfs")
    sched.add_request(req("a", prompt_len=4, max_tokens=10))
    out = sched.schedule(0.0)
    assert sched.on_step_done(0.01, 0.01, {"a": [42]}) == []
    out = sched.schedule(0.01)
    assert out.scheduled[0].start_pos == 4
    done = sched.on_step_done(0.02, 0.01, {"a": [7]}, finished_ids=["a"])
    assert done[0].output_token_ids == [42, 7] and done[0].status is SequenceStatus.FINISHED
    assert done[0].ttft == pytest.approx(0.01) and done[0].jct == pytest.approx(0.02)


@pytest.mark.parametrize("name", ["fcfs", "mlfq", "skip-join-mlfq"])
def test_many_jobs_under_memory_pressure_all_finish_and_leak_nothing(name):
    sched = make(name, gpu_blocks=24, cpu_blocks=16, max_num_seqs=4, gpu_reserve_frac=0.1,
                 starvation_threshold_s=0.1, starvation_check_interval=5)
    for i in range(30):
        sched.add_request(req(f"r{i}", prompt_len=3 + (7 * i) % 17, max_tokens=1 + (5 * i) % 23, arrival=0.0))
    run_to_completion(sched)  # step() checks that no block is ever held twice
    stats = sched.stats()
    assert stats.num_finished == 30
    sched.block_manager.begin_step()
    assert sched.block_manager.num_free_gpu_blocks == 24 and sched.block_manager.num_free_cpu_blocks == 16


# --- MLFQ orders the batch; it does not take seats away needlessly -------------------------------------------
def test_with_free_seats_an_arrival_preempts_nobody():
    sched = make("mlfq", max_num_seqs=4, gpu_blocks=256)
    sched.add_request(req("old", prompt_len=8, max_tokens=50))
    for i in range(5):
        step(sched, 0.02 * i)  # old sinks to a low level
    sched.add_request(req("new", prompt_len=8, max_tokens=50, arrival=0.1))
    out = step(sched, 0.1)
    assert {s.request_id for s in out.scheduled} == {"old", "new"} and not out.preempted


def test_a_running_job_keeps_its_seat_against_an_equal_level_job_and_loses_it_to_a_higher_one():
    sched = make("mlfq", max_num_seqs=1, gpu_blocks=256)
    sched.add_request(req("a", prompt_len=8, max_tokens=50))
    step(sched, 0.0)  # a: level 1
    sched.add_request(req("b", prompt_len=8, max_tokens=50, arrival=0.02))
    assert [s.request_id for s in step(sched, 0.02).scheduled] == ["b"]  # level 0 beats level 1
    # b is now at level 1 like a, and a arrived first: but b ran last step, so b keeps the seat; then b
    # drops to level 2 and a (level 1) takes the seat; at level 2 both, a keeps it
    ran = [s.request_id for i in range(2, 5) for s in step(sched, 0.02 * i).scheduled]
    assert ran == ["b", "a", "a"]
    assert sched.get_request("a").num_preemptions == 1 and sched.get_request("b").num_preemptions == 1


def test_demotion_keeps_arrival_order_within_the_lower_queue():
    sched = make("mlfq", max_num_seqs=2, gpu_blocks=256)
    sched.add_request(req("first", prompt_len=8, max_tokens=50, arrival=0.0))
    sched.add_request(req("second", prompt_len=8, max_tokens=50, arrival=0.001))
    step(sched, 0.0)
    first, second = sched.get_request("first"), sched.get_request("second")
    assert first.level == second.level == 1 and first.enqueue_seq < second.enqueue_seq
    ordered = sorted([second, first], key=sched._key)
    assert ordered == [first, second]


def test_demote_to_back_restores_the_classic_round_robin_order():
    sched = make("mlfq", max_num_seqs=2, gpu_blocks=256, demote_to_back=True)
    sched.add_request(req("first", prompt_len=8, max_tokens=50))
    sched.add_request(req("second", prompt_len=8, max_tokens=50))
    step(sched, 0.0)  # both demoted; first demoted first, so it is ahead again
    assert sched.get_request("first").enqueue_seq > 1 and sched.get_request("second").enqueue_seq > 1


def test_promotion_is_bounded_per_check_and_takes_the_longest_idle_first():
    sched = make("skip-join-mlfq", max_num_seqs=1, gpu_blocks=512, starvation_threshold_s=0.05,
                 starvation_check_interval=10_000, max_promotions_per_check=2)
    for i in range(4):
        sched.add_request(req(f"r{i}", prompt_len=100, max_tokens=50, arrival=0.0))  # level 4
    now = 0.0
    for _ in range(6):
        step(sched, now)
        now += 0.02
    # r0 ran throughout; r1..r3 never ran: idle since arrival, r1 ahead by arrival order
    assert sched.promote_starved(now) == 2
    assert [sched.get_request(f"r{i}").level for i in range(1, 4)] == [0, 0, 4]
    assert sched.get_request("r0").level > 0


def test_a_new_job_starts_only_while_gpu_plus_host_keep_a_margin():
    # 32 + 32 blocks with a 25% margin (16 blocks): 4-block jobs start while 20 blocks are free in all
    sched = make("mlfq", gpu_blocks=32, cpu_blocks=32, max_num_seqs=2, start_margin_frac=0.25)
    bm = sched.block_manager
    for i in range(20):
        sched.add_request(req(f"r{i}", prompt_len=16, max_tokens=8, arrival=0.001 * i))
    now, most_started = 0.0, 0
    while sched.has_work():
        step(sched, now)
        now += 0.02
        started = sum(1 for r in sched._requests.values() if bm.num_gpu_blocks_of(r.request_id)
                      or bm.num_cpu_blocks_of(r.request_id))
        most_started = max(most_started, started)
    assert most_started <= 12  # (64 - 16) / 4
    assert sched.stats().num_finished == 20 and sched.stats().num_recomputes == 0


def test_a_swapped_job_waits_rather_than_drop_a_lower_jobs_kv():
    sched = make("mlfq", gpu_blocks=16, cpu_blocks=8, max_num_seqs=1, start_margin_frac=0.0)
    for i in range(3):
        sched.add_request(req(f"r{i}", prompt_len=32, max_tokens=20, arrival=0.001 * i))
    now = 0.0
    while sched.has_work():
        step(sched, now)
        now += 0.02
    # the host holds one job: the third job's KV is dropped only by a job growing on the GPU
    assert sched.stats().num_finished == 3


@pytest.mark.parametrize("name", ["mlfq", "skip-join-mlfq"])
def test_no_job_is_swapped_out_and_back_in_on_consecutive_steps(name):
    sched = make(name, gpu_blocks=40, cpu_blocks=400, max_num_seqs=3, gpu_reserve_frac=0.15,
                 starvation_threshold_s=0.2, starvation_check_interval=7)
    for i in range(40):
        sched.add_request(req(f"r{i}", prompt_len=4 + (13 * i) % 37, max_tokens=1 + (29 * i) % 61,
                              arrival=0.0))
    now, history = 0.0, []
    while sched.has_work():
        before = {rid: r.status for rid, r in sched._requests.items()}
        out = step(sched, now)
        now += 0.02
        after = {rid: (r.status if (r := sched.get_request(rid)) else None) for rid in before}
        gone_out = {rid for rid, s in before.items() if s is not SequenceStatus.SWAPPED
                    and sched.block_manager.is_swapped(rid)}
        came_in = {rid for rid, s in before.items() if s is SequenceStatus.SWAPPED
                   and after[rid] is not SequenceStatus.SWAPPED}
        history.append((gone_out, came_in))
        assert len(history) < 5000
    assert sched.stats().num_swap_outs > 0 and sched.stats().num_finished == 40
    for (out_t, in_t), (out_next, in_next) in zip(history, history[1:]):
        assert not out_t & in_next, "swapped out, then straight back in"
        assert not in_t & out_next, "swapped in, then straight back out"


@pytest.mark.parametrize("name", ["mlfq", "skip-join-mlfq"])
def test_tail_guard_serves_old_jobs_first_in_arrival_order_and_never_demotes_them(name):
    sched = make(name, max_num_seqs=1, tail_guard_s=0.1, tail_guard_check_interval=1,
                 starvation_threshold_s=100.0)
    sched.add_request(req("long", prompt_len=4, max_tokens=200))
    now = 0.0
    for _ in range(3):  # long runs alone and is demoted twice (20 ms steps against 10, 20, 40 ms quanta)
        step(sched, now)
        now += 0.02
    assert sched.get_request("long").level == 2
    ran = []
    for i in range(12):  # a fresh short job arrives every step: without the guard they would hold the seat
        sched.add_request(req(f"s{i}", prompt_len=4, max_tokens=50, arrival=now))
        ran += [s.request_id for s in step(sched, now).scheduled]
        now += 0.02
    long = sched.get_request("long")
    assert long.guarded and long.level == 0
    # guarded once 0.1 s old (after the step at 0.08 s): from then on it keeps the seat, arrivals or not,
    # and the oldest arrivals follow it into the lane in arrival order
    first = ran.index("long")
    assert ran[first:] == ["long"] * (12 - first) and first <= 2
    assert sched.counters["guarded"] >= 1


def test_tail_guard_lane_is_bounded_and_off_by_default():
    sched = make("mlfq", max_num_seqs=4, tail_guard_s=0.05, tail_guard_seats=2, tail_guard_check_interval=1)
    for i in range(5):
        sched.add_request(req(f"j{i}", prompt_len=4, max_tokens=100, arrival=0.001 * i))
    now = 0.0
    for _ in range(6):
        step(sched, now)
        now += 0.02
    guarded = sorted(r.request_id for r in sched._requests.values() if r.guarded)
    assert guarded == ["j0", "j1"]  # the two oldest; the lane holds two at a time
    plain = make("mlfq", max_num_seqs=4)
    for i in range(5):
        plain.add_request(req(f"j{i}", prompt_len=4, max_tokens=100))
    for i in range(6):
        step(plain, 0.02 * i)
    assert not any(r.guarded for r in plain._requests.values())


def test_srpt_runs_the_job_with_the_fewest_tokens_left_and_preempts_for_a_shorter_arrival():
    sched = make("srpt", max_num_seqs=1)
    sched.add_request(req("mid", prompt_len=4, max_tokens=10))
    sched.add_request(req("long", prompt_len=4, max_tokens=50))
    ran = [s.request_id for s in step(sched, 0.0).scheduled]
    sched.add_request(req("short", prompt_len=4, max_tokens=2, arrival=0.02))
    for i in range(1, 4):
        ran += [s.request_id for s in step(sched, 0.02 * i).scheduled]
    assert ran == ["mid", "short", "short", "mid"]
    assert sched.get_request("short") is None  # finished and retired
