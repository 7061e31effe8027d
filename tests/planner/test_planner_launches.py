"""The planner's count of the kernels a decoder layer launches, read from the layer's own code."""
import pytest

from flexserve.config import preset
from flexserve.offload.policy import Policy
from flexserve.planner import estimate, profile
from flexserve.planner.launches import ATTENTION_LAUNCHES, FUSED_LAUNCH_WEIGHT, host_seconds, layer_launches

H100 = profile("h100")


def test_opt_layer_launches_twelve_kernels():
    # layer norm, q/k/v (bias folded into addmm), attention (2 cache writes + 1), o, add, layer norm, up, relu,
    # down, add
    assert ATTENTION_LAUNCHES == 3
    assert layer_launches(preset("opt-6.7b")) == 12


def test_llama_layer_counts_its_fused_kernels_once_each():
    # 2 RMSNorms, 2 rotary embeddings and SiLU-and-multiply are one Triton kernel each on a GPU; the rest:
    # q/k/v, attention (3), o, add, up, down, add
    assert layer_launches(preset("llama-2-7b")) == 9 + 5 * FUSED_LAUNCH_WEIGHT
    # biases on q/k/v (Qwen2) ride in the same GEMM; GQA changes no count
    assert layer_launches(preset("qwen2-7b")) == layer_launches(preset("llama-2-7b"))
    assert layer_launches(preset("mistral-7b")) == layer_launches(preset("llama-2-7b"))


def test_qk_norm_adds_two_fused_kernels_and_a_mixture_counts_as_its_dense_twin():
    qwen3 = preset("qwen3-30b-a3b")
    assert qwen3.is_moe and qwen3.qk_norm
    assert layer_launches(qwen3) == layer_launches(preset("llama-2-7b")) + 2 * FUSED_LAUNCH_WEIGHT
    assert layer_launches(preset("mixtral-8x7b")) == layer_launches(preset("llama-2-7b"))


def test_host_time_sets_a_small_resident_batch_and_scales_with_the_launches():
    opt, llama = preset("opt-6.7b"), preset("llama-2-7b")
    assert host_seconds(llama, 1e-3) / host_seconds(opt, 1e-3) == pytest.approx(layer_launches(llama) / 12)
    resident = Policy.from_percent((100, 0, 100, 0, 100, 0), gpu_batch_size=8)
    for cfg in (opt, llama):
        e = estimate(cfg, resident, H100, 512, 16)
        assert e.decode_bottleneck == "launch overhead"
        host = e.breakdown["decode.host.dispatch"]
        assert host == pytest.approx(cfg.num_layers * host_seconds(cfg, H100.layer_overhead_s))
        # the step: the host lane, plus what nothing overlaps, plus the embed and head pseudo-layers
        assert e.decode_s_per_step >= host + cfg.num_layers * H100.layer_sync_s


def test_cpu_attention_queues_the_issuing_behind_it():
    # the caller thread both issues the GPU's kernels and attends on the CPU: with the whole cache on the CPU
    # the issuing joins the compute lane; with it on the GPU it does not
    cfg = preset("llama-2-13b")
    on_cpu = estimate(cfg, Policy.from_percent((0, 100, 0, 100, 100, 0), gpu_batch_size=16, num_gpu_batches=4,
                                               cpu_cache_compute=True), H100, 512, 16)
    on_gpu = estimate(cfg, Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=16, num_gpu_batches=4,
                                               cpu_cache_compute=True), H100, 512, 16)
    issue = cfg.num_layers * 4 * host_seconds(cfg, H100.layer_overhead_s)
    assert on_cpu.breakdown["decode.compute.dispatch"] == pytest.approx(issue)
    assert on_gpu.breakdown.get("decode.compute.dispatch", 0.0) == 0.0


def test_quantized_projections_and_unfusable_shapes_launch_more():
    import dataclasses

    llama = preset("llama-2-7b")
    plain = layer_launches(llama)
    # fp8 / int8: a per-token activation quantiser (Triton) before each of the four projections
    assert layer_launches(llama, "fp8") == layer_launches(llama, "int8") == plain + 4 * FUSED_LAUNCH_WEIGHT
    # 4-bit: the fused dequantise-and-multiply Triton kernel in place of each aten GEMM
    assert layer_launches(llama, "rtn4") == plain + 4 * (FUSED_LAUNCH_WEIGHT - 1)
    # a head size whose half is not a power of two leaves the rotary kernel: its unfused operators count
    odd = dataclasses.replace(llama, head_dim=96)
    assert layer_launches(odd) > plain + 2


def test_counting_leaves_the_layer_code_as_it_was():
    from flexserve.models import layers

    before = (layers.rms_norm, layers.rope, layers.silu_mul, layers.linear)
    layer_launches(preset("qwen3-30b-a3b"), "awq")
    assert (layers.rms_norm, layers.rope, layers.silu_mul, layers.linear) == before


def test_without_a_gpu_issuing_and_computing_share_one_thread():
    import dataclasses

    cpu_box = dataclasses.replace(H100, unified_memory=True)
    cfg = preset("opt-1.3b")
    e = estimate(cfg, Policy.from_percent((100, 0, 100, 0, 100, 0), gpu_batch_size=4), cpu_box, 64, 8)
    assert "decode.host.dispatch" not in e.breakdown
    assert e.breakdown["decode.compute.dispatch"] == pytest.approx(
        cfg.num_layers * host_seconds(cfg, cpu_box.layer_overhead_s))


def test_plan_points_a_launch_bound_resident_model_to_the_paged_engine():
    from flexserve.planner import search
    from flexserve.planner.report import Workload, format_plan

    cfg = preset("llama-3-8b")
    work = Workload("llama-3-8b", "bfloat16", 512, 16)
    resident = search(cfg, H100, 512, 16, gpu_mem="40GiB")
    assert resident.policy.w_gpu_percent == 100 and resident.estimate.decode_bottleneck == "launch overhead"
    assert "paged engine" in format_plan(resident, cfg, work)
    offloaded = search(cfg, H100, 512, 16, gpu_mem="6GiB")  # weights stream: the link, not the host, bounds it
    assert offloaded.policy.w_gpu_percent < 100
    assert "paged engine" not in format_plan(offloaded, cfg, work)
