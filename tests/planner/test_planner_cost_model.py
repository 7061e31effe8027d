"""The cost model: traffic and compute terms per policy field, peak memory per tier, and `compare`."""
from dataclasses import replace

import pytest

from flexserve.config import preset
from flexserve.errors import PolicyError
from flexserve.offload.policy import Policy
from flexserve.planner import compare, estimate, profile, search
from flexserve.planner.cost_model import CPU_PROCESS_BYTES, GPU_RUNTIME_BYTES, build
from flexserve.planner.linear import Linear, minimum, point
from flexserve.planner.launches import REFERENCE_LAUNCHES, layer_launches

H100 = profile("h100")
T4 = profile("t4")
OPT30 = preset("opt-30b")
OPT67 = preset("opt-6.7b")


def pol(pct, gbs=16, nb=1, **kw):
    return Policy.from_percent(pct, gpu_batch_size=gbs, num_gpu_batches=nb, **kw)


def test_linear_arithmetic_and_simplex_minimum():
    x = point(10, 20, 30, 40, 50, 25)
    assert Linear.share("w", "disk").at(x) == pytest.approx(0.7)
    assert (2 * Linear.var("cache_cpu") + 1).at(x) == pytest.approx(1.8)
    assert (1 - Linear.var("act_gpu")).at(x) == pytest.approx(0.5)
    lin = Linear((-1.0, -3.0, 2.0, 0.0, 0.0, -1.0), 5.0)
    # weights: best vertex is all on CPU (-3); cache: all disk (0); act: all CPU (-1)
    assert minimum(lin) == pytest.approx(1.0)


def test_resident_policy_moves_nothing_and_small_batches_are_bound_by_the_host():
    e = estimate(OPT67, pol((100, 0, 100, 0, 100, 0), gbs=32), H100, 512, 32)
    moved = {k: v for k, v in e.breakdown.items() if (".load." in k or ".store." in k) and v > 0}
    assert moved == {}
    assert e.peak_cpu_bytes == CPU_PROCESS_BYTES and e.peak_disk_bytes == 0  # only the process itself
    # one decode step reads every weight byte from HBM at least once, and issues every layer's kernels
    assert e.decode_s_per_step >= OPT67.num_params() * 2 / H100.gpu_mem_bw
    issue = OPT67.num_layers * H100.layer_overhead_s * layer_launches(OPT67) / REFERENCE_LAUNCHES
    assert e.decode_s_per_step >= issue
    # 32 sequences: the GPU finishes a layer before the host has issued the next (measured on an H200: 5 ms of
    # GPU work and ~18 ms of host time per step); 256 sequences: the GPU's own work sets the pace
    assert e.decode_bottleneck == "launch overhead"
    big = estimate(OPT67, pol((100, 0, 100, 0, 100, 0), gbs=256), H100, 512, 32)
    assert big.decode_bottleneck.startswith("gpu")
    assert big.decode_s_per_step > e.decode_s_per_step


def test_weights_on_cpu_respect_the_pcie_bound_of_reference_md():
    # REFERENCE.md: OPT-6.7B weights on CPU, block 32x4: a decode step moves every layer byte across PCIe once
    e = estimate(OPT67, pol((0, 100, 100, 0, 100, 0), gbs=32, nb=4), H100, 512, 32)
    bound = 128 / (OPT67.num_params() * 2 / H100.h2d_pinned_bw)
    assert 0.8 * bound <= e.decode_tok_s <= bound
    assert e.decode_bottleneck == "pcie weights"


def test_unpinned_weights_are_slower():
    fast = estimate(OPT67, pol((0, 100, 100, 0, 100, 0), gbs=32), H100, 512, 32)
    slow = estimate(OPT67, pol((0, 100, 100, 0, 100, 0), gbs=32, pin_weight=False), H100, 512, 32)
    assert slow.decode_s_per_step > 5 * fast.decode_s_per_step


def test_more_offloaded_weights_never_speed_up_decode():
    times = [estimate(OPT30, pol((g, 100 - g, 0, 100, 100, 0), gbs=8), T4, 512, 32).decode_s_per_step
             for g in (20, 10, 0)]
    assert times == sorted(times)


