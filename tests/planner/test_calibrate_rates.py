"""Calibration of what the cost model consumes: CPU attention per host-cache dtype at policy shapes, the weight
stream beside CPU attention (a GPU-only measurement), and how the cost model reads them."""
import dataclasses

import pytest
import torch

from flexserve.config import preset
from flexserve.offload.policy import Policy
from flexserve.planner import estimate, load_hardware, profile, save_hardware
from flexserve.planner.calibrate import CPU_ATTENTION_SHAPES, _Timer, cpu_attention_rates

H100 = profile("h100")
CCC = Policy.from_percent((20, 80, 0, 100, 0, 100), gpu_batch_size=16, num_gpu_batches=3, cpu_cache_compute=True)


def test_cpu_attention_is_measured_per_cache_dtype():
    rates = cpu_attention_rates(_Timer(torch.device("cpu"), 0.03), quick=True, dtypes=("bfloat16", "float32"))
    assert set(rates) == {"bfloat16", "float32"}
    assert all(1e7 < r < 1e13 for r in rates.values())  # bytes/s a CPU can read
    assert CPU_ATTENTION_SHAPES[0][1] >= 512  # the quick shape is a real decode context, not a toy


def test_the_cost_model_reads_the_rate_of_the_cache_dtype():
    slow_bf16 = dataclasses.replace(H100, cpu_attention_bw_bf16=H100.cpu_attention_bw / 4)
    half = estimate(preset("opt-30b"), CCC, slow_bf16, 512, 32)
    bf16 = estimate(preset("opt-30b"), CCC.replace(cpu_attention_dtype="bfloat16"), slow_bf16, 512, 32)
    assert half.decode_s_per_step == pytest.approx(estimate(preset("opt-30b"), CCC, H100, 512, 32).decode_s_per_step)
    assert bf16.decode_s_per_step > 1.5 * half.decode_s_per_step
    assert slow_bf16.cpu_attention_rate("float32") == H100.cpu_attention_bw  # unmeasured: the half rate


def test_contention_slows_the_weight_stream_only_beside_cpu_attention():
    contended = dataclasses.replace(H100, h2d_contended_bw=H100.h2d_pinned_bw / 2)
    no_ccc = CCC.replace(cpu_cache_compute=False)
    assert estimate(preset("opt-30b"), no_ccc, contended, 512, 32).decode_s_per_step == pytest.approx(
        estimate(preset("opt-30b"), no_ccc, H100, 512, 32).decode_s_per_step)
    base = estimate(preset("opt-30b"), CCC, H100, 512, 32).breakdown
    slow = estimate(preset("opt-30b"), CCC, contended, 512, 32).breakdown
    # the decoder layers' weights stream at half the rate; the head's (no attention beside it) does not
    assert 1.9 < slow["decode.load.weights pcie"] / base["decode.load.weights pcie"] < 2.0
    assert slow["prefill.load.weights pcie"] == pytest.approx(base["prefill.load.weights pcie"])


def test_new_fields_are_saved_and_reused(tmp_path):
    hw = dataclasses.replace(H100, cpu_attention_bw_bf16=11e9, cpu_attention_bw_fp32=7e9, h2d_contended_bw=40e9)
    back = load_hardware(save_hardware(hw, str(tmp_path / "hw.json")))
    assert back == hw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the contended copy needs a GPU")
def test_contended_copy_is_measured_on_a_gpu():
    from flexserve.planner.calibrate import _h2d_beside_cpu_attention

    bw = _h2d_beside_cpu_attention(torch.device("cuda"), _Timer(torch.device("cpu"), 0.1), 64 << 20, True)
    assert 1e8 < bw < 1e12
