"""`serve --policy auto`: weight placement, KV pool and seats under memory caps, passed to the engine."""
import dataclasses

import pytest
import torch

from flexserve.config import preset
from flexserve.errors import PolicyError
from flexserve.offload.budget import weight_bytes
from flexserve.planner import profile, save_hardware
from flexserve.planner.cost_model import CPU_PROCESS_BYTES, GPU_RUNTIME_BYTES
from flexserve.planner.serving import serving_plan

H100 = profile("h100")
GB = 1e9


def _gpu_bytes(cfg, plan, dtype_bytes=2, block_size=16):
    return (weight_bytes(cfg, plan.policy, dtype_bytes).gpu
            + plan.num_gpu_blocks * block_size * cfg.kv_bytes_per_token(dtype_bytes))


def test_a_model_that_fits_stays_resident_and_the_pool_takes_the_rest():
    cfg = preset("llama-3-8b")
    plan = serving_plan(cfg, H100.with_memory(gpu_mem=80e9), 2, "bfloat16")
    assert plan.policy.w_gpu_percent == 100 and plan.policy.w_cpu_percent == 0
    assert plan.max_num_seqs == min(256, plan.num_gpu_blocks * 16 // 2048)  # contexts of 2048 tokens
    assert 55 * GB < plan.num_gpu_blocks * 16 * cfg.kv_bytes_per_token(2) < 63 * GB
    assert _gpu_bytes(cfg, plan) + GPU_RUNTIME_BYTES < 80 * GB


def test_a_cap_below_the_weights_streams_part_of_them_and_still_fits():
    cfg = preset("llama-3-8b")  # 16.1 GB of bf16 weights
    hw = H100.with_memory(gpu_mem=12e9, cpu_mem=64e9)
    plan = serving_plan(cfg, hw, 2, "bfloat16")
    assert 0 < plan.policy.w_gpu_percent < 100 and plan.policy.w_gpu_percent + plan.policy.w_cpu_percent == 100
    assert _gpu_bytes(cfg, plan) < 12 * GB
    assert plan.num_gpu_blocks * 16 >= 2048 and 1 <= plan.max_num_seqs <= 256
    assert plan.bottleneck == "pcie weights"  # every step streams the offloaded share over the host link
    # a larger cap keeps more weights on the GPU and decodes faster
    more = serving_plan(cfg, H100.with_memory(gpu_mem=24e9, cpu_mem=64e9), 2, "bfloat16")
    assert more.policy.w_gpu_percent >= plan.policy.w_gpu_percent and more.decode_tok_s > plan.decode_tok_s


def test_quantized_weights_and_an_fp8_pool_are_counted_as_stored():
    """Under a cap that makes bf16 weights stream, fp8 weights stay resident, and an fp8 KV pool holds twice
    the blocks in the same bytes."""
    cfg = preset("llama-3-8b")  # 16.1 GB of bf16 weights, 8 GB in fp8
    hw = H100.with_memory(gpu_mem=14e9, cpu_mem=64e9)
    bf16 = serving_plan(cfg, hw, 2, "bfloat16")
    fp8 = serving_plan(cfg, hw, 2, "bfloat16", quant={"quantization": "fp8"})
    assert bf16.policy.w_gpu_percent < 100 and fp8.policy.w_gpu_percent == 100
    assert fp8.policy.quantization == "fp8"
    assert weight_bytes(cfg, fp8.policy, 2).gpu < 0.6 * weight_bytes(cfg, bf16.policy.replace(w_gpu_percent=100,
                                                                                               w_cpu_percent=0), 2).gpu
    roomy = H100.with_memory(gpu_mem=80e9)
    kv16 = serving_plan(cfg, roomy, 2, "bfloat16")
    kv8 = serving_plan(cfg, roomy, 2, "bfloat16", quant={"kv_cache_dtype": "fp8"})
    assert kv8.num_gpu_blocks == pytest.approx(2 * kv16.num_gpu_blocks, rel=0.01)


def test_one_memory_counts_weights_and_both_pools_once():
    cfg = preset("opt-1.3b")
    hw = dataclasses.replace(H100.with_memory(gpu_mem=12e9, cpu_mem=12e9), unified_memory=True)
    plan = serving_plan(cfg, hw, 4, "float32")
    per_block = 16 * cfg.kv_bytes_per_token(4)
    w = weight_bytes(cfg, plan.policy, 4)
    assert plan.policy.w_gpu_percent == 100  # nothing to gain by "streaming" within the same RAM
    total = w.gpu + w.cpu + (plan.num_gpu_blocks + plan.num_cpu_blocks) * per_block + CPU_PROCESS_BYTES
    assert total <= hw.pool_limit()


def test_nothing_fits_says_why():
    with pytest.raises(PolicyError, match="no weight placement leaves a KV pool"):
        serving_plan(preset("llama-3-70b"), H100.with_memory(gpu_mem=4e9, cpu_mem=16e9), 2, "bfloat16")


def test_serve_auto_passes_the_plan_to_the_engine(tiny_model, tmp_path, monkeypatch, capsys):
    from flexserve.cli import build_parser
    from flexserve.cli.serve import engine_config_from_args
    from flexserve.engine.paged import PagedKV
    from flexserve.engine.serving import AsyncEngine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    save_hardware(dataclasses.replace(profile("t4"), name="fixed-rates"))
    folder, _ = tiny_model("llama-gqa")
    args = build_parser().parse_args(["serve", "--model", folder, "--device", "cpu", "--dtype", "float32",
                                      "--policy", "auto", "--gpu-mem", "3GB", "--cpu-mem", "3GB"])
    config = engine_config_from_args(args)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("policy auto (serving): ")]
    assert f"num_gpu_blocks={config.num_gpu_blocks} " in line and f"max_num_seqs={config.max_num_seqs}:" in line
    assert config.policy.w_gpu_percent == 100 and config.num_cpu_blocks >= 1
    # 3 GB, 10% to the system, 2 GB for the process: under 0.7 GB for weights and both pools
    engine = AsyncEngine(config)
    per_block = PagedKV.bytes_per_block(engine.model_config, 16, torch.float32)
    assert engine.settings.num_gpu_blocks == config.num_gpu_blocks
    assert engine.settings.max_num_seqs == config.max_num_seqs
    assert (config.num_gpu_blocks + config.num_cpu_blocks) * per_block < 0.7e9
    # an explicit flag wins over the plan
    args = build_parser().parse_args(["serve", "--model", folder, "--device", "cpu", "--policy", "auto",
                                      "--gpu-mem", "3GB", "--cpu-mem", "3GB", "--max-num-seqs", "3"])
    assert engine_config_from_args(args).max_num_seqs == 3