def test_disk_weights_cost_disk_bandwidth():
    cpu = estimate(OPT30, pol((0, 100, 0, 100, 0, 100), gbs=8), T4, 512, 32)
    disk = estimate(OPT30, pol((0, 0, 0, 100, 0, 100), gbs=8), T4, 512, 32)
    assert disk.decode_bottleneck == "disk"
    extra = disk.decode_s_per_step - cpu.decode_s_per_step
    assert extra >= 0.9 * OPT30.num_params() * 2 / T4.disk_read_bw
    assert disk.peak_disk_bytes >= OPT30.num_params() * 2


def test_cpu_attention_keeps_the_cache_off_pcie():
    gpu_attn = estimate(OPT30, pol((20, 80, 0, 100, 0, 100), gbs=48, nb=3), T4, 512, 32)
    cpu_attn = estimate(OPT30, pol((20, 80, 0, 100, 0, 100), gbs=48, nb=3, cpu_cache_compute=True), T4, 512, 32)
    assert gpu_attn.breakdown["decode.load.cache pcie"] > 1.0
    assert cpu_attn.breakdown["decode.load.cache pcie"] == 0
    assert cpu_attn.breakdown["decode.compute.cpu attention"] > 0
    assert cpu_attn.decode_s_per_step < gpu_attn.decode_s_per_step
    # CPU attention reads the whole cache once per step at CPU memory bandwidth
    cache = 144 * (512 + 16) * OPT30.kv_bytes_per_token(2)
    assert cpu_attn.breakdown["decode.compute.cpu attention"] == pytest.approx(cache / T4.cpu_mem_bw, rel=0.01)


def test_overlap_takes_the_max_and_no_overlap_the_sum():
    p = pol((20, 80, 0, 100, 0, 100), gbs=48, nb=3, cpu_cache_compute=True)
    on = estimate(OPT30, p, T4, 512, 32)
    off = estimate(OPT30, p.replace(overlap=False), T4, 512, 32)
    assert off.decode_s_per_step > on.decode_s_per_step
    parts = sum(v for k, v in off.breakdown.items() if k.startswith("decode."))
    assert off.decode_s_per_step == pytest.approx(parts, rel=1e-9)
    # with overlap the lanes run side by side: the step is shorter than its parts, never shorter than one lane
    lanes = ("load", "store", "compute", "host")
    longest = max(sum(v for k, v in on.breakdown.items() if k.startswith(f"decode.{lane}.")) for lane in lanes)
    assert longest <= on.decode_s_per_step < parts


def test_gqa_shrinks_the_cache():
    gqa = preset("llama-2-70b")
    mha = gqa.replace(num_kv_heads=gqa.num_heads)
    p = pol((0, 100, 0, 100, 100, 0), gbs=16, nb=4)
    a, b = estimate(gqa, p, H100, 512, 32), estimate(mha, p, H100, 512, 32)
    # activations stay on the GPU, so the CPU holds exactly the process, the weights and the cache
    cache_gqa = a.peak_cpu_bytes - gqa.num_params() * 2 - CPU_PROCESS_BYTES
    cache_mha = b.peak_cpu_bytes - mha.num_params() * 2 - CPU_PROCESS_BYTES
    assert cache_gqa == pytest.approx(64 * (512 + 32) * gqa.kv_bytes_per_token(2))
    assert cache_mha == pytest.approx(8 * cache_gqa)
    assert a.breakdown["decode.load.cache pcie"] == pytest.approx(b.breakdown["decode.load.cache pcie"] / 8)


def test_compression_shrinks_weights_and_their_transfer():
    p = pol((0, 100, 0, 100, 100, 0), gbs=8)
    plain = estimate(OPT30, p, T4, 512, 32)
    comp = estimate(OPT30, p.replace(compress_weight=True), T4, 512, 32)
    ratio = comp.breakdown["decode.load.weights pcie"] / plain.breakdown["decode.load.weights pcie"]
    # Decoder matrices shrink to 0.28 of their bytes; OPT's tied head (the embedding table) stays full width,
    # as the executor keeps it.
    head = OPT30.vocab_size * OPT30.hidden_size
    layers = OPT30.num_layers * OPT30.num_layer_params()
    assert ratio == pytest.approx((layers * (0.5 + 4 / 64) / 2 + head) / (layers + head), rel=1e-3)
    assert comp.peak_cpu_bytes < plain.peak_cpu_bytes - 0.6 * OPT30.num_params() * 2
    cache = estimate(OPT30, p.replace(compress_cache=True), T4, 512, 32)
    assert cache.peak_cpu_bytes < plain.peak_cpu_bytes


