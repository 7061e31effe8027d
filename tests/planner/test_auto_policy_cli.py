"""`--policy auto` on the command line: the chosen policy and its prediction on one stderr line before the run,
the run itself on a CPU, and `flexserve plan` reading the saved profile instead of calibrating every call."""
import dataclasses
import json
import os

import pytest

from flexserve.planner import default_profile_path, load_hardware, profile, save_hardware


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def saved_t4(cache):
    save_hardware(dataclasses.replace(profile("t4"), name="fixed-rates"))


def _auto_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("policy auto: ")]


def test_generate_auto_prints_the_policy_then_generates(cli, saved_t4):
    rc, out, err = cli("generate", "--model", "dummy:opt-125m", "--device", "cpu", "--policy", "auto",
                       "--max-tokens", "2", "--raw", "--gpu-mem", "6GB", "--cpu-mem", "6GB", "hi")
    assert rc == 0, err
    (line,) = _auto_lines(err)
    assert "--percent " in line and "--gpu-batch-size " in line and "--num-gpu-batches " in line
    assert "predicted " in line and "tok/s total" in line and "'fixed-rates'" in line
    assert out.strip()  # a completion came back


def test_bench_throughput_auto_prints_the_policy_it_runs(cli, saved_t4, monkeypatch):
    import flexserve.benchmarks.throughput as bench

    ran = []
    monkeypatch.setattr(bench, "run_throughput", lambda settings, policy: ran.append(policy) or 0)
    rc, out, err = cli("bench", "throughput", "--model", "dummy:opt-125m", "--device", "cpu", "--policy", "auto",
                       "--prompt-len", "8", "--gen-len", "2", "--gpu-mem", "6GB", "--cpu-mem", "6GB")
    assert rc == 0, err
    (line,) = _auto_lines(err)
    (policy,) = ran
    assert f"policy auto: {policy.percent_flags()} (block {policy.block_size} sequences, prompt 8 + 2 tokens)" \
        in line


def test_plan_calibrates_once_then_reads_the_saved_profile(cli, cache, monkeypatch):
    import flexserve.planner.calibrate as cal

    calls = []

    def fake(quick=False, progress=True, device=None, disk_dir=None):
        calls.append(quick)
        return dataclasses.replace(profile("t4"), name=f"measured-{len(calls)}")

    monkeypatch.setattr(cal, "calibrate", fake)
    argv = ("plan", "--model", "opt-125m", "--gpu-mem", "4GB", "--cpu-mem", "8GB", "--json")
    rc, out, err = cli(*argv)
    assert rc == 0 and calls == [True]
    assert len(err.strip().splitlines()) == 1 and "calibrating this machine once" in err
    assert os.path.isfile(default_profile_path()) and load_hardware().name == "measured-1"
    assert json.loads(out)["hardware"] == "measured-1"
    rc, out, err = cli(*argv)
    assert rc == 0 and calls == [True] and "calibrating" not in err  # read, not measured again
    assert json.loads(out)["hardware"] == "measured-1"
    rc, out, err = cli(*argv, "--recalibrate")
    assert rc == 0 and len(calls) == 2 and json.loads(out)["hardware"] == "measured-2"
    assert load_hardware().name == "measured-2"


def test_plan_states_the_spread_and_what_it_was_measured_on(cli, saved_t4, tmp_path, monkeypatch):
    from flexserve.planner.accuracy import RECORDED

    rc, out, err = cli("plan", "--model", "opt-125m", "--hardware", "t4")
    (line,) = [x for x in out.splitlines() if x.startswith("accuracy")]
    assert RECORDED["kind"] == "held-out"  # what plan quotes by default: runs the fit never saw
    assert f"held-out median error {100 * RECORDED['median_abs_error']:.1f}% over {RECORDED['num_runs']} runs" \
        in line
    fitted = tmp_path / "fitted.json"
    fitted.write_text(json.dumps({"kind": "fitted", "median_abs_error": 0.043, "num_runs": 33}))
    monkeypatch.setenv("FLEXSERVE_PLANNER_ACCURACY", str(fitted))
    rc, out, err = cli("plan", "--model", "opt-125m", "--hardware", "t4")
    (line,) = [x for x in out.splitlines() if x.startswith("accuracy")]
    assert "fitted-set median error 4.3% over 33 runs" in line and "no held-out error recorded yet" in line
    record = tmp_path / "held_out.json"
    record.write_text(json.dumps({"kind": "held-out", "median_abs_error": 0.12, "worst_abs_error": 0.3,
                                  "num_runs": 11}))
    monkeypatch.setenv("FLEXSERVE_PLANNER_ACCURACY", str(record))
    rc, out, err = cli("plan", "--model", "opt-125m", "--hardware", "t4", "--json")
    assert json.loads(out)["accuracy"]["line"] == \
        "expected within ±12% (held-out median error 12.0% over 11 runs, worst 30%)"
