import math
from pathlib import Path

import numpy as np
import pytest

from flexserve.scheduler.traces import (
    AZURE_CONV_CSV, LengthDist, TraceRequest, clip_to_context, default_trace_dir, gamma_trace, load_azure_conv,
    load_csv_trace, mean_rate, poisson_trace, scale_to_rate)

AZURE = default_trace_dir() / AZURE_CONV_CSV
def needs_azure(test):  # the trace ships in bench/traces: a missing file fails the test, never skips it
    return test


@needs_azure
def test_azure_trace_first_rows():
    trace = load_azure_conv(max_requests=4)
    # 2023-11-16 18:15:46.6805900,374,44 / 18:15:50.9951690,396,109 / 18:15:51.2224670,879,55 / ...,91,16
    assert [(r.prompt_len, r.output_len) for r in trace] == [(374, 44), (396, 109), (879, 55), (91, 16)]
    assert trace[0].arrival_s == 0.0
    assert trace[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert trace[3].arrival_s == pytest.approx(4.710427, abs=1e-6)


@needs_azure
def test_azure_trace_time_scaling_reaches_the_target_rate_and_keeps_order():
    raw = load_azure_conv(max_requests=2000)
    fast = load_azure_conv(max_requests=2000, target_rate=20.0)
    assert mean_rate(fast) == pytest.approx(20.0)
    assert [r.prompt_len for r in fast] == [r.prompt_len for r in raw]
    factor = fast[-1].arrival_s / raw[-1].arrival_s
    assert all(f.arrival_s == pytest.approx(r.arrival_s * factor) for f, r in zip(fast, raw))
    half = load_azure_conv(max_requests=10, time_scale=0.5)
    assert half[-1].arrival_s == pytest.approx(raw[9].arrival_s / 2)


@needs_azure
def test_azure_trace_clipped_to_a_context_window_keeps_recorded_outputs():
    trace = load_azure_conv(max_requests=3000, max_context=2048)
    raw = load_azure_conv(max_requests=3000)
    assert all(r.prompt_len + r.output_len <= 2048 for r in trace)
    assert [r.output_len for r in trace] == [r.output_len for r in raw]  # all outputs <= 1000 fit


def test_clip_shortens_outputs_only_when_they_alone_overflow():
    clipped = clip_to_context([TraceRequest(0.0, 100, 10), TraceRequest(1.0, 5, 50)], max_context=32)
    assert clipped == [TraceRequest(0.0, 22, 10), TraceRequest(1.0, 1, 31)]


def test_any_csv_with_the_same_columns(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,7,3\n10.0,5,2\n12.0,9,0\n")
    trace = load_csv_trace(path)
    assert trace == [TraceRequest(0.0, 5, 2), TraceRequest(0.5, 7, 3), TraceRequest(2.0, 9, 1)]
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt\n1,2\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_csv_trace(bad)


def test_synthetic_traces_are_seeded_and_reach_their_rate():
    a = poisson_trace(4000, 10.0, seed=7)
    assert a == poisson_trace(4000, 10.0, seed=7) and a != poisson_trace(4000, 10.0, seed=8)
    assert mean_rate(a) == pytest.approx(10.0, rel=0.05)
    gaps = np.diff([r.arrival_s for r in gamma_trace(4000, 10.0, cv=3.0, seed=1)])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)
    outs = np.array([r.output_len for r in a])
    assert outs.min() >= 1 and outs.max() <= 1000
    assert np.median(outs) == pytest.approx(129, rel=0.1)  # Azure-like default


def test_length_distributions():
    rng = np.random.default_rng(0)
    pareto = LengthDist("pareto", median=16, alpha=1.2, max_len=2048).sample(rng, 10_000)
    assert pareto.min() >= 16 and pareto.max() <= 2048 and pareto.mean() > 3 * np.median(pareto) / 2
    assert set(LengthDist("uniform", low=3, high=5, max_len=10).sample(rng, 100)) == {3, 4, 5}
    assert set(LengthDist("constant", median=7).sample(rng, 5)) == {7}
    with pytest.raises(ValueError):
        LengthDist("zipf")


def test_scale_to_rate_of_a_single_request_is_a_no_op():
    one = [TraceRequest(0.0, 1, 1)]
    assert scale_to_rate(one, 5.0) == one and math.isinf(mean_rate(one))
