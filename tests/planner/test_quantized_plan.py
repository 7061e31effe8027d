"""The planner with weight quantization: the bytes and the time a scheme changes, and `--quantization auto`'s
choice between the unquantized model and each scheme."""
from types import SimpleNamespace

import pytest

from flexserve.config import preset
from flexserve.errors import PolicyError
from flexserve.offload.policy import Policy
from flexserve.planner import auto_plan, grid_search, profile, search
from flexserve.planner.cost_model import estimate
from flexserve.planner.quant import MAX_FUSED_ROWS, ROUNDING_SCHEMES, quality_note
from flexserve.planner.quant_choice import TOLERANCE, choose_quantization
from flexserve.planner.report import Workload, format_plan
from flexserve.planner.sizes import model_sizes

T4, H100 = profile("t4"), profile("h100")
SMALL_CAPS = dict(gpu_mem="4GB", cpu_mem="8GB", disk=0)  # Llama-2-7B: 13.5 GB in bf16, ~7 GB fp8, ~4 GB 4-bit


def test_fp8_stores_a_decoder_layer_in_half_the_bytes_and_the_plan_carries_it():
    cfg = preset("llama-2-7b")
    plan = search(cfg, H100, 512, 32, dtype_bytes=2, quantization="fp8")
    assert plan.policy.quantization == "fp8"
    fp8, bf16 = model_sizes(cfg, plan.policy, 2), model_sizes(cfg, Policy(), 2)
    assert fp8.layer_w == pytest.approx(bf16.layer_w / 2, rel=1e-12)
    # embeddings and head stay in bf16: the whole model is a little over half
    assert 0.5 < fp8.total_w / bf16.total_w < 0.55
    assert model_sizes(cfg, Policy(kv_cache_dtype="fp8"), 2).kv_token == pytest.approx(bf16.kv_token / 2)


def test_streamed_weights_cost_the_stored_bytes():
    cfg = preset("llama-2-7b")
    weights_on_cpu = Policy(w_gpu_percent=0, w_cpu_percent=100, gpu_batch_size=8)
    none = estimate(cfg, weights_on_cpu, T4, 512, 32).breakdown
    fp8 = estimate(cfg, weights_on_cpu.replace(quantization="fp8"), T4, 512, 32).breakdown
    rtn4 = estimate(cfg, weights_on_cpu.replace(quantization="rtn4"), T4, 512, 32).breakdown
    key = "decode.load.weights pcie"
    assert fp8[key] < 0.55 * none[key]
    assert rtn4[key] < 0.3 * none[key]


def test_a_decode_step_reads_the_quantized_bytes_from_hbm():
    cfg = preset("llama-2-7b")
    resident = Policy(gpu_batch_size=1)  # all on the GPU, one row: bound by reading the weights
    layers = cfg.num_layers
    none = estimate(cfg, resident, H100, 512, 32).breakdown["decode.compute.gpu linear"]
    for scheme in ("fp8", "int8", "rtn4", "awq"):
        sz = model_sizes(cfg, resident.replace(quantization=scheme), 2)
        got = estimate(cfg, resident.replace(quantization=scheme), H100, 512, 32).breakdown
        head = none - layers * sz.layer_w16 / H100.gpu_mem_bw  # the head is not quantized
        assert got["decode.compute.gpu linear"] == pytest.approx(head + layers * sz.layer_w / H100.gpu_mem_bw)


def test_4bit_weights_pay_a_rebuild_per_gpu_batch_above_the_fused_kernels_rows():
    cfg = preset("llama-2-7b")
    pol = Policy(gpu_batch_size=4, num_gpu_batches=2)  # prefill: 4 x 512 rows per batch, far above 16
    none = estimate(cfg, pol, H100, 512, 32).breakdown["prefill.compute.gpu linear"]
    awq = estimate(cfg, pol.replace(quantization="awq"), H100, 512, 32).breakdown["prefill.compute.gpu linear"]
    rebuild = cfg.num_layers * 2 * model_sizes(cfg, pol, 2).layer_w16 / H100.dequant_bw
    assert awq - none == pytest.approx(rebuild, rel=1e-9)
    # fp8 multiplies the bytes it stores: no rebuild, the same compute-bound prefill
    fp8 = estimate(cfg, pol.replace(quantization="fp8"), H100, 512, 32).breakdown["prefill.compute.gpu linear"]
    assert fp8 == pytest.approx(none, rel=1e-9)


def test_the_fused_row_limit_is_the_kernels():
    from flexserve.kernels.dequant_matmul import MAX_FUSED_ROWS as KERNEL_ROWS

    assert MAX_FUSED_ROWS == KERNEL_ROWS


def test_unquantized_estimates_are_unchanged_by_the_quantization_terms():
    # a mixture of experts keeps its layers unquantized (layer_ratio), so no scheme changes its estimate
    cfg = preset("mixtral-8x7b")
    pol = Policy(w_gpu_percent=10, w_cpu_percent=90, gpu_batch_size=4)
    base = estimate(cfg, pol, H100, 256, 16)
    assert estimate(cfg, pol.replace(quantization="rtn4"), H100, 256, 16).total_s == pytest.approx(base.total_s)


