"""Sharded checkpoints, the perplexity verb, offline stop strings, and the demo command's answer."""
import math
import os

import torch

from flexserve import LLM, SamplingParams
from flexserve.benchmarks.perplexity import token_logprobs
from flexserve.cli import main

from .conftest import PROMPTS, hf_greedy

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
        "Locally nicknamed La dame de fer, it was constructed as the centerpiece of the 1889 World's Fair.")


def test_sharded_safetensors_with_index(tiny_model, tmp_path):
    _, hf = tiny_model("llama-gqa")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    with LLM(str(tmp_path), dtype="float32", device="cpu") as llm:
        got = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=6, temperature=0,
                                                                           ignore_eos=True))
    assert got[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 6)


def test_ppl_verb_prints_the_sliding_window_perplexity(tmp_path, capsys):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    assert main(["ppl", "--device", "cpu", "--dtype", "float32", "--window", "32", "--stride", "16", str(f)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    ppl = float(last.split()[1])
    # with a window covering the whole text the sliding window reduces to one pass over every token
    assert main(["ppl", "--device", "cpu", "--dtype", "float32", "--window", "4096", "--stride", "4096",
                 str(f)]) == 0
    whole = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
    with LLM(dtype="float32", device="cpu") as llm:
        ids = llm.tokenizer.encode(TEXT)
        direct = math.exp(-float(token_logprobs(llm, ids).double().mean()))
    assert abs(whole - direct) < 1e-3 * direct
    assert 1 < whole < ppl < 200  # less context per token can only hurt, on real English text


def test_offline_stop_strings_and_demo_answer(capsys):
    with LLM(dtype="float32", device="cpu") as llm:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        full = llm.chat(msgs, SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
        cut = llm.chat(msgs, SamplingParams(max_tokens=20, temperature=0, stop=["France"]))[0].outputs[0]
    assert "Paris" in full.text and full.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index("France")] and cut.stop_reason == "France"
    assert main(["generate", "--device", "cpu", "--max-tokens", "24", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert torch.get_default_dtype() == torch.float32
