"""A bounded load at twice saturation with client disconnects and cancellations against `flexserve serve`
(the default small model, started by bench/load_test.py on 127.0.0.1 and a free port, stopped at the end)."""
from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

LOAD_TEST = Path(__file__).resolve().parents[2] / "bench" / "load_test.py"


def _load_test_module():
    spec = importlib.util.spec_from_file_location("bench_load_test", LOAD_TEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_twice_saturation_with_disconnects_keeps_tokens_and_frees_every_block():
    lt = _load_test_module()
    args = lt.parse_args(["--duration", "6", "--saturation-requests", "8", "--max-tokens", "16",
                          "--disconnect", "0.3", "--cancel", "0.15", "--quiet", "--seed", "1"])
    proc, url = lt.start_server(args)
    try:
        res = asyncio.run(lt.run(args, url, proc.pid))
        assert proc.poll() is None, "the server died under load"
    finally:
        lt.stop_server(proc)
    assert res["offered_req_s"] > res["saturation_req_s"] > 0
    assert res["completed"] > 0 and res["disconnected"] + res["cancelled"] > 0, res
    assert res["errors"] == 0, res["error_examples"]
    assert res["token_mismatches"] == 0, res["mismatch_examples"]
    assert res["duplicated_tokens"] == 0 and res["lost_tokens"] == 0 and res["length_count_wrong"] == 0
    assert res["kv_blocks_used_after"] == 0 and res["requests_in_engine_after"] == 0, res
    assert res["healthy_after"] and res["same_answer_after"]
    assert lt.passed(res)


def test_load_test_prints_one_result_line(tmp_path):
    """The script's own report: one LOAD_RESULT line and exit 0 when the invariants hold."""
    out = subprocess.run([sys.executable, str(LOAD_TEST), "--duration", "2", "--saturation-requests", "4",
                          "--max-tokens", "8", "--num-prompts", "2", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("LOAD_RESULT ")]
    assert out.returncode == 0 and len(lines) == 1, out.stdout + out.stderr[-2000:]
