"""The cost model across GPUs: one rank's shard plus communication (flexserve.planner.parallel)."""
import json

import pytest

from flexserve.cli import main
from flexserve.config import preset
from flexserve.errors import PolicyError
from flexserve.offload.policy import Policy
from flexserve.planner import estimate, profile
from flexserve.planner.parallel import estimate_parallel

H100 = profile("h100")
POLICY = Policy(gpu_batch_size=16)


def test_one_gpu_is_the_single_gpu_estimate():
    cfg = preset("llama-3-8b")
    par = estimate_parallel(cfg, POLICY, H100, 512, 32)
    single = estimate(cfg, POLICY, H100, 512, 32)
    assert par.decode_tok_s == pytest.approx(single.decode_tok_s)
    assert par.comm_decode_s == 0 and par.comm_fraction == 0


def test_tensor_parallel_splits_the_weight_reads_and_pays_for_all_reduces():
    cfg = preset("llama-3-70b")
    one = estimate(cfg, POLICY, H100.with_memory(gpu_mem=400e9), 512, 32, dtype="bfloat16")
    tp2 = estimate_parallel(cfg, POLICY, H100, 512, 32, tp=2, dtype="bfloat16")
    tp4 = estimate_parallel(cfg, POLICY, H100, 512, 32, tp=4, dtype="bfloat16")
    assert tp2.stage.decode_s_per_step < one.decode_s_per_step  # half the bytes per rank
    assert 0 < tp2.comm_decode_s < tp4.comm_decode_s  # more ranks, more (latency-bound) all-reduce steps
    assert tp2.decode_tok_s > one.decode_tok_s
    slow = estimate_parallel(cfg, POLICY, H100, 512, 32, tp=2, dtype="bfloat16", link_bw=1e9)
    assert slow.comm_prefill_s > 10 * tp2.comm_prefill_s  # a PCIe-class link shows in the prefill


def test_pipeline_bubble_without_enough_micro_batches():
    cfg = preset("opt-30b")
    full = estimate_parallel(cfg, POLICY, H100, 512, 32, pp=2, micro_batches=2)
    starved = estimate_parallel(cfg, POLICY, H100, 512, 32, pp=2, micro_batches=1)
    # one micro-batch: each stage idles while the other works (two slots per step, one busy)
    assert starved.decode_s_per_step == pytest.approx(2 * starved.stage.decode_s_per_step + starved.comm_decode_s)
    # two: each stage runs its layers twice per step, for half the rows each time
    assert full.stage.block_size == starved.stage.block_size // 2
    assert full.decode_s_per_step == pytest.approx(2 * full.stage.decode_s_per_step + full.comm_decode_s)
    assert full.decode_tok_s > starved.decode_tok_s


def test_pipeline_stages_rebuild_weights_once_per_micro_batch():
    """Weight-bound stages (4-bit OPT-175B, all on the GPUs): splitting the batch into micro-batches costs a
    rebuild of every weight per micro-batch, so two stages decode no faster than one GPU would if it could
    hold the model (the two-GPU H200 runs: 6.6 tok/s)."""
    cfg = preset("opt-175b")
    pol = Policy.from_percent((100, 0, 100, 0, 100, 0), gpu_batch_size=8, compress_weight=True)
    pp2 = estimate_parallel(cfg, pol, H100, 512, 8, pp=2)
    one = estimate_parallel(cfg, pol, H100.with_memory(gpu_mem="1TB"), 512, 8)
    assert pp2.decode_tok_s == pytest.approx(one.decode_tok_s, rel=0.1)


def test_bad_grids_are_refused():
    cfg = preset("llama-3-8b")
    with pytest.raises(PolicyError, match="divisible|divide"):
        estimate_parallel(cfg, POLICY, H100, 512, 32, tp=3)
    with pytest.raises(PolicyError, match="stages"):
        estimate_parallel(cfg, POLICY, H100, 512, 32, pp=cfg.num_layers + 1)
    import dataclasses
    no_link = dataclasses.replace(H100, gpu_link_bw=0.0)
    with pytest.raises(PolicyError, match="gpu_link_bw"):
        estimate_parallel(cfg, POLICY, no_link, 512, 32, tp=2)


def test_plan_cli_reports_the_grid(capsys):
    assert main(["plan", "--model", "llama-3-70b", "--hardware", "h100", "--dtype", "bfloat16", "-tp", "2",
                 "--gpu-mem", "78GiB", "--cpu-mem", "120GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    par, block = out["parallel"], out["block_size"]
    assert (par["tp"], par["pp"]) == (2, 1)
    # the single-GPU part of the plan is one rank's half of the model, and it fits the memory given
    assert out["limits"]["gpu"] == 78 * 2**30 and out["placed"]["overflows"] == []
    assert out["peak_bytes"]["gpu"] <= out["limits"]["gpu"]
    # a grid decode step is that rank's step plus its all-reduces
    step = block / out["decode_tok_s"] + par["comm_decode_s"]
    assert par["decode_tok_s"] == pytest.approx(block / step)
    assert par["comm_fraction"] == pytest.approx(par["comm_decode_s"] / step) and 0 < par["comm_fraction"] < 1
    # and the figures are those of the estimate for the policy printed
    want = estimate_parallel(preset("llama-3-70b"), Policy(**out["policy"]), H100, 512, 32, tp=2, dtype="bfloat16")
    assert par["total_tok_s"] == pytest.approx(want.total_tok_s)
    assert par["comm_prefill_s"] == pytest.approx(want.comm_prefill_s)
