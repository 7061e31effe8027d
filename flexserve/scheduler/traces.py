"""Request traces for the simulator and for `bench serve`: the Azure LLM inference 2023 conversation trace
(or any CSV with its columns) and synthetic Poisson / Gamma arrivals.

A trace is sizes and times only: `TraceRequest(arrival_s, prompt_len, output_len)`, arrivals relative to the
first request. Every request generates exactly `output_len` tokens (EOS ignored), as the trace recorded.

Synthetic length defaults imitate the Azure conversation trace (bench/traces/README.md: prompt mean 1,155,
median 1,020; output mean 211, median 129, max 1,000): log-normal prompts with median 1,020 and sigma 0.5,
log-normal outputs with median 129 and sigma 0.99 (sigma = sqrt(2 ln(mean / median)) matches the recorded
mean), clipped to [1, 1000]. Pareto outputs are there for heavier tails.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

AZURE_CONV_CSV = "azure-llm-inference-2023-conv.csv"


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives (s, from the first arrival) and its sizes in tokens."""

    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: `lognormal` (median, sigma), `pareto` (scale = minimum, alpha),
    `uniform` (low, high inclusive) or `constant` (value = median); samples are clipped to [min_len, max_len]."""

    kind: str = "lognormal"
    median: float = 129.0
    sigma: float = 0.99
    alpha: float = 1.5
    low: int = 1
    high: int = 1000
    min_len: int = 1
    max_len: int = 1000

    def __post_init__(self) -> None:
        if self.kind not in ("lognormal", "pareto", "uniform", "constant"):
            raise ValueError(f"unknown length distribution {self.kind!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError("need 1 <= min_len <= max_len")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "lognormal":
            x = rng.lognormal(math.log(self.median), self.sigma, n)
        elif self.kind == "pareto":
            x = self.median * (1.0 + rng.pareto(self.alpha, n))  # classic Pareto with minimum `median`
        elif self.kind == "uniform":
            x = rng.integers(self.low, self.high + 1, n)
        else:
            x = np.full(n, self.median)
        return np.clip(np.rint(x), self.min_len, self.max_len).astype(np.int64)


AZURE_LIKE_PROMPT = LengthDist("lognormal", median=1020, sigma=0.5, max_len=14_050)
AZURE_LIKE_OUTPUT = LengthDist("lognormal", median=129, sigma=0.99, max_len=1000)


def default_trace_dir() -> Path:
    """`$FLEXSERVE_TRACE_DIR`, else the repository's `bench/traces` (the Azure trace ships there)."""
    env = os.environ.get("FLEXSERVE_TRACE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "bench" / "traces"


def _parse_timestamp(text: str) -> float:
    """Seconds since the epoch from `2023-11-16 18:15:46.6805900` (7 fractional digits: more than
    `datetime` parses) or from a plain number of seconds. Read as UTC so a DST change cannot warp gaps."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    whole, _, frac = text.partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


def load_csv_trace(path: str | os.PathLike, *, max_requests: int | None = None,
                   target_rate: float | None = None, time_scale: float = 1.0,
                   max_context: int | None = None) -> list[TraceRequest]:
    """Read a CSV with columns `TIMESTAMP, ContextTokens, GeneratedTokens` (the Azure LLM trace format).

    `max_requests` keeps the first N rows. Arrival times are shifted to start at 0, then either scaled to
    reach `target_rate` requests/s on average or multiplied by `time_scale`. `max_context` clips prompts so
    that prompt + output fits a model's context window; the output length stays as recorded (clipped to
    `max_context - 1` only if it alone does not fit).
    """
    rows: list[tuple[float, int, int]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: trace CSV lacks columns {sorted(missing)}")
        for row in reader:
            if max_requests is not None and len(rows) >= max_requests:
                break
            rows.append((_parse_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]),
                         int(row["GeneratedTokens"])))
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0] if rows else 0.0
    trace = [TraceRequest(t - t0, max(1, p), max(1, o)) for t, p, o in rows]
    if max_context is not None:
        trace = clip_to_context(trace, max_context)
    if target_rate is not None:
        return scale_to_rate(trace, target_rate)
    return [replace(r, arrival_s=r.arrival_s * time_scale) for r in trace] if time_scale != 1.0 else trace


def load_azure_conv(trace_dir: str | os.PathLike | None = None, **kwargs) -> list[TraceRequest]:
    """The Azure conversation trace from `default_trace_dir()`; keyword arguments as `load_csv_trace`."""
    return load_csv_trace(Path(trace_dir or default_trace_dir()) / AZURE_CONV_CSV, **kwargs)


def clip_to_context(trace: list[TraceRequest], max_context: int) -> list[TraceRequest]:
    """Shorten prompts (then outputs, if they alone overflow) so every request fits `max_context` tokens."""
    if max_context < 2:
        raise ValueError("max_context must leave room for a prompt token and an output token")
    out = []
    for r in trace:
        output_len = min(r.output_len, max_context - 1)
        out.append(replace(r, prompt_len=min(r.prompt_len, max_context - output_len), output_len=output_len))
    return out


def mean_rate(trace: list[TraceRequest]) -> float:
    """Average arrival rate in requests/s: (n - 1) gaps over the span."""
    span = trace[-1].arrival_s - trace[0].arrival_s if len(trace) > 1 else 0.0
    return (len(trace) - 1) / span if span > 0 else math.inf


def scale_to_rate(trace: list[TraceRequest], target_rate: float) -> list[TraceRequest]:
    """Compress or stretch time so the mean arrival rate becomes `target_rate`; the burst shape is kept."""
    if target_rate <= 0:
        raise ValueError(f"target_rate must be > 0, got {target_rate}")
    rate = mean_rate(trace)
    if not math.isfinite(rate):
        return list(trace)
    factor = rate / target_rate
    return [replace(r, arrival_s=r.arrival_s * factor) for r in trace]


def synthetic_trace(num_requests: int, rate: float, *, cv: float = 1.0,
                    prompt: LengthDist = AZURE_LIKE_PROMPT, output: LengthDist = AZURE_LIKE_OUTPUT,
                    seed: int = 0) -> list[TraceRequest]:
    """Arrivals with mean rate `rate` and inter-arrival coefficient of variation `cv` (1: Poisson; other
    values: Gamma with shape 1/cv^2, burstier above 1), lengths drawn from `prompt` and `output`."""
    if num_requests < 1 or rate <= 0 or cv <= 0:
        raise ValueError("need num_requests >= 1, rate > 0 and cv > 0")
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), num_requests)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    prompts = prompt.sample(rng, num_requests)
    outputs = output.sample(rng, num_requests)
    return [TraceRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


def poisson_trace(num_requests: int, rate: float, **kwargs) -> list[TraceRequest]:
    return synthetic_trace(num_requests, rate, cv=1.0, **kwargs)


def gamma_trace(num_requests: int, rate: float, cv: float, **kwargs) -> list[TraceRequest]:
    return synthetic_trace(num_requests, rate, cv=cv, **kwargs)
