"""Whole tensors move between tiers: the planner and the memory check count what the executor really places."""
import math

import pytest
import torch

from flexserve.cli import main
from flexserve.config import preset
from flexserve.memory.tiers import Tier, Tiers
from flexserve.offload.budget import weight_bytes
from flexserve.offload.placement import _place, PseudoLayer, tier_shares
from flexserve.offload.policy import Policy
from flexserve.planner import estimate, profile, search
from flexserve.planner.cost_model import placed_point

H100 = profile("h100")


def _layer_sizes(name):
    return preset(name).layer_weight_sizes()


def test_tier_shares_follow_whole_matrices():
    opt = _layer_sizes("opt-6.7b")  # MLP matrices 1/3 each, fused qkv 1/4, o 1/12
    # FlexGen's rule: attention and MLP spread separately, GPU share last; OPT-30B `20 80` keeps the output
    # projection (1/12) on the GPU, as FlexGen 0.1.8 does for the same flags
    assert tier_shares(_layer_sizes("opt-30b"), 20, 80)[Tier.GPU] == pytest.approx(1 / 12, abs=1e-3)
    assert tier_shares(opt, 50, 50)[Tier.GPU] == pytest.approx(5 / 12, abs=1e-3)  # o and the second MLP matrix
    # flexserve's earlier rule, largest first and GPU first, kept to reproduce the runs made with it
    assert tier_shares(opt, 50, 50, "largest-first")[Tier.GPU] == pytest.approx(2 / 3, abs=1e-3)
    assert tier_shares(_layer_sizes("opt-30b"), 20, 80, "largest-first")[Tier.GPU] == pytest.approx(1 / 3, abs=1e-3)
    for rule in ("flexgen", "largest-first"):
        for gpu, cpu in ((100, 0), (0, 100), (0, 0)):
            shares = tier_shares(opt, gpu, cpu, rule)
            assert shares[Tier.GPU] == gpu / 100 and shares[Tier.CPU] == cpu / 100  # exact at the ends
            assert sum(shares.values()) == 1.0
    with pytest.raises(ValueError, match="placement"):
        tier_shares(opt, 50, 50, "random")


def test_flexgen_rule_on_the_embedding_pseudo_layers():
    from flexserve.offload.placement import assign_tiers

    # FlexGen's output embedding lists the final norm, then the (tied) token table: the table is the last
    # tensor, so a GPU share of more than half of the pseudo-layer keeps it on the GPU
    head = {"final_norm.weight": 10, "final_norm.bias": 10, "embed.weight": 1000}
    assert assign_tiers(head, 60, 40)["embed.weight"] is Tier.GPU
    assert assign_tiers(head, 40, 60)["embed.weight"] is Tier.CPU
    assert assign_tiers(head, 40, 60)["final_norm.weight"] is Tier.CPU


@pytest.mark.parametrize("rule", ["flexgen", "largest-first"])
@pytest.mark.parametrize("percent", [(50, 50, 100, 0, 100, 0), (20, 80, 100, 0, 100, 0), (10, 40, 100, 0, 100, 0)])
def test_placed_shares_match_what_the_placement_code_does(tmp_path, rule, percent):
    cfg = preset("opt-125m")
    policy = Policy.from_percent(percent, weight_placement=rule)
    tiers = Tiers(torch.device("cpu"), str(tmp_path), policy)
    tensors = {k: torch.zeros(v) for k, v in cfg.layer_weight_shapes().items()}
    layer = PseudoLayer("decoder", 0)
    _place(tiers, policy, layer, tensors, torch.float32)
    total = sum(t.numel() for t in tensors.values())
    on_cpu = sum(math.prod(h.shape) for h in layer.offloaded.values() if h.tier is Tier.CPU)
    x = placed_point(cfg, policy)
    assert sum(t.numel() for t in layer.resident.values()) / total == pytest.approx(x[0])
    assert on_cpu / total == pytest.approx(x[1])
    tiers.close()


