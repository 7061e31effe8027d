"""Load at twice saturation with client disconnects and cancellations, against `flexserve serve`.

Starts `flexserve serve` on 127.0.0.1 and a free port (or uses --url), then:
  1. runs each prompt alone, non-streamed, greedy (temperature 0): the reference tokens;
  2. floods the server to measure saturation (requests/s it completes with a full queue);
  3. offers `--factor` times that rate (Poisson arrivals) for `--duration` seconds, every request streamed;
     a share `--disconnect` of the clients drop the connection mid-stream after a random number of chunks,
     and a share `--cancel` close theirs before or around the first token (task cancelled after a random delay);
  4. checks that every completed stream's token ids equal the reference (no lost, no duplicated tokens), that
     every KV block is free afterwards (`/metrics`), and samples the server's resident memory (start/mid/end).

Prints one line `LOAD_RESULT {json}`; exits 1 when an invariant fails.

    python bench/load_test.py --duration 60
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time

import httpx
import psutil

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite book is",
    "In 1969, the first humans",
    "A good recipe for bread needs",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "flexserve.cli", "serve", "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--num-gpu-blocks", str(args.num_gpu_blocks), "--num-cpu-blocks", str(args.num_cpu_blocks),
           "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if args.quiet else None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not become healthy")


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    p = psutil.Process(pid)
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def metric(text: str, name: str) -> float:
    """Sum of every sample of gauge `name` (all labels)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def kv_state(client: httpx.AsyncClient) -> dict:
    text = (await client.get("/metrics")).text
    names = [n for n in re.findall(r"^# TYPE (\S+) gauge", text, re.M)
             if n.endswith(("kv_blocks_used", "num_requests_running", "num_requests_waiting", "num_requests_swapped"))]
    return {n.split("_", 1)[1] if n.startswith("flexserve_") else n: metric(text, n) for n in names}


def body(prompt: str, args, stream: bool) -> dict:
    b = {"model": args.served_model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
         "stream": stream, "return_token_ids": True}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


async def reference(client: httpx.AsyncClient, prompt: str, args) -> dict:
    r = await client.post("/v1/completions", json=body(prompt, args, False))
    r.raise_for_status()
    c = r.json()["choices"][0]
    return {"tokens": list(c["token_ids"]), "text": c["text"], "finish_reason": c["finish_reason"]}


