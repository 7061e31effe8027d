"""Serving defaults derived from the machine: each rule responds to the quantity it is derived from."""
from flexserve.config import preset
from flexserve.engine.defaults import GiB, MAX_BUDGET, MIN_BUDGET, DeviceRates, derive_defaults


def _block_bytes(cfg, block=16):
    return cfg.num_layers * 2 * block * cfg.kv_size * 2


def test_budget_follows_compute_per_token():
    fast = DeviceRates(matmul_flops=700e12, memory_bw=4e12)
    small, big = preset("opt-125m"), preset("llama-3-70b")
    d_small = derive_defaults(small, _block_bytes(small), 16, 80 * GiB, fast, host_blocks=10)
    d_big = derive_defaults(big, _block_bytes(big), 16, 80 * GiB, fast, host_blocks=10)
    assert d_small.max_num_batched_tokens == MAX_BUDGET  # a 125M model's step is launch-bound: fill it
    assert d_big.max_num_batched_tokens == MIN_BUDGET  # a 70B model's step is long already
    mid = preset("llama-3-8b")
    d = derive_defaults(mid, _block_bytes(mid), 16, 80 * GiB, fast, host_blocks=10, target_step_s=0.2)
    flops = 2 * mid.num_layers * mid.num_layer_params()
    assert d.max_num_batched_tokens * flops / 700e12 <= 0.2 < 2 * d.max_num_batched_tokens * flops / 700e12
    assert d.prefill_chunk_size == d.max_num_batched_tokens


def test_pool_and_seats_follow_free_memory():
    cfg, rates = preset("llama-3-8b"), DeviceRates(700e12, 4e12)
    roomy = derive_defaults(cfg, _block_bytes(cfg), 16, 100 * GiB, rates, host_blocks=10)
    tight = derive_defaults(cfg, _block_bytes(cfg), 16, 4 * GiB, rates, host_blocks=10)
    assert roomy.num_gpu_blocks * _block_bytes(cfg) < 0.9 * 100 * GiB
    assert roomy.num_gpu_blocks > 20 * tight.num_gpu_blocks
    assert roomy.max_num_seqs == 256
    assert tight.max_num_seqs == tight.num_gpu_blocks * 16 // 2048  # as many 2k contexts as the pool holds
    assert "seats" in tight.summary() and "KV pool" in tight.summary()


def test_given_values_are_kept_and_cpu_is_fixed():
    cfg = preset("llama-3-8b")
    d = derive_defaults(cfg, _block_bytes(cfg), 16, 100 * GiB, DeviceRates(700e12, 4e12), host_blocks=7,
                        max_num_seqs=5, max_num_batched_tokens=300, prefill_chunk_size=100, num_gpu_blocks=99)
    assert (d.max_num_seqs, d.max_num_batched_tokens, d.prefill_chunk_size, d.num_gpu_blocks, d.num_cpu_blocks) == \
        (5, 300, 100, 99, 7)
    cpu = derive_defaults(cfg, _block_bytes(cfg), 16, 100 * GiB, None, host_blocks=7)
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens, cpu.prefill_chunk_size) == (64, 2048, 512)
