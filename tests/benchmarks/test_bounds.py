"""The serving workload bound: its arithmetic on a hand-checked case, and which term limits where."""
import pytest

from flexserve.benchmarks.bounds import workload_bound
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
