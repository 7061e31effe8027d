"""The serving workload bound: its arithmetic on a hand-checked case, and which term limits where."""
import dataclasses

import pytest

from flexserve.benchmarks.bounds import stream_bound_s, workload_bound
from flexserve.config import preset


def test_bound_counts_prefill_flops_and_decode_bytes():
    cfg = preset("llama-3-8b")
    layer_flops = 2 * cfg.num_layers * cfg.num_layer_params()
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    b = workload_bound(cfg, 2, 16e9, prompt_lens=[100, 300], output_lens=[10, 4], max_num_seqs=8,
                       matmul_flops=1e15, memory_bw=1e12)
    assert b.prefill_s == pytest.approx((400 * layer_flops + attn * (100 * 101 + 300 * 301) / 2) / 1e15)
    kv = (10 * 100 + 45 + 4 * 300 + 6) * cfg.kv_bytes_per_token(2)
    assert b.decode_s == pytest.approx((10 * 16e9 + kv) / 1e12)  # 10 steps: the longest output
    row = b.row(2 * b.total_s)
    assert row["fraction_of_bound"] == pytest.approx(0.5, abs=1e-3)


def test_decode_steps_limited_by_seats_and_compute():
    cfg = preset("llama-3-8b")
    few = workload_bound(cfg, 2, 16e9, [10] * 64, [8] * 64, max_num_seqs=16, matmul_flops=1e18, memory_bw=1e12)
    many = workload_bound(cfg, 2, 16e9, [10] * 64, [8] * 64, max_num_seqs=64, matmul_flops=1e18, memory_bw=1e12)
    assert few.decode_s > many.decode_s  # 32 steps of weight reads against 8
    slow = workload_bound(cfg, 2, 16e9, [10] * 64, [8] * 64, max_num_seqs=64, matmul_flops=1e12, memory_bw=1e15)
    assert slow.decode_s == pytest.approx(512 * 2 * cfg.num_layers * cfg.num_layer_params() / 1e12)


def test_offloaded_weights_bound_each_step_by_their_stream():
    cfg = preset("llama-3-8b")
    prompts, outputs = [100] * 32, [20] * 32
    gpu = workload_bound(cfg, 2, 16e9, prompts, outputs, max_num_seqs=32, matmul_flops=1e15, memory_bw=4e12)
    # 20 decode steps at least; 3,840 tokens over a 2,048-token budget is 2 steps: the decode steps count
    stream = stream_bound_s(prompts, outputs, 32, 2048, streamed_weight_bytes=8e9, h2d_bw=50e9)
    assert stream == pytest.approx(20 * 8e9 / 50e9)
    # few seats: the output tokens over the seats; a small budget: every token over it
    assert stream_bound_s(prompts, outputs, 8, 2048, 8e9, 50e9) == pytest.approx(80 * 8e9 / 50e9)
    assert stream_bound_s(prompts, outputs, 32, 64, 8e9, 50e9) == pytest.approx(60 * 8e9 / 50e9)
    both = dataclasses.replace(gpu, stream_s=stream)
    assert both.total_s == pytest.approx(max(gpu.total_s, stream)) and both.total_s == stream
    row = both.row(2 * stream)
    assert row["bound_stream_s"] == pytest.approx(stream, abs=1e-3) and row["fraction_of_bound"] == 0.5
    assert "bound_stream_s" not in gpu.row(1.0)  # resident weights: the GPU's bound alone