def test_measured_rebuild_rate_prices_compressed_weights():
    """With `dequant_bw` set (calibrate measures it), a packed decoder layer costs its fp16 bytes at that rate
    on the GPU per block; without it the HBM-bound read-plus-write. A decoder layer's rebuild runs on the copy
    stream behind its bytes (the loader unpacks into the slot); the LM head's on the compute stream."""
    import dataclasses

    p = pol((100, 0, 100, 0, 100, 0), gbs=8).replace(compress_weight=True)
    hbm = estimate(OPT30, p, T4, 512, 32)
    slow = estimate(OPT30, p, dataclasses.replace(T4, dequant_bw=10e9), 512, 32)
    from flexserve.planner.sizes import model_sizes

    sz = model_sizes(OPT30, p)
    layers = slow.breakdown["decode.load.dequant"] - hbm.breakdown["decode.load.dequant"]
    head_extra = slow.breakdown["decode.compute.gpu linear"] - hbm.breakdown["decode.compute.gpu linear"]
    per_layer = sz.layer_w16 / 10e9 - (sz.layer_w + sz.layer_w16) / T4.gpu_mem_bw
    head = sz.head_w16 / 10e9 - (sz.head_w + sz.head_w16) / T4.gpu_mem_bw  # the LM head pseudo-layer
    assert sz.layer_w == pytest.approx(sz.layer_w16 * (0.5 + 4 / 64) / 2)
    assert layers == pytest.approx(OPT30.num_layers * per_layer, rel=1e-6)
    assert head_extra == pytest.approx(head, rel=1e-6)
    assert slow.decode_tok_s < hbm.decode_tok_s
    with pytest.raises(PolicyError, match="dequant_bw"):
        dataclasses.replace(T4, dequant_bw=-1.0)


def test_peak_memory_by_hand_for_a_simple_policy():
    cfg = preset("opt-1.3b")
    b, gbs, nb, prompt, gen = 2, 4, 2, 128, 16
    e = estimate(cfg, pol((50, 50, 0, 100, 0, 100), gbs=gbs, nb=nb), H100, prompt, gen)
    weights = cfg.num_params() * b
    cache = gbs * nb * (prompt + gen) * cfg.kv_bytes_per_token(b)
    acts = gbs * nb * prompt * cfg.hidden_size * b
    assert e.peak_cpu_bytes == pytest.approx(CPU_PROCESS_BYTES + 0.5 * weights + cache + acts, rel=1e-6)
    assert e.peak_disk_bytes == pytest.approx(0, abs=1)
    layer = cfg.num_layer_params() * b
    # GPU: half the weights, double-buffered half layers, cache slots of one batch, and a working set
    slots = 2 * gbs * (prompt + gen) * cfg.kv_bytes_per_token(b) / cfg.num_layers
    assert e.peak_gpu_bytes > 0.5 * weights + layer + slots
    assert e.peak_gpu_bytes < 0.5 * weights + 3 * layer + GPU_RUNTIME_BYTES + 2e9


def test_throughput_definitions():
    e = estimate(OPT30, pol((20, 80, 0, 100, 0, 100), gbs=48, nb=3, cpu_cache_compute=True), T4, 512, 32)
    assert e.block_size == 144
    assert e.total_s == pytest.approx(e.prefill_s + 31 * e.decode_s_per_step)
    assert e.total_tok_s == pytest.approx(144 * 32 / e.total_s)
    assert e.decode_tok_s == pytest.approx(144 / e.decode_s_per_step)
    assert e.prefill_tok_s == pytest.approx(144 * 512 / e.prefill_s)


