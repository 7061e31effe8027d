"""`flexserve bench serve`: the simulator mode and an in-process launch on a tiny model."""
import json

import pytest

from flexserve.cli import main


def _results(out: str) -> list[dict]:
    return [json.loads(line[len("SERVE_RESULT "):]) for line in out.splitlines() if line.startswith("SERVE_RESULT ")]


def _trace(argv: list[str], max_context: int):
    """The requests a `bench serve` command line asks for (its trace flags, generated again here)."""
    import argparse

    from flexserve.benchmarks.serve import load_trace
    from flexserve.cli.bench import add_serve_bench_arguments, trace_settings

    p = argparse.ArgumentParser()
    add_serve_bench_arguments(p)
    args, _ = p.parse_known_args(["--simulate", *(a for a in argv if a not in ("--simulate", "--launch"))])
    return load_trace(trace_settings(args), max_context)


def _check_run(row: dict, records: list, trace) -> None:
    """A run's summary is its records', and its records are the trace's requests, each with every output token
    it asked for: throughput is those tokens (and requests) over the reported makespan, the means are the
    records' means, every request's first token comes before its last and within the makespan."""
    assert len(records) == row["finished"] == len(trace) and row["failed"] == 0
    for rec in records:  # record i is request i of the trace (sorted by arrival)
        req = trace[int(rec.request_id)]
        assert (rec.prompt_len, rec.output_len) == (req.prompt_len, req.output_len), rec
        assert 0 < rec.ttft_s <= rec.jct_s <= row["makespan_s"] + 1e-9 and 0 <= rec.queueing_s <= rec.jct_s
    assert sorted(int(r.request_id) for r in records) == list(range(len(trace)))
    tokens = sum(r.output_len for r in trace)
    assert row["throughput_tok_s"] == pytest.approx(tokens / row["makespan_s"], rel=1e-9)
    assert row["throughput_req_s"] == pytest.approx(len(trace) / row["makespan_s"], rel=1e-9)
    assert row["ttft_mean_s"] == pytest.approx(sum(r.ttft_s for r in records) / len(records), rel=1e-9)
    assert row["jct_mean_s"] == pytest.approx(sum(r.jct_s for r in records) / len(records), rel=1e-9)
    assert row["queueing_frac"] == pytest.approx(sum(r.queueing_s for r in records) /
                                                 sum(r.jct_s for r in records), rel=1e-9, abs=1e-12)
    assert row["ttft_p50_s"] <= row["ttft_p99_s"] and row["jct_p50_s"] <= row["jct_p99_s"]


def test_bench_serve_simulate(capsys, tmp_path):
    from flexserve.benchmarks.serve import SIM_MAX_CONTEXT, read_records

    plot, records = tmp_path / "cdf.png", tmp_path / "runs.csv"
    argv = ["--simulate", "--trace", "gamma", "--rate", "20", "--num-requests", "200"]
    assert main(["bench", "serve", *argv, "--max-num-seqs", "8", "--schedulers", "fcfs,skip-join-mlfq", "--json",
                 "--plot", str(plot), "--records", str(records)]) == 0
    out = capsys.readouterr().out
    rows = _results(out)
    assert [r["scheduler"] for r in rows] == ["fcfs", "skip-join-mlfq"]
    trace = sorted(_trace(argv, SIM_MAX_CONTEXT), key=lambda r: r.arrival_s)
    runs = read_records([str(records)])
    for r, run in zip(rows, runs, strict=True):
        assert r["mode"] == "simulate" and run["row"]["scheduler"] == r["scheduler"]
        _check_run(r, run["records"], trace)
        # simulated time is exact: the run ends when its last request finishes, timed from the first arrival
        ends = [rec.arrival_s + rec.jct_s for rec in run["records"]]
        assert r["makespan_s"] == pytest.approx(max(ends) - trace[0].arrival_s, rel=1e-9)
    assert rows[0]["jct_mean_s"] != rows[1]["jct_mean_s"]  # the two policies did schedule differently
    assert "jct_p99_s" in out.splitlines()[0] and plot.stat().st_size > 10_000


