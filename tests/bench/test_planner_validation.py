"""bench/planner_validation.py's fit / held-out split: constants fitted on one set of runs, the error of the
fitted profile reported on another, and the record `flexserve plan` quotes."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("planner_validation", REPO / "bench" / "planner_validation.py")
pv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pv)

from flexserve.planner import profile  # noqa: E402
from flexserve.planner.accuracy import accuracy, spread_line  # noqa: E402

H100 = profile("h100")


def test_the_held_out_cases_share_no_model_with_any_fit():
    fit_models = {r["model"] for r in pv.tally_rows()} | {c[0] for c in pv.GPU_CASES}
    held = pv.HELD_OUT_CASES
    assert not fit_models & {c[0] for c in held}
    assert len(held) >= 10 and len({c[0] for c in held}) >= 3
    assert any("--cpu-cache-compute" in c[4] for c in held) and any("--cpu-cache-compute" not in c[4] for c in held)
    assert any(f in c[4] for c in held for f in ("--compress-weight", "--compress-cache"))
    assert len({(c[5], c[6]) for c in held}) >= 3  # several prompt / generation lengths


def test_fit_recovers_constants_from_runs_and_reports_the_fitted_error():
    truth = dataclasses.replace(H100, cpu_attention_overlap=0.5, layer_overhead_s=H100.layer_overhead_s * 1.5)
    # the recorded CPU-attention runs, where the weight stream and CPU attention meet (the overlap matters)
    rows = [dict(r, measured=1.0) for r in pv.tally_rows() if r["options"].get("cpu_cache_compute")]
    for row in rows:
        row["measured"] = pv.row_error(row, truth) + 1.0  # the prediction of `truth` itself (error 0 under it)
    assert pv.median_abs([pv.row_error(r, H100) for r in rows]) > 0.01  # the stock profile is off on them
    fitted, err = pv.fit_profile(H100, rows, grid={"layer_overhead_s": (1.0, 1.5, 2.0),
                                                   "cpu_attention_overlap": (0.5, 0.9)})
    assert err < 1e-6
    assert fitted.cpu_attention_overlap == 0.5
    assert fitted.layer_overhead_s == pytest.approx(truth.layer_overhead_s)


def test_held_out_records_merge_into_what_plan_quotes(tmp_path):
    rows = [dict(model=m, error=e) for m, e in (("a", 0.1), ("b", -0.3), ("c", 0.05), ("a", 0.2))]
    for part, chunk in (("x", rows[:2]), ("y", rows[2:])):
        (tmp_path / f"{part}.json").write_text(json.dumps(pv.error_record(chunk, "held-out", "test")))
    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "planner_validation.py"), "--merge",
                           str(tmp_path / "x.json"), str(tmp_path / "y.json"), "--accuracy", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    record = accuracy(str(out))
    assert record["kind"] == "held-out" and record["num_runs"] == 4 and record["num_models"] == 3
    assert record["median_abs_error"] == pytest.approx(0.2) and record["worst_abs_error"] == pytest.approx(0.3)
    assert spread_line(record) == "expected within ±20% (held-out median error 20.0% over 4 runs, worst 30%)"


def test_a_later_run_of_a_case_replaces_the_earlier_and_repredict_uses_todays_model(tmp_path):
    case = dict(model="llama-2-7b", percent=[0, 100, 100, 0, 100, 0], bs=32, nb=4, options={}, prompt_len=256,
                gen_len=16, dtype="float16")
    first = dict(case, measured=100.0, predicted=150.0, error=0.5)
    again = dict(case, measured=400.0, predicted=150.0, error=-0.625)
    other = dict(case, model="mistral-7b", measured=300.0, predicted=330.0, error=0.1)
    failed = dict(other, measured=None, predicted=330.0, error=None, failure="timed out")  # does not replace
    for name, rows in (("a", [first, other]), ("b", [again, failed])):
        (tmp_path / f"{name}.json").write_text(json.dumps(pv.error_record(rows, "held-out", "test")))
    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "planner_validation.py"), "--merge",
                           str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--repredict", "--hardware", "h100",
                           "--accuracy", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and sorted(r["measured"] for r in rows) == [300.0, 400.0]  # the re-measure won
    for r in rows:  # predicted again under h100 with the cost model as it is now
        assert r["error"] == pytest.approx(pv.row_error(r, H100))
        assert r["predicted"] == pytest.approx((1 + r["error"]) * r["measured"])
        assert r["predicted_total"] == pytest.approx(pv.row_estimate(r, H100).total_tok_s)
    alone = subprocess.run([sys.executable, str(REPO / "bench" / "planner_validation.py"), "--repredict"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert alone.returncode != 0 and "--repredict goes with --merge" in alone.stderr
