"""The planner on mixtures of experts: only the experts a batch reaches cost, each copied in or computed on the
CPU by the executor's rule; `flexserve plan` and `--policy auto` give a policy for MoE presets."""
import pytest

from flexserve import Policy
from flexserve.config import preset
from flexserve.planner import auto_plan, profile
from flexserve.planner.cost_model import estimate
from flexserve.planner.search import search
from flexserve.planner.moe_cost import expected_experts_hit, moe_layer

H100 = profile("h100")


def test_expected_experts_hit():
    assert expected_experts_hit(8, 2, 1) == pytest.approx(2)
    assert expected_experts_hit(128, 8, 1) == pytest.approx(8)
    assert expected_experts_hit(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))
    assert expected_experts_hit(8, 2, 512) == pytest.approx(8)


def test_decode_costs_the_experts_reached_and_prefill_copies_them():
    cfg = preset("mixtral-8x7b")
    decode = moe_layer(cfg, Policy(), H100, tokens=1, dtype_bytes=2)
    prefill = moe_layer(cfg, Policy(), H100, tokens=512, dtype_bytes=2)
    # one token: both sides take a share of the reached experts, the CPU (faster for one token) the larger
    assert decode.hit == pytest.approx(2) and 0 < decode.copy_fraction < 0.5
    assert prefill.hit == pytest.approx(8) and prefill.copy_fraction > 0.85  # 64 tokens each: mostly copied
    assert decode.read_bytes16 < cfg.num_layer_params() * 2 / 3  # 2 of 8 experts are read, not the layer
    assert moe_layer(cfg, Policy(expert_compute="copy"), H100, 1, 2).copy_fraction == 1
    assert moe_layer(cfg, Policy(expert_compute="cpu"), H100, 512, 2).copy_fraction == 0


def test_batch1_decode_is_bound_by_the_expert_rule():
    cfg = preset("mixtral-8x7b")
    off = Policy.from_percent((3, 97, 100, 0, 100, 0), gpu_batch_size=1)
    on_cpu = estimate(cfg, off.replace(expert_compute="cpu"), H100, 128, 32, placed=True)
    copied = estimate(cfg, off.replace(expert_compute="copy"), H100, 128, 32, placed=True)
    both = estimate(cfg, off, H100, 128, 32, placed=True)
    assert on_cpu.decode_bottleneck == "cpu experts" and copied.decode_bottleneck == "pcie experts"
    # a decode step copies 2 experts per layer, not 8: 32 * 2 * 352 MB at the PCIe rate
    assert copied.decode_s_per_step == pytest.approx(32 * 2 * cfg.expert_params() * 2 / H100.h2d_pinned_bw, rel=0.2)
    assert on_cpu.decode_tok_s > copied.decode_tok_s
    # the rule auto runs both sides at once: its step is about c*p/(c+p) of the experts' work, faster than either
    c, p = on_cpu.decode_s_per_step, copied.decode_s_per_step
    assert both.decode_tok_s > on_cpu.decode_tok_s
    assert both.decode_s_per_step == pytest.approx(c * p / (c + p), rel=0.15)


def test_flexserve_plan_prints_a_plan_for_mixtral_under_24gib(cli):
    rc, out, err = cli("plan", "--model", "dummy:mixtral-8x7b", "--gpu-mem", "24GiB", "--cpu-mem", "120GiB",
                       "--hardware", "h100", "--dtype", "bfloat16")
    assert rc == 0, err
    assert "mixtral-8x7b" in out and "--percent " in out and "fits" in out


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x22b"])
def test_the_search_plans_moe_presets_under_24gib(name):
    plan = search(preset(name), H100.with_memory("24GiB", "120GiB", "1TiB"), 512, 32)
    assert plan.estimate.total_tok_s > 0 and not plan.estimate.overflows(plan.hardware)


def test_policy_auto_plans_and_runs_a_tiny_mixture_of_experts(tiny_model):
    from flexserve import LLM, SamplingParams
    from flexserve.config import load_hf_config

    from ..conftest import PROMPTS, hf_greedy

    folder, hf = tiny_model("qwen3-moe")
    plan = auto_plan(load_hf_config(folder), 16, 4, hardware="t4", gpu_mem="3GB", cpu_mem="3GB", dtype_bytes=4,
                     device="cpu")
    with LLM(folder, dtype="float32", device="cpu", policy=plan.policy) as llm:
        out = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=4, temperature=0,
                                                                            ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 4)


