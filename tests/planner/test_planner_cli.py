"""`flexserve plan` / `flexserve calibrate` hooks, driven through argparse as the main CLI will."""
import argparse
import json
import shutil
import time

import psutil
import pytest

from flexserve.config import preset
from flexserve.errors import ModelLoadError, PolicyError
from flexserve.cli.plan import add_calibrate_arguments, add_plan_arguments, run_calibrate, run_plan
from flexserve.offload.policy import Policy
from flexserve.planner import profile
from flexserve.planner.cost_model import estimate
from flexserve.planner.hardware import load_hardware
from flexserve.planner.report import format_hardware
from flexserve.planner.shapes import resolve_model_config


def plan_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    return parser.parse_args(list(argv))


def test_plan_prints_policy_flags_throughput_memory_and_bottleneck(capsys):
    assert run_plan(plan_args("--model", "opt-30b", "--hardware", "t4", "--gpu-mem", "16GB", "--cpu-mem", "208GB",
                              "--disk", "1.5TB", "--prompt-len", "512", "--gen-len", "32")) == 0
    out = capsys.readouterr().out
    assert "--percent " in out and "--gpu-batch-size " in out and "--num-gpu-batches " in out
    assert "--cpu-cache-compute" in out
    for word in ("prefill", "decode", "total", "tok/s", "GPU", "CPU", "bottleneck"):
        assert word in out