@pytest.mark.parametrize("name", ["llama-3-8b", "smollm2-135m", "opt-125m", "qwen2-7b"])
def test_llama_and_opt_shapes_both_cost(name):
    """Weights all on the CPU: every decode step streams each layer's weights over PCIe once (all but the
    embedding tables, which are read where they live), the CPU holds every byte, and the figures add up."""
    cfg = preset(name)
    e = estimate(cfg, pol((0, 100, 0, 100, 0, 100), gbs=4), H100, 64, 8)
    weight_bytes = cfg.num_params() * 2
    streamed = e.breakdown["decode.load.weights pcie"] * H100.h2d_pinned_bw
    assert weight_bytes - cfg.num_embed_params() * 2 <= streamed * (1 + 1e-9) and streamed <= weight_bytes
    assert e.decode_s_per_step >= e.breakdown["decode.load.weights pcie"]  # the step waits for its weights
    assert e.peak_cpu_bytes > weight_bytes * 0.99
    assert e.total_s == pytest.approx(e.prefill_s + 7 * e.decode_s_per_step)
    assert e.total_tok_s == pytest.approx(4 * 8 / e.total_s)


def test_bad_lengths_raise():
    with pytest.raises(PolicyError, match="prompt_len"):
        estimate(OPT30, Policy(), T4, 0, 32)


def test_compare_reports_relative_error():
    e = estimate(OPT30, pol((20, 80, 0, 100, 0, 100), gbs=48, nb=3, cpu_cache_compute=True), T4, 512, 32)
    r = compare(e, e.total_tok_s / 2)
    assert r["relative_error"] == pytest.approx(1.0) and r["abs_relative_error"] == pytest.approx(1.0)
    r = compare(e, e.decode_tok_s * 1.25, which="decode")
    assert r["relative_error"] == pytest.approx(-0.2)
    with pytest.raises(ValueError):
        compare(e, 0)


def test_estimate_cost_model_is_consistent_with_build():
    p = pol((10, 60, 20, 50, 30, 40), gbs=8, nb=2)
    model = build(OPT30, p, T4, 256, 16)
    e = estimate(OPT30, p, T4, 256, 16)
    assert model.total_time(point(*p.percent)) == pytest.approx(e.total_s)


def test_cpu_attention_overlap_slows_only_cpu_attention_policies():
    """The fitted overlap of CPU attention with the weight stream: 1 is the ideal schedule, lower values make
    CPU-attention policies slower (never faster) and leave every other policy alone."""
    import dataclasses

    from flexserve.errors import PolicyError
    from flexserve.planner.hardware import profile

    hw = profile("h100")
    ideal, serial = dataclasses.replace(hw, cpu_attention_overlap=1.0), dataclasses.replace(hw, cpu_attention_overlap=0.0)
    cpu_attn = Policy.from_percent((20, 80, 0, 100, 0, 100), gpu_batch_size=16, num_gpu_batches=3, cpu_cache_compute=True)
    gpu_attn = Policy.from_percent((20, 80, 100, 0, 100, 0), gpu_batch_size=16, num_gpu_batches=3)
    speeds = [estimate(OPT30, cpu_attn, h, 512, 32).decode_tok_s for h in (ideal, hw, serial)]
    assert speeds[0] >= speeds[1] > speeds[2]
    assert estimate(OPT30, gpu_attn, ideal, 512, 32).decode_tok_s == estimate(OPT30, gpu_attn, serial, 512, 32).decode_tok_s
    with pytest.raises(PolicyError, match="cpu_attention_overlap"):
        dataclasses.replace(hw, cpu_attention_overlap=1.5)


