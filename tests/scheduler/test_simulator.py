"""The simulator drives the real schedulers on a cost model; on a heavy-tailed workload skip-join MLFQ must
beat FCFS on mean job completion time."""
import dataclasses

import pytest

from flexserve.scheduler import LinearCostModel, SchedulerConfig
from flexserve.scheduler.simulator import KVCacheConfig, compare, format_table, simulate
from flexserve.scheduler.traces import LengthDist, TraceRequest, synthetic_trace


def heavy_tailed_trace():
    # Pareto(alpha 1.2) outputs with a 16-token minimum: most jobs are short, a few run for 2,000 tokens.
    return synthetic_trace(1500, 14.0, prompt=LengthDist("lognormal", median=256, sigma=0.8, max_len=4096),
                           output=LengthDist("pareto", median=16, alpha=1.2, max_len=2048), seed=0)


def test_skip_join_mlfq_cuts_mean_jct_on_a_heavy_tailed_workload():
    trace = heavy_tailed_trace()
    # A small batch: seats are scarce. Here the deep queues of FastServe's eight levels are what pays (with four,
    # the default, every job reaches the first-come-first-served bottom queue too soon to overtake).
    config = SchedulerConfig(max_num_seqs=8, num_levels=8, max_queue_len=len(trace))
    fcfs, skip_join = compare(trace, ["fcfs", "skip-join-mlfq"], config=config)
    assert fcfs.report.num_finished == skip_join.report.num_finished == len(trace)
    assert skip_join.report.jct.mean < 0.5 * fcfs.report.jct.mean
    assert skip_join.report.ttft.mean < fcfs.report.ttft.mean
    # same work, same machine: throughput within 5%
    assert skip_join.report.throughput_tok_s > 0.95 * fcfs.report.throughput_tok_s


def test_skip_join_mlfq_meets_all_three_targets_where_kv_memory_is_scarce():
    # FastServe's regime: many seats, a KV pool too small for them (192 blocks of 16 tokens), so FCFS's batch is
    # held down by the long jobs' KV. With the default four levels skip-join MLFQ cuts mean JCT to <= 1/3 of FCFS
    # at an equal or better p99 and throughput within 5%: the issue-7 targets, on the trace and settings that
    # bench/RESULTS.md 4b measures on the GPU (`bench/device_s7.sh`).
    import argparse

    from flexserve.benchmarks.serve import load_trace
    from flexserve.cli.bench import add_serve_bench_arguments, trace_settings

    p = argparse.ArgumentParser()
    add_serve_bench_arguments(p)
    args = p.parse_args("--simulate --trace gamma --cv 3 --rate 8 --num-requests 3000 --prompt-len 256 "
                        "--output-dist pareto --output-len 16".split())
    trace = load_trace(trace_settings(args), 3072)
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, prefill_chunk_size=512,
                             max_queue_len=len(trace))
    assert config.num_levels == 4
    kv = KVCacheConfig(num_gpu_blocks=192, num_cpu_blocks=4096)
    cost = LinearCostModel(s_per_seq=350e-6)
    fcfs, skip_join = compare(trace, ["fcfs", "skip-join-mlfq"], config=config, kv=kv, cost=cost)
    assert fcfs.report.num_finished == skip_join.report.num_finished == len(trace)
    assert skip_join.stats.num_swap_outs > 0
    assert skip_join.report.jct.mean <= fcfs.report.jct.mean / 3
    assert skip_join.report.jct.p99 <= fcfs.report.jct.p99
    assert skip_join.report.throughput_tok_s >= 0.95 * fcfs.report.throughput_tok_s
    # FastServe's eight levels get the mean too, but the long jobs pay: p99 worse than FCFS's
    deep = simulate(trace, "skip-join-mlfq", config=dataclasses.replace(config, num_levels=8), kv=kv, cost=cost)
    assert deep.report.jct.mean <= fcfs.report.jct.mean / 3 < fcfs.report.jct.p99 < deep.report.jct.p99


