"""bench/run.py and its registry (bench/entries.py): every entry is complete and names commands, scripts and
files that exist; packing keeps device calls within their budget; `run` refuses what the machine cannot do and
really runs a CPU entry, with its log and result records."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
bench_run = sys.modules["bench_run"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)
from entries import BY_NAME, ENTRIES, MACHINES, Cmd, Entry  # noqa: E402  (bench/ is on sys.path now)

KNOWN_PEER_SCRIPTS = {"run_flexgen.py"}  # other projects' scripts, read from FLEXSERVE_PEERS_DIR
FLEXGEN_SCRIPTS = ("run_flexgen.py", "peer_flexgen_dist.py")


def words(cmd: Cmd, out: str = "/tmp/out") -> list[str]:
    return shlex.split(cmd.line.replace("{out}", out))


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


# --- the registry --------------------------------------------------------------------------------------------------
def test_every_entry_has_the_required_fields():
    assert len(BY_NAME) == len(ENTRIES), "entry names must be unique"
    for e in ENTRIES:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", e.name), e.name
        assert e.question and "\n" not in e.question, e.name
        assert e.machine in MACHINES, e.name
        assert 0 < e.seconds < 600, e.name
        assert e.commands(), e.name
        for step in e.steps:
            if isinstance(step, tuple):  # commands at the same time: one GPU each, all on the machine
                gpus = [c.gpu for c in step]
                assert None not in gpus and len(set(gpus)) == len(gpus), e.name
                assert max(gpus) < MACHINES[e.machine], e.name
            else:
                assert isinstance(step, Cmd), e.name
        assert all(c.timeout_s > 0 for c in e.commands()), e.name
        if e.host_gib or e.fallback:
            assert e.host_gib and BY_NAME[e.fallback].machine == e.machine, e.name


def test_every_flexserve_command_parses_with_the_cli():
    from flexserve.cli import build_parser

    parser = build_parser()
    checked = 0
    for e in ENTRIES:
        for c in e.commands():
            argv, env = bench_run.expand(c, Path("/tmp/out"))
            if argv[1:3] != ["-m", "flexserve.cli"]:
                continue
            try:
                args = parser.parse_args(argv[3:])
            except SystemExit:
                pytest.fail(f"{e.name}: flexserve rejects {c.line!r}")
            assert (argv[3] == "bench" and argv[4] in ("throughput", "serve")) or argv[3] in ("plan", "calibrate"), \
                c.line
            assert args is not None
            checked += 1
    assert checked > 30


def test_every_script_file_and_flag_named_exists():
    for e in ENTRIES:
        for c in e.commands():
            argv, env = bench_run.expand(c, Path("/tmp/out"))
            assert set(env) <= {"FLEXSERVE_PAGED_ATTENTION", "TRITON_CACHE_DIR"}, c.line
            for w in words(c):
                if w.startswith("{peers}/"):
                    assert w.split("/", 1)[1] in KNOWN_PEER_SCRIPTS, c.line
                elif re.fullmatch(r"(bench|tests)/[\w./-]+\.(py|csv)", w):
                    assert (REPO / w).is_file(), f"{e.name}: {w} does not exist"
            scripts = [w for w in words(c) if re.fullmatch(r"bench/\w+\.py", w)]
            for script in scripts:  # a script with its own parser must define every flag the entry passes
                source = (REPO / script).read_text()
                if "add_argument(" in source:
                    for flag in (w for w in words(c) if w.startswith("--") and w != "--nproc-per-node"):
                        assert f'"{flag}"' in source, f"{e.name}: {script} has no {flag}"


def test_files_written_are_declared_and_declared_files_are_written():
    for e in ENTRIES:
        named = set()
        for c in e.commands():
            for w in words(c, "{out}"):
                for part in w.split(","):
                    if part.startswith("{out}/"):
                        named.add(part[len("{out}/"):].split("=")[0])
        assert named == set(e.writes), e.name


def test_entries_with_a_peer_name_it_and_its_wheels():
    for e in ENTRIES:
        lines = " ".join(c.line for c in e.commands())
        if any(s in lines for s in FLEXGEN_SCRIPTS):
            assert "flexgen==0.1.8" in e.wheels and "FlexGen" in e.peer, e.name
        if "peer_transformers_serving.py" in lines:
            assert "transformers" in e.peer, e.name


def test_results_cites_existing_entries_and_every_figure_entry():
    text = (REPO / "bench" / "RESULTS.md").read_text()
    cited = set()
    for names in re.findall(r"bench/run\.py run\s+((?:[a-z0-9.*-]+\s?)+)", text):
        for name in names.split():
            cited.update(e.name for e in bench_run.resolve([name]))  # raises on a name that does not exist
    assert len(cited) > 30
    cited |= set(re.findall(r"`([a-z0-9.-]+)`", text)) & set(BY_NAME)  # named in the table of old scripts
    assert set(BY_NAME) - cited == {"cpu-smoke-throughput"}


def test_resolve_takes_names_and_patterns_and_rejects_unknown_ones():
    got = bench_run.resolve(["planner-validation-*", "planner-tally", "planner-validation-a"])
    assert [e.name for e in got] == ["planner-validation-a", "planner-validation-b", "planner-validation-c",
                                     "planner-tally"]
    with pytest.raises(bench_run.BenchError, match="unknown entry"):
        bench_run.resolve(["no-such-entry"])


def test_the_fallback_runs_where_host_memory_is_short():
    big = BY_NAME["weights-cpu-llama3-70b"]
    assert bench_run.choose(big, 100.0) is BY_NAME[big.fallback]
    assert bench_run.choose(big, 300.0) is big
    assert bench_run.choose(big, None) is big
    assert bench_run.choose(BY_NAME["cpu-smoke-throughput"], 1.0) is BY_NAME["cpu-smoke-throughput"]


# --- packing -------------------------------------------------------------------------------------------------------
def test_pack_keeps_every_call_within_the_budget():
    for budget in (300, 540, 1200):
        calls = bench_run.pack(ENTRIES, budget, setup_s=30)
        packed = [e.name for c in calls for e in c.entries]
        assert sorted(packed) == sorted(BY_NAME)  # each entry once
        for c in calls:
            assert {e.machine for e in c.entries} == {c.machine}
            assert c.seconds == 30 + sum(e.seconds for e in c.entries)
            assert c.seconds <= budget or len(c.entries) == 1


def test_pack_fills_calls_first_fit_and_keeps_the_given_order():
    def entry(name, seconds, machine="1 GPU"):
        return Entry(name, "q", machine, seconds, (Cmd("python -c pass"),))

    given = [entry("a", 100), entry("b", 300), entry("c", 200), entry("d", 200), entry("e", 50, "cpu")]
    calls = bench_run.pack(given, 540, setup_s=30)
    # longest first: b and c fill one call (30 + 300 + 200), d and a the next; calls in the order given
    assert [[e.name for e in c.entries] for c in calls] == [["a", "d"], ["b", "c"], ["e"]]
    assert [c.seconds for c in calls] == [330, 530, 80]


def test_pack_prints_one_command_per_call_and_reports_an_entry_over_budget():
    names = ["scheduler-kv-limited", "tp-llama70b", "pipeline-opt175b", "planner-tally"]
    done = run_cli("pack", "--budget-s", "400", *names)
    assert done.returncode == 0, done.stderr
    runs = [ln.split("run ", 1)[1].replace(" --out $OUT", "").split()
            for ln in done.stdout.splitlines() if "bench/run.py run" in ln]
    assert sorted(n for r in runs for n in r) == sorted(names)
    assert ["scheduler-kv-limited"] in runs  # 500 s: alone, and reported
    assert re.search(r"over budget: scheduler-kv-limited alone needs ~530 s", done.stdout)
    assert ["tp-llama70b"] in runs and ["pipeline-opt175b"] in runs  # 180 + 320 + setup > 400
    assert "over budget: tp-llama70b" not in done.stdout


# --- running -------------------------------------------------------------------------------------------------------
def test_run_refuses_a_gpu_entry_on_a_machine_without_one(tmp_path):
    done = run_cli("run", "cpu-smoke-throughput", "tp-llama70b", "--out", str(tmp_path / "out"),
                   env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert "tp-llama70b needs 2 GPUs (this machine has 0)" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "out").exists()  # nothing ran, not even the CPU entry


def test_run_refuses_an_entry_whose_peer_script_is_missing(tmp_path, monkeypatch):
    entry = BY_NAME["offload-vs-flexgen-opt30b-cpu-attention"]
    monkeypatch.setenv("FLEXSERVE_PEERS_DIR", str(tmp_path))
    assert bench_run.peer_scripts(entry) == [tmp_path / "run_flexgen.py"]
    with pytest.raises(bench_run.BenchError, match=r"needs the peer script .*run_flexgen\.py"):
        bench_run.check_machine([entry], gpus=1)
    (tmp_path / "run_flexgen.py").write_text("")
    bench_run.check_machine([entry], gpus=1)  # there now: accepted


def test_run_of_a_cpu_entry_writes_its_log_and_result_records(tmp_path):
    out = tmp_path / "out"
    done = run_cli("run", "cpu-smoke-throughput", "--out", str(out),
                   env={"FLEXSERVE_WHEELS_DIR": str(tmp_path / "no-wheels"), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "cpu-smoke-throughput.log").read_text()
    assert log.startswith("# cpu-smoke-throughput: ")
    assert "=== flexserve bench throughput --model dummy:opt-125m" in log
    assert re.search(r"^--- \d+ s, exit 0$", log, re.M)
    assert not re.search(r"\d+/\d+ \[|/s\]", log), "progress bars belong out of the log"
    result = json.loads(re.search(r"^FLEXSERVE_RESULT (\{.*\})$", log, re.M).group(1))
    assert result["model"] == "dummy:opt-125m" and result["device"] == "cpu" and result["dtype"] == "float32"
    # the run is the one the entry asks for: its policy, block, lengths and link rate
    argv = words(BY_NAME["cpu-smoke-throughput"].steps[0])

    def flag(name: str, n: int = 1) -> list[str]:
        return argv[argv.index(name) + 1:argv.index(name) + 1 + n]
    policy = " ".join(["--percent", *flag("--percent", 6), "--gpu-batch-size", *flag("--gpu-batch-size"),
                       "--num-gpu-batches", *flag("--num-gpu-batches")])
    assert result["policy"] == policy
    block = int(flag("--gpu-batch-size")[0]) * int(flag("--num-gpu-batches")[0])
    p, g = int(flag("--prompt-len")[0]), int(flag("--gen-len")[0])
    assert (result["block"], result["prompt_len"], result["gen_len"]) == (block, p, g) == (2, 16, 4)
    assert result["h2d_gbps"] == float(flag("--h2d-gbps")[0])
    # all weights resident: nothing crosses the link, so there is no transfer bound to compare with
    assert result["offloaded_cpu_bytes"] == result["offloaded_disk_bytes"] == result["bound_step_s"] == 0
    assert result["bound_decode_tok_s"] is None and result["fraction_of_bound"] is None
    # each rate is the block's tokens over its phase's time, one pair of times for all three, within the run
    prefill_s, decode_s = block * p / result["prefill_tok_s"], block * (g - 1) / result["decode_tok_s"]
    assert result["total_tok_s"] == pytest.approx(block * g / (prefill_s + decode_s), rel=1e-9)
    seconds = int(re.search(r"^--- (\d+) s, exit 0$", log, re.M).group(1))
    assert 0 < result["load_s"] + prefill_s + decode_s < seconds + 0.51  # the log rounds to the second
    records = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["entry"] == "cpu-smoke-throughput" and records[0]["rc"] == 0
    assert records[0]["results"][0]["FLEXSERVE_RESULT"]["decode_tok_s"] == result["decode_tok_s"]
    assert "GPUs visible: 0" in (out / "machine.txt").read_text()
    assert "decode_tok_s" in done.stdout  # the result line is echoed for the device call's output


def test_a_command_past_its_timeout_is_stopped_and_recorded(tmp_path):
    machine = bench_run.Machine(env=dict(os.environ), gpus=0, mem_available_gib=None)
    t0 = time.monotonic()
    sleeper = Cmd("python -c 'import time; print(\"started\", flush=True); time.sleep(60)'", timeout_s=2)
    [rec] = bench_run.run_step((sleeper,), tmp_path, machine, "sleeper")
    assert rec["rc"] == 124 and rec["timed_out"] and rec["output"][0] == "started"
    assert time.monotonic() - t0 < 20
    assert not list(tmp_path.glob(".sleeper.*"))  # the raw output is folded into the record


def test_commands_of_one_step_run_at_the_same_time_each_on_its_gpu(tmp_path):
    machine = bench_run.Machine(env=dict(os.environ), gpus=2, mem_available_gib=None)
    probe = "python -c 'import os, time; time.sleep(2); print(\"on\", os.environ[\"CUDA_VISIBLE_DEVICES\"])'"
    t0 = time.monotonic()
    recs = bench_run.run_step((Cmd(probe, 30, gpu=0), Cmd(probe, 30, gpu=1)), tmp_path, machine, "pair")
    assert time.monotonic() - t0 < 3.8  # not 4 s one after the other
    assert [r["output"][0] for r in recs] == ["on 0", "on 1"] and [r["rc"] for r in recs] == [0, 0]


def test_clean_output_drops_progress_bars_and_keeps_results():
    raw = (b"placing weights:   8%|#   | 1/12 [00:00<00:01,  9.94layer/s]\rplacing weights: 100%|#| 12/12 "
           b"[00:01<00:00,  9.68layer/s]\r        \r\ndecode_tok_s: 28.24\nFLEXSERVE_RESULT {\"decode_tok_s\": 28.2}\n")
    lines = bench_run.clean_output(raw)
    assert [ln for ln in lines if ln] == ["decode_tok_s: 28.24", 'FLEXSERVE_RESULT {"decode_tok_s": 28.2}']
    assert bench_run.result_lines(lines) == [{"FLEXSERVE_RESULT": {"decode_tok_s": 28.2}}]