@pytest.mark.parametrize("scheme", ["fp8", "rtn4"])
def test_milp_is_never_worse_than_the_grid_with_a_scheme(scheme):
    cfg, hw = preset("opt-6.7b"), T4.with_memory("8GB", "20GB")
    milp = search(cfg, hw, 512, 32, quantization=scheme, gpu_batch_sizes=(1, 4, 16, 64), num_gpu_batches=(1, 2, 4))
    grid = grid_search(cfg, hw, 512, 32, quantization=scheme)
    assert milp.policy.quantization == grid.policy.quantization == scheme
    assert milp.lp_estimate.total_tok_s >= grid.estimate.total_tok_s * (1 - 1e-6)


def test_an_unknown_scheme_is_one_clear_error():
    with pytest.raises(PolicyError, match=r"--quantization must be one of fp8, int8, rtn4, awq.*got 'fp4'"):
        search(preset("opt-1.3b"), H100, 512, 32, quantization="fp4")
    with pytest.raises(PolicyError, match="--quant-group-size applies to the 4-bit schemes"):
        search(preset("opt-1.3b"), H100, 512, 32, quantization="fp8", quant_group_size=64)


def test_infeasible_message_names_the_scheme():
    with pytest.raises(PolicyError, match=r"of weights \(rtn4\)"):
        search(preset("llama-2-70b"), T4, 512, 32, gpu_mem="4GB", cpu_mem="8GB", disk=0, quantization="rtn4")


def test_a_model_too_big_in_bf16_gets_a_4bit_plan():
    cfg = preset("llama-2-7b")
    with pytest.raises(PolicyError):
        search(cfg, T4, 512, 32, dtype="bfloat16", **SMALL_CAPS)
    choice = choose_quantization(lambda s: search(cfg, T4, 512, 32, dtype="bfloat16", quantization=s,
                                                  **SMALL_CAPS))
    assert choice.scheme == "awq" and choice.plan.policy.quantization == "awq"
    assert [t.scheme for t in choice.trials] == [None, *ROUNDING_SCHEMES]
    assert not choice.trials[0].fits and "does not fit" in choice.reason
    assert not choice.plan.estimate.overflows(choice.plan.hardware)


def test_a_model_that_fits_keeps_its_weights_unquantized():
    cfg = preset("opt-1.3b")
    choice = choose_quantization(lambda s: search(cfg, H100, 512, 32, quantization=s))
    assert choice.scheme is None and choice.plan.policy.quantization is None
    fastest = max(t.total_tok_s for t in choice.trials)
    assert choice.plan.estimate.total_tok_s >= (1 - TOLERANCE) * fastest
    assert "unquantized model fits" in choice.reason


def _fake(speeds: dict):
    """plan_for over made-up predictions: a scheme missing from `speeds` does not fit."""
    def plan_for(scheme):
        if scheme not in speeds:
            raise PolicyError(f"{scheme} does not fit")
        return SimpleNamespace(estimate=SimpleNamespace(total_tok_s=speeds[scheme], decode_tok_s=speeds[scheme]),
                               policy=Policy(quantization=scheme))
    return plan_for


@pytest.mark.parametrize("speeds, chosen", [
    ({None: 96, "fp8": 100, "int8": 100, "awq": 99, "rtn4": 99}, None),  # within 5%: full quality
    ({None: 94, "fp8": 100, "int8": 100, "awq": 99, "rtn4": 99}, "fp8"),  # 6% slower: the fastest
    ({None: 50, "fp8": 96, "int8": 97, "awq": 100, "rtn4": 100}, "int8"),  # fp8 ≈ int8: the faster of the two
    ({None: 50, "fp8": 90, "int8": 90, "awq": 100, "rtn4": 100}, "awq"),  # awq beats rtn4 at the same speed
    ({"fp8": 10, "int8": 10, "rtn4": 40}, "rtn4"),  # the only fast plan, whatever its quality
    ({"rtn4": 5}, "rtn4"),
])
def test_the_rule_prefers_quality_within_five_percent_of_the_fastest(speeds, chosen):
    assert choose_quantization(_fake(speeds)).scheme == chosen


def test_nothing_fits_with_any_scheme_is_an_error():
    with pytest.raises(PolicyError, match="no policy fits with any weight quantization.*none: None does not fit"):
        choose_quantization(_fake({}))


def test_the_report_states_what_the_plan_assumes_about_quality():
    cfg = preset("llama-2-7b")
    work = Workload("llama-2-7b", "bfloat16", 512, 32)
    text = format_plan(search(cfg, T4, 512, 32, dtype="bfloat16", quantization="rtn4", **SMALL_CAPS), cfg, work)
    quality = next(line for line in text.splitlines() if line.startswith("quality"))
    assert "4-bit weights" in quality and "higher perplexity" in quality and "bench/RESULTS.md section 6" in quality
    assert "weights unquantized" in quality_note(Policy()) and "RESULTS" not in quality_note(Policy())
    assert "fp8 KV cache" in quality_note(Policy(kv_cache_dtype="fp8"))


def test_auto_plan_chooses_a_scheme(capsys):
    plan = auto_plan(preset("opt-125m"), 64, 8, hardware="t4", gpu_mem="6GB", cpu_mem="6GB", device="cpu",
                     progress=True, quantization="auto")
    assert plan.policy.quantization is None  # 250 MB of weights: nothing to gain
    assert "quantization auto: none" in capsys.readouterr().err