def test_every_request_generates_exactly_its_recorded_output_and_results_are_deterministic():
    trace = synthetic_trace(200, 20.0, seed=3)
    a = simulate(trace, "skip-join-mlfq")
    b = simulate(trace, "skip-join-mlfq")
    assert a.row() == b.row()
    by_id = {r.request_id: r for r in a.records}
    assert [by_id[str(i)].output_len for i in range(len(trace))] == [t.output_len for t in sorted(
        trace, key=lambda t: t.arrival_s)]
    assert all(r.jct_s >= r.ttft_s > 0 for r in a.records)


def test_any_cost_callable_plugs_in_and_sets_the_clock():
    trace = [TraceRequest(0.0, prompt_len=10, output_len=5)]
    calls = []

    def cost(num_prefill_tokens, num_decode_seqs, total_context_tokens):
        calls.append((num_prefill_tokens, num_decode_seqs, total_context_tokens))
        return 0.5

    result = simulate(trace, "fcfs", cost=cost)
    assert calls == [(10, 0, 10), (0, 1, 11), (0, 1, 12), (0, 1, 13), (0, 1, 14)]
    rec = result.records[0]
    assert rec.ttft_s == pytest.approx(0.5) and rec.jct_s == pytest.approx(2.5)
    assert rec.tpot_s == pytest.approx(0.5) and rec.queueing_s == pytest.approx(0.0)


def test_idle_gaps_jump_to_the_next_arrival():
    trace = [TraceRequest(0.0, 4, 1), TraceRequest(100.0, 4, 1)]
    result = simulate(trace, "mlfq", cost=lambda p, d, c: 0.01)
    assert result.makespan_s == pytest.approx(100.01)
    assert max(r.jct_s for r in result.records) == pytest.approx(0.01)


def test_memory_pressure_swaps_and_the_table_reports_it():
    trace = synthetic_trace(300, 30.0, seed=1)
    kv = KVCacheConfig(num_gpu_blocks=1200, num_cpu_blocks=2000)
    results = compare(trace, config=SchedulerConfig(max_num_seqs=32, max_queue_len=1000), kv=kv)
    assert all(r.report.num_finished == len(trace) for r in results)
    assert results[2].stats.num_swap_outs > 0
    table = format_table(results)
    assert "skip-join-mlfq" in table and "jct_mean_s" in table


def test_swaps_the_step_waits_for_are_charged_at_pcie_speed_and_ahead_swaps_overlap():
    # 16-token blocks of 128 KiB per token over 53.1 GB/s: ~39.5 us a block
    assert KVCacheConfig().swap_seconds_per_block == pytest.approx(16 * 131072 / 53.1e9)
    trace = synthetic_trace(300, 30.0, seed=1)
    kv = KVCacheConfig(num_gpu_blocks=1200, num_cpu_blocks=2000)
    config = SchedulerConfig(max_num_seqs=32, max_queue_len=1000)
    res = simulate(trace, "skip-join-mlfq", config=config, kv=kv)
    serial = simulate(trace, "skip-join-mlfq", config=config, kv=KVCacheConfig(1200, 2000, overlap_swaps=False))
    assert res.stats.num_blocks_swapped_out > 0
    assert 0 <= res.swap_stall_s <= serial.swap_stall_s


def test_mlfq_keeps_fcfs_throughput_and_rarely_recomputes_when_overloaded():
    # 3x overload through 8 seats: every arrival used to start, fill GPU + host and drop KV to recompute
    # (before: mlfq 582 recomputes, 629 tok/s; skip-join 4,738 recomputes, 294 tok/s; FCFS 858 tok/s)
    trace = synthetic_trace(400, 14.0, cv=3.0, seed=0)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048, prefill_chunk_size=512,
                             max_queue_len=len(trace))
    kv = KVCacheConfig(num_gpu_blocks=3000, num_cpu_blocks=4000)
    fcfs, mlfq, skip_join = compare(trace, config=config, kv=kv)
    for r in (mlfq, skip_join):
        assert r.report.num_finished == len(trace) and r.stats.num_recomputes < 0.05 * len(trace)
        assert r.report.throughput_tok_s > 0.95 * fcfs.report.throughput_tok_s