# Peak GPU bytes measured on one H100 (bench/RESULTS.md section 2): the plan must not under-promise
# by more than a little, or a plan made for a 16 GiB card overflows it.
MEASURED_GPU_PEAKS = [  # (model, --percent, gpu batch, num gpu batches, gen len, measured peak GB)
    ("opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, 32, 11.03),
    ("opt-30b", (13, 87, 7, 93, 97, 3), 32, 3, 8, 18.10),
    ("opt-30b", (13, 87, 4, 96, 100, 0), 64, 1, 8, 18.60),
    ("opt-30b", (1, 99, 11, 89, 100, 0), 64, 1, 8, 16.80),
    ("opt-6.7b", (0, 100, 100, 0, 100, 0), 32, 4, 8, 38.60),
    ("opt-13b", (30, 70, 100, 0, 100, 0), 32, 2, 8, 41.60),
]


@pytest.mark.parametrize("name, percent, gbs, nb, gen, measured", MEASURED_GPU_PEAKS)
def test_gpu_peak_matches_measured_runs(name, percent, gbs, nb, gen, measured):
    ccc = percent[2] < 100
    e = estimate(preset(name), pol(percent, gbs=gbs, nb=nb, cpu_cache_compute=ccc), H100, 512, gen, placed=True)
    assert measured - 0.2 <= e.peak_gpu_bytes / 1e9 <= measured + 0.3


def test_cache_off_the_gpu_adds_the_store_staging_of_one_batch():
    cfg = OPT30
    on = build(cfg, pol((0, 100, 100, 0, 100, 0), gbs=32), H100, 512, 8).memory["gpu"]
    off = build(cfg, pol((0, 100, 0, 100, 100, 0), gbs=32), H100, 512, 8).memory["gpu"]
    labels = {s.label: s.num_bytes for s in off.switches}
    assert labels["cache store staging"] == 32 * 512 * 2 * cfg.kv_size * 2
    assert {s.label for s in on.switches} == set(labels)  # the same switches, off while the cache is on the GPU
    assert on.parts["runtime"].const == GPU_RUNTIME_BYTES


def test_decode_moves_no_activations_wherever_the_policy_puts_them():
    base = dict(gbs=16, nb=3, cpu_cache_compute=True)
    act_cpu = estimate(OPT30, pol((20, 80, 0, 100, 0, 100), **base), H100, 512, 32)
    act_gpu = estimate(OPT30, pol((20, 80, 0, 100, 100, 0), **base), H100, 512, 32)
    assert act_cpu.breakdown.get("decode.compute.act pcie", 0) == 0  # a decode step's hidden states stay on the GPU
    assert act_cpu.breakdown["prefill.compute.act pcie"] > 0  # the prefill's move as the policy says
    assert act_cpu.decode_s_per_step == pytest.approx(act_gpu.decode_s_per_step)


def test_plans_leave_the_host_reserve_free():
    hw = H100.with_memory(gpu_mem="16GiB", cpu_mem=100e9)  # a host where the CPU tier binds
    plan = search_plan(OPT30, hw)
    assert plan.estimate.peak_cpu_bytes <= hw.cpu_mem * (1 - hw.host_reserve)
    loose = search_plan(OPT30, replace(hw, host_reserve=0.0))
    assert loose.estimate.peak_cpu_bytes > plan.estimate.peak_cpu_bytes  # the reserve is what held it back
    with pytest.raises(PolicyError, match="host_reserve must be in"):
        replace(hw, host_reserve=1.0)


def search_plan(cfg, hw):
    return search(cfg, hw, 512, 8, gpu_batch_sizes=(16, 32, 64), num_gpu_batches=(1, 2, 4))


def test_a_mixtures_packed_weights_still_pay_their_rebuild():
    """A dense layer's rebuild is a copy-stream term; a mixture's stays with the GPU work that reads it (its
    experts are unpacked where they run): either way a slower rebuild rate costs time."""
    import dataclasses

    mixtral = preset("mixtral-8x7b")
    p = pol((20, 80, 100, 0, 100, 0), gbs=1).replace(compress_weight=True)
    fast = estimate(mixtral, p, H100, 128, 16)
    slow = estimate(mixtral, p, dataclasses.replace(H100, dequant_bw=H100.dequant_bw / 10), 128, 16)
    assert slow.breakdown["decode.compute.gpu linear"] > fast.breakdown["decode.compute.gpu linear"]
    assert "decode.load.dequant" not in slow.breakdown
    dense = estimate(OPT30, pol((20, 80, 100, 0, 100, 0), gbs=8).replace(compress_weight=True), H100, 128, 16)
    assert dense.breakdown["decode.load.dequant"] > 0
