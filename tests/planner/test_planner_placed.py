"""Whole tensors move between tiers: the planner and the memory check count what the executor really places."""
import math

import pytest
import torch

from flexserve.cli import main
from flexserve.config import preset
from flexserve.memory.tiers import Tier, Tiers, tier_shares
from flexserve.offload.budget import weight_bytes
from flexserve.offload.placement import _place, PseudoLayer
from flexserve.offload.policy import Policy
from flexserve.planner import estimate, fitting_search, profile, search
from flexserve.planner.cost_model import placed_point

H100 = profile("h100")


def _layer_sizes(name):
    return {k: math.prod(v) for k, v in preset(name).layer_weight_shapes().items()}


def test_tier_shares_follow_whole_matrices():
    opt = _layer_sizes("opt-6.7b")  # MLP matrices 1/3 each, qkv 1/4, o 1/12
    assert tier_shares(opt, 50, 50)[Tier.GPU] == pytest.approx(2 / 3, abs=1e-3)
    assert tier_shares(_layer_sizes("opt-30b"), 20, 80)[Tier.GPU] == pytest.approx(1 / 3, abs=1e-3)
    for gpu, cpu in ((100, 0), (0, 100), (0, 0)):
        shares = tier_shares(opt, gpu, cpu)
        assert shares[Tier.GPU] == gpu / 100 and shares[Tier.CPU] == cpu / 100  # exact at the ends
        assert sum(shares.values()) == 1.0


def test_placed_shares_match_what_the_placement_code_does(tmp_path):
    cfg = preset("opt-125m")
    policy = Policy.from_percent((50, 50, 100, 0, 100, 0))
    tiers = Tiers(torch.device("cpu"), str(tmp_path), policy)
    tensors = {k: torch.zeros(v) for k, v in cfg.layer_weight_shapes().items()}
    layer = PseudoLayer("decoder", 0)
    _place(tiers, policy, layer, tensors, torch.float32)
    resident = sum(t.numel() for t in layer.resident.values())
    assert resident / sum(t.numel() for t in tensors.values()) == pytest.approx(placed_point(cfg, policy)[0])
    tiers.close()


def test_placed_estimate_differs_where_the_shares_do():
    cfg = preset("opt-6.7b")
    half = Policy.from_percent((50, 50, 100, 0, 100, 0), gpu_batch_size=32, num_gpu_batches=2)
    cont = estimate(cfg, half, H100, 512, 8)
    placed = estimate(cfg, half, H100, 512, 8, placed=True)
    assert placed.decode_tok_s > 1.3 * cont.decode_tok_s  # a third streamed, not half
    assert placed.peak_gpu_bytes > cont.peak_gpu_bytes
    every = Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=32, num_gpu_batches=4)
    assert estimate(cfg, every, H100, 512, 8, placed=True).decode_tok_s == cont.decode_tok_s  # no rounding


def test_memory_check_counts_the_bytes_as_placed():
    cfg = preset("opt-30b")
    by_rule = weight_bytes(cfg, Policy.from_percent((20, 80, 0, 100, 0, 100)), 2)
    assert by_rule.gpu == pytest.approx((by_rule.gpu + by_rule.cpu) / 3, rel=0.01)  # one MLP matrix, not 20%


def test_fitting_search_returns_a_policy_that_fits_as_placed():
    cfg, caps = preset("opt-30b"), dict(gpu_mem="16GiB")
    plain = search(cfg, H100, 512, 32, **caps)
    hw = H100.with_memory(**caps)
    # the continuous optimum's block needs more host memory once whole tensors are placed
    assert estimate(cfg, plain.policy, hw, 512, 32, placed=True).overflows(hw)
    fit = fitting_search(cfg, H100, 512, 32, **caps)
    assert estimate(cfg, fit.policy, hw, 512, 32, placed=True).overflows(hw) == []
    assert fit.hardware.cpu_mem == hw.cpu_mem  # reported against the sizes the user gave


def test_plan_cli_prints_the_placed_line(capsys):
    assert main(["plan", "--model", "opt-30b", "--hardware", "t4", "--prompt-len", "512", "--gen-len", "32"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("as placed"))
    assert "weights 0% GPU / 100% CPU" in line and line.rstrip().endswith("fits")