def test_default_cost_model_shape():
    cost = LinearCostModel()
    assert cost(0, 1, 0) == pytest.approx(7.035e-3)
    assert 0.04 < cost(1000, 0, 1000) < 0.05  # batch-1 prefill of 1,000 tokens: ~42 ms


def test_host_time_per_sequence_slows_the_simulated_engine():
    from flexserve.scheduler.cost import LinearCostModel

    base = LinearCostModel()
    host = LinearCostModel(s_per_seq=300e-6)
    assert host(0, 64, 0) - base(0, 64, 0) == pytest.approx(64 * 300e-6)
    assert host(512, 0, 512) == pytest.approx(base(512, 0, 512))  # a lone prefill streams nothing yet
    trace = synthetic_trace(60, 20.0, seed=1)
    fast = simulate(trace, "fcfs", cost=base).report
    slow = simulate(trace, "fcfs", cost=host).report
    assert slow.jct.mean > fast.jct.mean


def test_bench_serve_overhead_flags_reach_the_cost_model():
    from flexserve.benchmarks.serve import sim_cost
    from flexserve.cli import build_parser
    from flexserve.cli.bench import serve_bench_settings

    def cost_of(*flags: str) -> LinearCostModel:
        bench = serve_bench_settings(build_parser().parse_args(["bench", "serve", "--simulate", *flags]))
        return sim_cost(bench.sim_step_overhead_ms, bench.sim_seq_overhead_us)

    cost = cost_of("--sim-step-overhead-ms", "2.5", "--sim-seq-overhead-us", "350")
    assert cost.step_overhead_s == pytest.approx(2.5e-3) and cost.s_per_seq == pytest.approx(350e-6)
    assert cost_of() == LinearCostModel()


def test_srpt_bounds_the_mean_jct_and_the_tail_guard_trades_mean_for_p99():
    trace = heavy_tailed_trace()[:600]
    config = SchedulerConfig(max_num_seqs=8, num_levels=8, max_queue_len=len(trace))
    fcfs, skip_join, srpt = compare(trace, ["fcfs", "skip-join-mlfq", "srpt"], config=config)
    # the clairvoyant reference: no size-blind policy gets a lower mean JCT
    assert srpt.report.jct.mean <= skip_join.report.jct.mean < fcfs.report.jct.mean
    guarded = simulate(trace, "skip-join-mlfq", config=SchedulerConfig(max_num_seqs=8, num_levels=8, max_queue_len=len(trace),
                                                                         tail_guard_s=2.0, tail_guard_seats=4))
    assert guarded.report.num_finished == len(trace)
    assert guarded.report.jct.p99 < skip_join.report.jct.p99  # the long jobs' JCT comes back towards FCFS's
    assert skip_join.report.jct.mean <= guarded.report.jct.mean  # paid for with the short jobs' gain


def test_scheduler_flags_reach_the_engine_and_the_simulator():
    from flexserve.cli import build_parser
    from flexserve.cli.serve import engine_config_from_args

    args = build_parser().parse_args(["serve", "--model", "dummy:opt-125m", "--tail-guard-s", "4",
                                      "--tail-guard-seats", "2", "--scheduler", "srpt", "--num-levels", "6",
                                      "--base-quantum-s", "0.02", "--quantum-ratio", "3",
                                      "--starvation-threshold-s", "inf", "--starvation-check-interval", "50"])
    cfg = engine_config_from_args(args)
    assert cfg.scheduler == "srpt" and cfg.scheduler_options == {
        "tail_guard_s": 4.0, "tail_guard_seats": 2, "num_levels": 6, "base_quantum_s": 0.02, "quantum_ratio": 3.0,
        "starvation_threshold_s": float("inf"), "starvation_check_interval": 50}
    sched = SchedulerConfig(**cfg.scheduler_options)
    assert sched.quantum_s(1) == pytest.approx(0.06) and sched.quantum_s(5) == float("inf")
    with pytest.raises(ValueError, match="tail_guard_s must be > 0"):
        SchedulerConfig(tail_guard_s=0)
    with pytest.raises(ValueError, match="tail_guard_seats must be >= 0"):
        SchedulerConfig(tail_guard_s=4.0, tail_guard_seats=-1)
