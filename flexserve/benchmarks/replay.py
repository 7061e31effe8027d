"""The HTTP side of `flexserve bench serve`: send a trace's requests at their arrival times to an OpenAI-
compatible server and measure what the client sees.

Open loop: each request is sent at its trace arrival time, whatever the server's backlog. Every request sends
its prompt as token ids with `max_tokens` = its recorded output length and `ignore_eos: true`, so it produces
exactly that many tokens; greedy sampling. TTFT runs from sending to the first token, TPOT is the mean gap after
it, JCT from sending to the last token. A client cannot see scheduling, so its queueing time is an estimate:
every gap (send to first token, token to token) longer than the run's median inter-token gap (one engine step)
counts its excess as waiting.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from ..scheduler.metrics import LatencyReport, RequestRecord
from ..scheduler.traces import TraceRequest

COUNTERS = ("preemptions", "swaps", "recomputes")


@dataclass
class Timing:
    """What the client saw of one request."""

    index: int
    send: float
    token_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    error: str | None = None


async def _send(client, url: str, headers: dict, body: dict, timing: Timing) -> None:
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            timing.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                timing.error = obj["error"].get("message", "error")
                return
            now = time.perf_counter()
            for choice in obj.get("choices") or ():
                n = len(choice["token_ids"]) if "token_ids" in choice else int(bool(choice.get("text")))
                timing.token_times.extend([now] * n)
            if obj.get("usage"):
                timing.num_tokens = obj["usage"]["completion_tokens"]
    timing.num_tokens = timing.num_tokens or len(timing.token_times)


async def replay(base_url: str, trace: list[TraceRequest], prompts: list[list[int]], model: str,
                 api_key: str | None = None, progress: bool = True) -> tuple[list[Timing], float]:
    """Send every request at its arrival time; returns what the client saw and the makespan (s)."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"
    bar = tqdm(total=len(trace), desc="requests", unit="req", disable=not progress)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int, req: TraceRequest) -> Timing:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
            timing = Timing(i, time.perf_counter())
            body = {"model": model, "prompt": prompts[i], "max_tokens": req.output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                    "return_token_ids": True}
            try:
                await _send(client, url, {**headers, "X-Request-Id": f"bench-{i}"}, body, timing)
            except Exception as e:  # a dropped connection fails one request, not the run
                timing.error = f"{type(e).__name__}: {e}"
            bar.update(1)
            return timing

        timings = await asyncio.gather(*(one(i, r) for i, r in enumerate(trace)))
    bar.close()
    ends = [t.token_times[-1] for t in timings if t.token_times]
    return list(timings), (max(ends) - t0) if ends else 0.0


def records_from_timings(trace: list[TraceRequest], timings: list[Timing]) -> list[RequestRecord]:
    """Client-side latencies; queueing estimated as the excess of every gap over one typical step."""
    ok = [t for t in timings if t.error is None and t.token_times]
    gaps = np.concatenate([np.diff(t.token_times) for t in ok] or [np.zeros(0)])
    gaps = gaps[gaps > 0]  # tokens of one chunk share a time stamp
    step = float(np.median(gaps)) if gaps.size else 0.0
    records = []
    for t in ok:
        times = np.asarray([t.send] + t.token_times)
        waits = np.clip(np.diff(times) - step, 0.0, None)
        first, last, n = t.token_times[0], t.token_times[-1], t.num_tokens
        r = trace[t.index]
        records.append(RequestRecord(str(t.index), r.arrival_s, r.prompt_len, n, last - t.send, first - t.send,
                                     (last - first) / (n - 1) if n > 1 else None, float(waits.sum()), 0, 0, 0))
    return records


def scrape_counters(base_url: str, api_key: str | None = None) -> dict[str, float]:
    """flexserve's preemption/swap/recompute counters from /metrics (empty for other servers)."""
    import httpx

    try:
        text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for c in COUNTERS:
            if name == f"flexserve_{c}_total":
                out[c] = float(value)
    return out


def server_model(base_url: str, api_key: str | None) -> tuple[str, int | None, int | None]:
    """The first model id the server lists, its context window and vocabulary size when it says
    (`max_model_len` as vLLM; `vocab_size` is flexserve's)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    card = resp.json()["data"][0]
    return card["id"], card.get("max_model_len"), card.get("vocab_size")


def _raise_fd_limit() -> None:
    """Each request in flight holds a socket (two with --launch): lift the soft limit on open files."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


def http_run(label: str, base_url: str, trace, prompts, model: str, api_key: str | None) -> dict:
    _raise_fd_limit()
    before = scrape_counters(base_url)
    timings, makespan = asyncio.run(replay(base_url, trace, prompts, model, api_key))
    after = scrape_counters(base_url)
    records = records_from_timings(trace, timings)
    failed = [t.error for t in timings if t.error is not None or not t.token_times]
    row = {"scheduler": label, "mode": "http", **LatencyReport.of(records, makespan).row(),
           "failed": len(failed), "makespan_s": makespan,
           **{c: after.get(c, 0) - before.get(c, 0) for c in COUNTERS if c in after}}
    if failed:
        row["first_error"] = failed[0] or "no tokens"
    return {"row": row, "records": records}


def http_run_isolated(label: str, base_url: str, trace, prompts, model: str) -> dict:
    """`http_run` in a child process: the client's HTTP and JSON work must not compete for the server
    process's interpreter lock, or the benchmark would measure its own client."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(http_run, label, base_url, trace, prompts, model, None).result()