def test_placed_estimate_differs_where_the_shares_do():
    cfg = preset("opt-6.7b")
    half = Policy.from_percent((50, 50, 100, 0, 100, 0), gpu_batch_size=32, num_gpu_batches=2,
                               weight_placement="largest-first")
    cont = estimate(cfg, half, H100, 512, 8)
    placed = estimate(cfg, half, H100, 512, 8, placed=True)
    assert placed.decode_tok_s > 1.3 * cont.decode_tok_s  # a third streamed, not half
    assert placed.peak_gpu_bytes > cont.peak_gpu_bytes
    fg = estimate(cfg, half.replace(weight_placement="flexgen"), H100, 512, 8, placed=True)
    assert fg.decode_tok_s < cont.decode_tok_s  # 7/12 streamed
    every = Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=32, num_gpu_batches=4)
    assert estimate(cfg, every, H100, 512, 8, placed=True).decode_tok_s == cont.decode_tok_s  # no rounding


def test_memory_check_counts_the_bytes_as_placed():
    cfg = preset("opt-30b")
    fg = weight_bytes(cfg, Policy.from_percent((20, 80, 0, 100, 0, 100)), 2)
    assert fg.gpu == pytest.approx((fg.gpu + fg.cpu) / 12, rel=0.01)  # the output projection, not 20%
    lf = weight_bytes(cfg, Policy.from_percent((20, 80, 0, 100, 0, 100), weight_placement="largest-first"), 2)
    assert lf.gpu == pytest.approx((lf.gpu + lf.cpu) / 3, rel=0.01)  # one MLP matrix


def test_search_returns_a_policy_that_fits_and_performs_as_placed():
    cfg, caps = preset("opt-30b"), dict(gpu_mem="16GiB")
    hw = H100.with_memory(**caps)
    plan = search(cfg, H100, 512, 32, **caps)
    placed = estimate(cfg, plan.policy, hw, 512, 32, placed=True)
    assert placed.overflows(hw) == []
    assert placed.total_tok_s == pytest.approx(plan.estimate.total_tok_s, rel=1e-9)  # the plan is as placed
    # its weight split is one whole tensors allow, and the MILP's own point agrees on it
    from flexserve.planner import weight_options

    x = placed_point(cfg, plan.policy)
    assert (x[0], x[1]) in {(sg, sc) for sg, sc, _, _ in weight_options(cfg)}
    assert plan.lp_estimate.total_tok_s == pytest.approx(plan.estimate.total_tok_s, rel=0.02)
    assert plan.hardware.cpu_mem == hw.cpu_mem  # reported against the sizes the user gave


def test_weight_options_are_few_and_reproduced_by_their_percentages():
    from flexserve.planner import weight_options

    cfg = preset("opt-30b")
    opts = weight_options(cfg)
    assert 3 <= len(opts) <= 40 and (1.0, 0.0, 100, 0) in opts and (0.0, 1.0, 0, 100) in opts
    for sg, sc, g, c in opts:
        pol = Policy.from_percent((g, c, 100, 0, 100, 0))
        assert placed_point(cfg, pol)[:2] == (sg, sc)


def test_plan_cli_prints_the_placed_line(capsys):
    assert main(["plan", "--model", "opt-30b", "--hardware", "t4", "--prompt-len", "512", "--gen-len", "32"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("as placed"))
    assert "weights 8% GPU / 92% CPU" in line and line.rstrip().endswith("fits")  # OPT's output projection


def test_weight_placement_flag_round_trips_and_bad_values_are_refused():
    import argparse

    from flexserve.cli.common import add_policy_arguments, policy_from_args
    from flexserve.errors import PolicyError

    p = argparse.ArgumentParser()
    add_policy_arguments(p)
    pol = policy_from_args(p.parse_args(["--percent", "20", "80", "100", "0", "100", "0"]))
    assert pol.weight_placement == "flexgen" and "--weight-placement" not in pol.percent_flags()
    old = policy_from_args(p.parse_args(["--percent", "20", "80", "100", "0", "100", "0",
                                         "--weight-placement", "largest-first"]))
    assert old.weight_placement == "largest-first" and old.percent_flags().endswith("--weight-placement largest-first")
    with pytest.raises(PolicyError, match="weight_placement"):
        Policy(weight_placement="smallest-first")
