"""Tensor and pipeline parallel generation under torchrun, gloo on the CPU, against the single-process engine."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from flexserve import LLM, SamplingParams
from flexserve.parallel import parallel_generate

from ..conftest import PROMPTS

MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "flexserve.parallel.generate", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _reference(folder: str, prompts=PROMPTS, **params) -> list[list[int]]:
    with LLM(folder, dtype="float32", device="cpu") as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **params))
    return [o.outputs[0].token_ids for o in outs]


def _parallel(folder: str, tp: int, pp: int, *extra: str) -> list[list[int]]:
    nproc = tp * pp
    res = torchrun(nproc, "--model", folder, "--dtype", "float32", "--tensor-parallel", str(tp),
                   "--pipeline-parallel", str(pp), "--prompt-token-ids", json.dumps(PROMPTS),
                   "--max-tokens", str(MAX_TOKENS), "--ignore-eos", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 1, res.stdout  # only rank 0 prints
    return json.loads(lines[0])


@pytest.mark.parametrize("kind", ["llama-gqa", "opt"])
@pytest.mark.parametrize("tp,pp,extra", [(2, 1, ()), (1, 2, ()), (1, 2, ("--num-micro-batches", "3"))],
                         ids=["tp2", "pp2", "pp2-3micro"])
def test_parallel_greedy_equals_single_process(tiny_model, kind, tp, pp, extra):
    folder, _ = tiny_model(kind)
    assert _parallel(folder, tp, pp, *extra) == _reference(folder, ignore_eos=True)


def test_tensor_and_pipeline_together_on_four_ranks(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    assert _parallel(folder, 2, 2) == _reference(folder, ignore_eos=True)


def test_degrees_that_do_not_match_the_processes_fail_clearly(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    res = torchrun(2, "--model", folder, "--dtype", "float32", "--tensor-parallel", "2", "--pipeline-parallel",
                   "2", "--prompt-token-ids", "[[1, 2, 3]]", "--max-tokens", "2")
    assert res.returncode != 0
    assert "needs 4 processes, but 2 were started" in res.stderr
    assert "Traceback" not in res.stderr.split("flexserve: error")[0]


def test_bad_tensor_degree_for_the_heads_fails_clearly(tiny_model):
    folder, _ = tiny_model("mistral")  # a single kv head cannot be split two ways
    res = torchrun(2, "--model", folder, "--dtype", "float32", "--tensor-parallel", "2", "--prompt-token-ids",
                   "[[1, 2, 3]]", "--max-tokens", "2")
    assert res.returncode != 0
    assert "tensor parallel 2 does not divide the model's 1 key/value heads" in res.stderr


def test_single_process_api_stops_like_the_engine(tiny_model):
    """Without a process group the same loop runs in the caller; stop tokens end rows as the engine does."""
    folder, _ = tiny_model("llama-gqa")
    first = _reference(folder, ignore_eos=True)
    stop = [first[1][3]]
    got = parallel_generate(folder, PROMPTS, MAX_TOKENS, dtype="float32", device="cpu", stop_token_ids=stop)
    assert got == _reference(folder, ignore_eos=True, stop_token_ids=stop)
    assert any(len(g) < MAX_TOKENS for g in got) and any(len(g) == MAX_TOKENS for g in got)


@pytest.mark.parametrize("tp, pp, percent", [(1, 2, ("30", "40", "100", "0", "100", "0")),
                                             (2, 1, ("0", "100", "100", "0", "100", "0"))],
                         ids=["pp2-three-tiers", "tp2-weights-on-cpu"])
def test_each_stage_offloads_its_own_layers(tiny_model, tmp_path, tp, pp, percent):
    """Weights placed per stage on the GPU/CPU/disk tiers (the CPU stands in for the GPU here) and streamed
    layer by layer: the same greedy tokens, and no offload file left behind."""
    folder, _ = tiny_model("llama-gqa")
    got = _parallel(folder, tp, pp, "--percent", *percent, "--offload-dir", str(tmp_path))
    assert got == _reference(folder, ignore_eos=True)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_parallel_rejects_cache_offload(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    res = torchrun(2, "--model", folder, "--dtype", "float32", "--pipeline-parallel", "2", "--prompt-token-ids",
                   "[[1, 2, 3]]", "--percent", "100", "0", "0", "100", "100", "0")
    assert res.returncode != 0 and "only the weight percentages" in res.stderr
