"""The serving engine under tensor and pipeline parallelism (torchrun, gloo ranks on the CPU): every request
gets exactly the greedy tokens the single-process offline engine gives it, with and without preemption and KV
swaps."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flexserve import LLM, SamplingParams

from .test_torchrun import _free_port

PROMPTS = [[(7 * i + j) % 90 + 3 for j in range(3 + 5 * i)] for i in range(8)]  # 3 .. 38 tokens
LENGTHS = [4 + (i * 5) % 13 for i in range(8)]
SCRIPT = os.path.join(os.path.dirname(__file__), "tp_engine_script.py")


def _run(folder: str, scheduler: str, gpu_blocks: int, tp: int = 2, pp: int = 1) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), SCRIPT, folder, scheduler, str(gpu_blocks),
           json.dumps([PROMPTS, LENGTHS]), f"{tp}x{pp}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("TP_ENGINE ")]
    assert len(lines) == 1, res.stdout  # rank 0 alone reports
    return json.loads(lines[0][len("TP_ENGINE "):])


@pytest.mark.parametrize("scheduler, gpu_blocks, tp, pp", [("fcfs", 200, 2, 1), ("skip-join-mlfq", 14, 2, 1),
                                                           ("skip-join-mlfq", 14, 1, 2), ("fcfs", 200, 2, 2)],
                         ids=["tp2-fcfs", "tp2-swaps", "pp2-swaps", "tp2xpp2"])
def test_parallel_serving_matches_offline(tiny_model, scheduler, gpu_blocks, tp, pp):
    folder, hf = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu") as llm:
        ref = [llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
               .outputs[0].token_ids for p, n in zip(PROMPTS, LENGTHS)]
    got = _run(folder, scheduler, gpu_blocks, tp, pp)
    assert got["tokens"] == ref
    assert got["heads"] == hf.config.num_attention_heads // tp  # rank 0 really holds its share of the heads
    assert got["layers"] == hf.config.num_hidden_layers // pp  # ... and of the layers
    assert got["blocks_used"] == 0
    if gpu_blocks < 20:
        assert got["swaps"] > 0  # the small pool forced KV swaps, replayed on both ranks


def test_serve_cli_with_tensor_parallel(tiny_model):
    """`torchrun --nproc-per-node 2 -m flexserve.cli serve -tp 2`: rank 0 serves HTTP, rank 1 follows."""
    import signal
    import time

    import httpx

    folder, _ = tiny_model("llama-gqa")
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "flexserve.cli", "serve", "--model", folder, "--device", "cpu",
           "--dtype", "float32", "--tensor-parallel", "2", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        with LLM(folder, dtype="float32", device="cpu") as llm:
            want = [llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=6, temperature=0,
                                                                         ignore_eos=True))[0].outputs[0].token_ids
                    for p in PROMPTS[:3]]
        body = {"model": os.path.basename(folder), "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        got = [httpx.post(base + "/v1/completions", json={**body, "prompt": p}, timeout=60).json()
               for p in PROMPTS[:3]]
        assert [g["choices"][0]["token_ids"] for g in got] == want
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