async def streamed(client: httpx.AsyncClient, prompt: str, args, stop_after: int | None = None) -> dict:
    """One streamed request; `stop_after` chunks then the client closes the connection."""
    tokens, text, chunks, usage, finish = [], "", 0, None, None
    async with client.stream("POST", "/v1/completions", json=body(prompt, args, True)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                tokens += ch.get("token_ids") or []
                text += ch.get("text") or ""
                finish = ch.get("finish_reason") or finish
                chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return {"outcome": "disconnected", "tokens": tokens}
    return {"outcome": "completed", "tokens": tokens, "text": text, "usage": usage, "finish_reason": finish}


async def measure_saturation(client, args) -> float:
    n = args.saturation_requests
    t0 = time.monotonic()
    await asyncio.gather(*(streamed(client, PROMPTS[i % len(PROMPTS)], args) for i in range(n)))
    return n / (time.monotonic() - t0)


async def run(args, url: str, pid: int | None) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        if args.served_model is None:
            args.served_model = (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = PROMPTS[: args.num_prompts]
        refs = {p: await reference(client, p, args) for p in prompts}  # alone, one at a time
        rss_start_server = rss_mb(pid)
        saturation = await measure_saturation(client, args)
        rate = args.factor * saturation
        rss = {"start": rss_mb(pid)}
        results: list[dict] = []
        outcome_of = {"completed": 0, "disconnected": 0, "cancelled": 0, "errors": 0}

        async def one(prompt: str, kind: str):
            try:
                if kind == "disconnect":
                    res = await streamed(client, prompt, args, stop_after=rng.randint(1, args.max_tokens - 1))
                elif kind == "cancel":
                    task = asyncio.ensure_future(streamed(client, prompt, args))
                    await asyncio.sleep(rng.uniform(0, args.cancel_within_s))
                    if task.done():
                        res = task.result()
                    else:
                        task.cancel()  # closes the connection early
                        try:
                            await task
                        except asyncio.CancelledError:
                            pass
                        res = {"outcome": "cancelled"}
                else:
                    res = await streamed(client, prompt, args)
            except Exception as e:  # noqa: BLE001 - counted, the run goes on
                res = {"outcome": "errors", "error": repr(e)}
            res["prompt"] = prompt
            outcome_of[res["outcome"]] += 1
            results.append(res)

        tasks, t0, offered = [], time.monotonic(), 0
        mid_sampled = False
        while time.monotonic() - t0 < args.duration:
            u = rng.random()
            kind = "disconnect" if u < args.disconnect else "cancel" if u < args.disconnect + args.cancel else "full"
            tasks.append(asyncio.ensure_future(one(rng.choice(prompts), kind)))
            offered += 1
            if not mid_sampled and time.monotonic() - t0 >= args.duration / 2:
                rss["mid"], mid_sampled = rss_mb(pid), True
            await asyncio.sleep(rng.expovariate(rate))
        if not mid_sampled:
            rss["mid"] = rss_mb(pid)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0

        # KV blocks: every one free once the server is idle (aborts are asynchronous, allow a short settle)
        deadline = time.monotonic() + args.settle_s
        while True:
            state = await kv_state(client)
            if all(v == 0 for v in state.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        rss["end"] = rss_mb(pid)
        healthy = (await client.get("/health")).status_code == 200
        after = await reference(client, prompts[0], args)  # the server still answers, and the same

    mismatches = duplicated = lost = length_wrong = 0
    examples = []
    for r in results:
        if r["outcome"] != "completed":
            continue
        ref = refs[r["prompt"]]
        toks = r["tokens"]
        n_usage = (r.get("usage") or {}).get("completion_tokens", len(toks))
        duplicated += max(0, len(toks) - len(ref["tokens"])) + max(0, len(toks) - n_usage)
        lost += max(0, len(ref["tokens"]) - len(toks))
        if r["finish_reason"] == "length" and len(toks) != args.max_tokens:
            length_wrong += 1
        if toks != ref["tokens"] or r["text"] != ref["text"]:
            mismatches += 1
            if len(examples) < 3:
                examples.append({"prompt": r["prompt"], "got": toks, "want": ref["tokens"]})
    return {
        "saturation_req_s": round(saturation, 3), "offered_req_s": round(rate, 3), "duration_s": round(elapsed, 1),
        "offered": offered, "completed": outcome_of["completed"], "disconnected": outcome_of["disconnected"],
        "cancelled": outcome_of["cancelled"], "errors": outcome_of["errors"],
        "token_mismatches": mismatches, "duplicated_tokens": duplicated, "lost_tokens": lost,
        "length_count_wrong": length_wrong, "max_tokens": args.max_tokens,
        "kv_blocks_used_after": sum(v for k, v in state.items() if k.endswith("kv_blocks_used")),
        "requests_in_engine_after": sum(v for k, v in state.items() if not k.endswith("kv_blocks_used")),
        "rss_mb_after_load_model": rss_start_server, "rss_mb_start": rss["start"], "rss_mb_mid": rss["mid"],
        "rss_mb_end": rss["end"], "healthy_after": healthy,
        "same_answer_after": after["tokens"] == refs[prompts[0]]["tokens"],
        "mismatch_examples": examples,
        "error_examples": [r["error"] for r in results if r["outcome"] == "errors"][:3],
    }


def passed(res: dict) -> bool:
    return (res["token_mismatches"] == 0 and res["duplicated_tokens"] == 0 and res["lost_tokens"] == 0
            and res["length_count_wrong"] == 0 and res["kv_blocks_used_after"] == 0
            and res["requests_in_engine_after"] == 0 and res["errors"] == 0 and res["healthy_after"]
            and res["same_answer_after"] and res["completed"] > 0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an already running server (default: start `flexserve serve`)")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, for its RSS")
    p.add_argument("--model", default=None, help="model to serve (default: flexserve's default small model)")
    p.add_argument("--served-model", default=None, help="model id to send (default: the server's first)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of offered load")
    p.add_argument("--factor", type=float, default=2.0, help="offered rate / saturation rate")
    p.add_argument("--disconnect", type=float, default=0.3, help="share of clients that drop mid-stream")
    p.add_argument("--cancel", type=float, default=0.1, help="share of clients that close early (cancel)")
    p.add_argument("--cancel-within-s", type=float, default=1.0, help="a cancel comes within this many seconds")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    p.add_argument("--saturation-requests", type=int, default=24, help="requests sent at once to measure it")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--num-gpu-blocks", type=int, default=256)
    p.add_argument("--num-cpu-blocks", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--settle-s", type=float, default=15.0, help="wait this long for the KV blocks to be freed")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="hide the server's log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    proc = None
    url, pid = args.url, args.pid
    if url is None:
        proc, url = start_server(args)
        pid = proc.pid
    try:
        res = asyncio.run(run(args, url, pid))
    finally:
        if proc is not None:
            stop_server(proc)
    print("LOAD_RESULT " + json.dumps(res), flush=True)
    return 0 if passed(res) else 1


def stop_server(proc: subprocess.Popen) -> None:
    """Ask the server to drain and stop; kill it if it has not within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
