"""Skip-join's job-size estimate comes from the served model and the machine's rates, not fixed constants."""
import pytest
import torch

from flexserve.config import preset
from flexserve.engine.defaults import DeviceRates
from flexserve.engine.job_cost import cpu_rates, job_cost_model, model_costs
from flexserve.engine.serving import AsyncEngine, EngineConfig
from flexserve.scheduler.cost import LinearCostModel, prefill_time_from

H100 = DeviceRates(matmul_flops=777e12, memory_bw=2.95e12)


def test_the_default_constants_are_llama3_8b_on_an_h100():
    flops, weights, kv = 2 * 8.03e9, 16.1e9, 32 * 8 * 128 * 2 * 2
    built = LinearCostModel.from_rates(flops, weights, kv, H100.matmul_flops, H100.memory_bw)
    default = LinearCostModel()
    assert built.step_overhead_s == pytest.approx(default.step_overhead_s, rel=0.02)
    assert built.s_per_token == pytest.approx(default.s_per_token, rel=0.02)
    assert built.s_per_context_token == pytest.approx(default.s_per_context_token, rel=0.02)


def test_estimate_scales_with_the_model_and_the_machine():
    small = prefill_time_from(job_cost_model(preset("llama-3-8b"), torch.bfloat16, torch.device("cpu"), H100))
    big = prefill_time_from(job_cost_model(preset("llama-3-70b"), torch.bfloat16, torch.device("cpu"), H100))
    slow = DeviceRates(H100.matmul_flops / 10, H100.memory_bw / 10)
    slow_small = prefill_time_from(job_cost_model(preset("llama-3-8b"), torch.bfloat16, torch.device("cpu"), slow))
    f8, w8, _ = model_costs(preset("llama-3-8b"), 2)
    f70, w70, _ = model_costs(preset("llama-3-70b"), 2)
    # Llama-3-8B: 8.03B params (7.50B outside the embedding table, which a token only looks up), 16.1 GB bf16
    assert 7.4e9 < f8 / 2 < 7.6e9 and 16.0e9 < w8 < 16.2e9
    for n in (16, 512, 4096):
        assert small(n) == pytest.approx(LinearCostModel()(n, 0, n), rel=0.08)  # the defaults' own case
        ratio = big(n) / small(n)
        assert 5 < ratio < max(f70 / f8, w70 / w8) * 1.05  # the fixed launch cost alone does not scale
        if n >= 512:  # past the fixed costs, a job is as much longer as the model has more work per token
            assert ratio > 0.95 * min(f70 / f8, w70 / w8)
        assert slow_small(n) == pytest.approx(10 * small(n) - 9 * 1.6e-3)  # launch cost does not scale
    assert small(4096) - small(512) == pytest.approx(3584 * f8 / (0.6 * H100.matmul_flops), rel=0.01)


def test_cpu_rates_are_measured_and_plausible():
    r = cpu_rates(torch.float32, n=128, copy_bytes=8 << 20)
    assert 1e8 < r.matmul_flops < 1e14 and 1e8 < r.memory_bw < 1e13


@pytest.mark.parametrize("scheduler", ["skip-join-mlfq", "fcfs"])
def test_the_engine_places_jobs_by_its_own_model(tiny_model, scheduler):
    folder, _ = tiny_model("llama-gqa")
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=16,
                                      max_num_seqs=2, scheduler=scheduler))
    if scheduler != "skip-join-mlfq":
        assert engine.job_cost is None
        return
    cost = engine.job_cost
    flops, weights, kv = model_costs(engine.model_config, 4)
    # the rates behind the model: one memory bandwidth for the weights and the KV reads, a matmul rate
    memory_bw = kv / cost.s_per_context_token
    assert cost.step_overhead_s == pytest.approx(weights / memory_bw + 1.6e-3)
    assert 1e8 < flops / cost.s_per_token < 1e14 and 1e8 < memory_bw < 1e13
    assert engine.scheduler.prefill_time_fn(100) == pytest.approx(cost(100, 0, 100))
    # a tiny model's job is far shorter than the default 8B model's on an H100 would say
    assert engine.scheduler.prefill_time_fn(100) != pytest.approx(LinearCostModel()(100, 0, 100), rel=0.05)