def test_records_round_trip_and_plot_runs_made_apart(capsys, tmp_path):
    import gzip

    from flexserve.benchmarks.serve import read_records

    a, b, plot = tmp_path / "a.csv", tmp_path / "b.csv.gz", tmp_path / "cdf.png"
    common = ["bench", "serve", "--simulate", "--trace", "gamma", "--rate", "10", "--num-requests", "60", "--json"]
    assert main([*common, "--schedulers", "fcfs,srpt", "--records", str(a)]) == 0
    assert main([*common, "--schedulers", "skip-join-mlfq", "--num-levels", "8", "--records", str(tmp_path / "b.csv")]) == 0
    rows = _results(capsys.readouterr().out)
    b.write_bytes(gzip.compress((tmp_path / "b.csv").read_bytes()))
    runs = read_records([str(a), f"{b}=skip-join, 8 levels"])
    assert [r["row"]["scheduler"] for r in runs] == ["fcfs", "srpt", "skip-join, 8 levels"]
    for run, row in zip(runs, rows):  # the records give back the summary the run printed
        assert len(run["records"]) == row["finished"] == 60
        jct = sorted(r.jct_s for r in run["records"])
        assert abs(sum(jct) / len(jct) - row["jct_mean_s"]) < 1e-9
    labelled = read_records([f"{a}=run A"])  # a label on a file of several runs keeps them apart
    assert [r["row"]["scheduler"] for r in labelled] == ["run A: fcfs", "run A: srpt"]
    assert main(["bench", "serve", "--plot-records", f"{a},{b}=sj8", "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 10_000
    capsys.readouterr()
    assert main(["bench", "serve", "--plot-records", str(tmp_path / "missing.csv"), "--plot", str(plot)]) == 1
    assert "missing.csv: not a --records file" in capsys.readouterr().err


def test_bench_serve_csv_trace(capsys, tmp_path):
    csv = tmp_path / "trace.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" +
                   "".join(f"{i * 0.05:.2f},{100 + 37 * i},{5 + (i * 13) % 90}\n" for i in range(40)))
    assert main(["bench", "serve", "--simulate", "--trace", str(csv), "--rate", "10", "--num-requests", "30",
                 "--schedulers", "mlfq", "--json"]) == 0
    (row,) = _results(capsys.readouterr().out)
    assert row["scheduler"] == "mlfq" and row["finished"] == 30 and row["trace"] == str(csv)


def test_bench_serve_launch_tiny_model(capsys, tmp_path, tiny_model):
    import time

    from flexserve.benchmarks.serve import read_records

    folder, _ = tiny_model("llama-gqa")
    plot, records = tmp_path / "cdf.png", tmp_path / "runs.csv"
    argv = ["--launch", "--trace", "poisson", "--rate", "50", "--num-requests", "8", "--max-context", "64",
            "--prompt-len", "16", "--output-len", "8"]
    t0 = time.perf_counter()
    assert main(["bench", "serve", *argv, "--model", folder, "--dtype", "float32", "--device", "cpu",
                 "--schedulers", "fcfs,skip-join-mlfq", "--num-gpu-blocks", "64", "--json", "--plot", str(plot),
                 "--records", str(records)]) == 0
    wall = time.perf_counter() - t0
    rows = _results(capsys.readouterr().out)
    assert [r["scheduler"] for r in rows] == ["fcfs", "skip-join-mlfq"]
    trace = _trace(argv, 64)  # clipped to --max-context (the model's window is 128)
    runs = read_records([str(records)])
    for r, run in zip(rows, runs, strict=True):
        assert r["mode"] == "http" and run["row"]["scheduler"] == r["scheduler"]
        _check_run(r, run["records"], trace)  # every request streamed all the tokens it asked for
        assert {"preemptions", "swaps", "recomputes"} <= set(r)
        assert all(r[c] >= 0 and r[c] == int(r[c]) for c in ("preemptions", "swaps", "recomputes"))
    assert sum(r["makespan_s"] for r in rows) < wall  # the two runs, one after the other, within this call
    assert [r["num_gpu_blocks"] for r in rows] == [64, 64]  # each engine had the pool it was given
    assert plot.stat().st_size > 10_000


def test_bench_serve_url_against_running_server(capsys, tiny_model):
    from flexserve.engine.serving import AsyncEngine, EngineConfig

    from .conftest import Served

    folder, _ = tiny_model("llama-gqa")
    server = Served(AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64)),
                    api_key="k")
    try:
        assert main(["bench", "serve", "--url", server.url, "--api-key", "k", "--trace", "gamma", "--cv", "2",
                     "--rate", "40", "--num-requests", "6", "--prompt-len", "10", "--output-len", "5",
                     "--json"]) == 0
    finally:
        server.stop()
    (row,) = _results(capsys.readouterr().out)
    assert row["scheduler"] == "server" and row["finished"] == 6 and row["failed"] == 0


def test_heavy_tailed_output_lengths_for_synthetic_traces():
    import argparse

    from flexserve.benchmarks.serve import load_trace
    from flexserve.cli.bench import add_serve_bench_arguments, trace_settings

    p = argparse.ArgumentParser()
    add_serve_bench_arguments(p)
    base = ["--simulate", "--trace", "gamma", "--rate", "10", "--num-requests", "4000", "--output-len", "16"]
    light = [r.output_len for r in load_trace(trace_settings(p.parse_args(base)), None)]
    heavy = [r.output_len for r in load_trace(trace_settings(p.parse_args(base + ["--output-dist", "pareto"])), None)]
    clipped = [r.output_len for r in load_trace(trace_settings(p.parse_args(base + ["--output-dist", "pareto",
                                                                                    "--max-output-len", "300"])),
                                                None)]
    assert min(heavy) >= 16 and max(heavy) <= 2048 and max(clipped) == 300
    # Pareto(1.2) above a 16-token minimum: the longest jobs are ~100x the median, log-normal's only ~15x
    assert max(heavy) / sorted(heavy)[2000] > 50 > max(light) / sorted(light)[2000]