def test_the_transfer_bound_counts_the_experts_a_step_reaches(tiny_model):
    from flexserve import LLM
    from flexserve.offload.experts import expert_slots
    from flexserve.planner.moe_cost import reached_expert_bytes

    policy = Policy.from_percent((60, 40, 100, 0, 100, 0), gpu_batch_size=3, num_gpu_batches=2)
    with LLM(tiny_model("mixtral")[0], dtype="float32", device="cpu", policy=policy) as llm:
        ex = llm.executor
        off = sum(h.nbytes for layer in ex.layers for h in layer.experts.values())
        # the slots hold every off-GPU expert the block reaches: the block's two batches share one crossing
        # of each, so what crosses counts the experts the block's 6 tokens reach, once; the CPU reads each
        # batch's
        assert ex.experts.slots == expert_slots(ex.cfg, policy) >= max(
            sum(1 for n in layer.experts if n.endswith("up.weight")) for layer in ex.layers)
        reached = reached_expert_bytes(ex, 3, 2)
        per_batch = reached_expert_bytes(ex, 3, 2, shared_copies=False)
    assert off > 0 and reached["disk"] == 0
    assert reached["cpu"] == pytest.approx(expected_experts_hit(4, 2, 6) / 4 * off)
    assert per_batch["cpu"] == pytest.approx(2 * expected_experts_hit(4, 2, 3) / 4 * off)


def test_the_bound_leaves_out_packed_experts_kept_on_the_gpu(tiny_model):
    from flexserve import LLM
    from flexserve.planner.moe_cost import reached_expert_bytes

    policy = Policy.from_percent((100, 0, 100, 0, 100, 0), compress_weight=True)
    with LLM(tiny_model("mixtral")[0], dtype="float32", device="cpu", policy=policy) as llm:
        assert reached_expert_bytes(llm.executor, 1, 1) == {"cpu": 0.0, "disk": 0.0}


def test_a_block_that_shares_its_copies_pays_them_once_and_stages_its_slots(monkeypatch):
    """Several GPU batches: the executor keeps a slot for every expert one batch reaches, so the planner counts
    those slots on the GPU and the block's copies once per layer, not once per batch."""
    from flexserve.offload.experts import EXPERT_SLOTS, expert_slots, off_gpu_experts
    from flexserve.planner.moe_cost import staging_bytes

    cfg = preset("mixtral-8x7b")
    one = Policy.from_percent((20, 80, 100, 0, 100, 0), gpu_batch_size=64, num_gpu_batches=1,
                              expert_compute="copy")
    four = one.replace(num_gpu_batches=4)
    # 256 tokens reach every expert; 7 of the 8 live off the GPU at 20%: a slot for each, and as many for the
    # next layer's, copied ahead
    assert expert_slots(cfg, one) == EXPERT_SLOTS and off_gpu_experts(cfg, four) == 7
    assert expert_slots(cfg, four) == 14 and expert_slots(cfg, four.replace(overlap=False)) == 7
    assert staging_bytes(cfg, 2, 8) - staging_bytes(cfg, 2) == 6 * cfg.expert_params() * 2
    a, b = estimate(cfg, one, H100, 128, 8), estimate(cfg, four, H100, 128, 8)
    # 64 tokens reach every expert: four batches copy the same eight once, as one batch does
    assert b.breakdown["decode.load.experts pcie"] == pytest.approx(a.breakdown["decode.load.experts pcie"],
                                                                    rel=1e-6)
    # ... while with two slots they would cross four times, and twelve experts fewer would be staged
    from flexserve.planner import cost_model, moe_cost

    monkeypatch.setattr(moe_cost, "expert_slots", lambda *_: EXPERT_SLOTS)
    monkeypatch.setattr(cost_model, "expert_slots", lambda *_: EXPERT_SLOTS)
    two = estimate(cfg, four, H100, 128, 8)
    assert two.breakdown["decode.load.experts pcie"] == pytest.approx(4 * b.breakdown["decode.load.experts pcie"],
                                                                      rel=1e-6)
    assert b.peak_gpu_bytes - two.peak_gpu_bytes == pytest.approx(12 * cfg.expert_params() * 2, rel=1e-6)