def test_plan_json_is_one_object_whose_flags_rebuild_the_policy(capsys):
    run_plan(plan_args("--model", "dummy:opt-30b", "--hardware", "t4", "--gpu-mem", "16GiB", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "opt-30b"
    assert data["limits"]["gpu"] == 16 * 2**30
    assert data["peak_bytes"]["gpu"] <= data["limits"]["gpu"]
    pct = data["flags"].split("--percent ")[1].split(" --")[0].split()
    assert [float(v) for v in pct] == data["percent"]
    policy = Policy(**data["policy"])
    assert policy.percent_flags() == data["flags"] and list(policy.percent) == data["percent"]
    # the figures are the cost model's for that very policy as the executor places it, on the profile asked for
    est = estimate(preset("opt-30b"), policy, profile("t4"), 512, 32, dtype_bytes=2, placed=True)
    for key in ("prefill_tok_s", "decode_tok_s", "total_tok_s", "prefill_s", "decode_s_per_step", "total_s"):
        assert data[key] == pytest.approx(getattr(est, key), rel=1e-12), key
    assert data["peak_bytes"] == pytest.approx({"gpu": est.peak_gpu_bytes, "cpu": est.peak_cpu_bytes,
                                                "disk": est.peak_disk_bytes}, rel=1e-12)
    # and they add up: one block of gpu_batch_size x num_gpu_batches sequences, a prefill then G - 1 steps
    blk, p, g = data["block_size"], data["prompt_len"], data["gen_len"]
    assert (blk, p, g) == (policy.gpu_batch_size * policy.num_gpu_batches, 512, 32)
    assert data["total_s"] == pytest.approx(data["prefill_s"] + (g - 1) * data["decode_s_per_step"], rel=1e-12)
    assert data["prefill_tok_s"] == pytest.approx(blk * p / data["prefill_s"], rel=1e-12)
    assert data["decode_tok_s"] == pytest.approx(blk / data["decode_s_per_step"], rel=1e-12)
    assert data["total_tok_s"] == pytest.approx(blk * g / data["total_s"], rel=1e-12)
    # a decode step overlaps loads, stores and compute: no shorter than the busiest, no longer than all three
    parts = {r: sum(v for k, v in data["breakdown"].items() if k.startswith(f"decode.{r}.")) for r in
             ("load", "store", "compute")}
    overhead = data["breakdown"]["decode.overhead"]
    assert max(parts.values()) + overhead <= data["decode_s_per_step"] * (1 + 1e-12)
    assert data["decode_s_per_step"] <= (sum(parts.values()) + overhead) * (1 + 1e-12)
    assert data["bottleneck"] and data["decode_bottleneck"]
    assert data["placed"]["overflows"] == [] and all(data["peak_bytes"][t] <= data["limits"][t] for t in data["limits"])


def test_plan_with_a_hand_written_profile_and_float32(tmp_path, capsys):
    from flexserve.planner import profile, save_hardware

    path = save_hardware(profile("t4").with_memory(gpu_mem=8e9), str(tmp_path / "box.json"))
    run_plan(plan_args("--model", "llama-3-8b", "--hardware", path, "--dtype", "float32", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert data["dtype"] == "float32" and data["limits"]["gpu"] == 8e9


def test_plan_errors_are_flexserve_errors():
    with pytest.raises(PolicyError, match="--gpu-mem"):
        run_plan(plan_args("--model", "opt-30b", "--hardware", "t4", "--gpu-mem", "lots"))
    with pytest.raises(PolicyError, match="give"):
        run_plan(plan_args("--model", "opt-175b", "--hardware", "t4", "--cpu-mem", "10GB", "--disk", "0"))
    with pytest.raises(ModelLoadError, match="preset"):
        run_plan(plan_args("--model", "opt-9000b", "--hardware", "t4"))


def test_model_strings(tmp_path):
    assert resolve_model_config("opt-30b") == preset("opt-30b")
    assert resolve_model_config("dummy:llama-3-8b") == preset("llama-3-8b")
    assert resolve_model_config("facebook/opt-6.7b") == preset("opt-6.7b")
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    cfg = resolve_model_config(str(folder))
    assert cfg.num_layers == 2 and cfg.num_kv_heads == 2
    with pytest.raises(ModelLoadError, match="neither"):
        resolve_model_config(str(tmp_path / "missing.gguf"))


def test_calibrate_quick_saves_a_positive_profile(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    out = tmp_path / "hw.json"
    start = time.perf_counter()
    assert run_calibrate(parser.parse_args(["--quick", "--output", str(out), "--disk-dir", str(tmp_path)])) == 0
    assert time.perf_counter() - start < 20
    printed = capsys.readouterr().out
    hw = load_hardware(str(out))
    assert printed == format_hardware(hw) + f"\nsaved to {out}\n"  # what was printed is what was saved
    for name, value in hw.to_dict().items():
        if name in ("gpu_link_bw", "gpu_link_latency_s"):  # one device: no GPU link to measure (0 = unknown)
            assert value == 0, name
        elif name in ("h2d_contended_bw", "layer_sync_s"):  # beside a GPU only (0 = no contention, no sync)
            assert value == 0, name
        elif isinstance(value, float):
            assert value > 0, name
    assert "disk" in hw.notes and "no CUDA" in hw.notes  # CI has no GPU: says what the numbers are
    # ... and the "GPU" is this CPU: one RAM, one memcpy rate for every host<->device copy, the CPU's rates
    assert hw.gpu_mem == hw.cpu_mem <= psutil.virtual_memory().total
    assert hw.h2d_pinned_bw == hw.d2h_pinned_bw == hw.h2d_pageable_bw == hw.d2h_pageable_bw
    assert hw.gpu_mem_bw == hw.cpu_mem_bw and hw.gpu_flops_fp32 == hw.cpu_flops
    assert hw.disk <= shutil.disk_usage(tmp_path).total  # the free space of the --disk-dir
    assert hw.h2d_pinned_bw > 1e8 and hw.cpu_mem_bw > 1e8 and hw.cpu_flops > 1e8 and hw.disk_read_bw > 1e6
    assert hw.layer_overhead_s < 0.1
    # the executor's fitted constants (sync, CPU-attention overlap) are copied next to a GPU only: on a CPU
    # there are no copies for anything to overlap or wait on
    assert (hw.layer_sync_s, hw.cpu_attention_overlap) == (0.0, 1.0)
    from flexserve.planner.calibrate import executor_constants

    assert executor_constants("cpu") == {}
    assert executor_constants("cuda") == {"layer_sync_s": profile("h100").layer_sync_s,
                                          "cpu_attention_overlap": profile("h100").cpu_attention_overlap}
    assert 0 < executor_constants("cuda")["cpu_attention_overlap"] < 1
    assert not list(tmp_path.glob("flexserve-calibrate-*"))  # temp file removed
