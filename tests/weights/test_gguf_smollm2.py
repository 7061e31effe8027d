"""The real SmolLM2-135M-Instruct Q4_1 GGUF: our loader and math against transformers' own GGUF loading."""
import os

import pytest
import torch

from flexserve import LLM, SamplingParams
from flexserve.benchmarks.perplexity import token_logprobs
from flexserve.weights import default_model_path

PARAGRAPH = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


@pytest.fixture(scope="module")
def smollm():
    path = default_model_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    llm = LLM(dtype="float32", device="cpu")
    yield llm, hf, tok
    llm.close()


def test_config_from_gguf_metadata(smollm):
    cfg = smollm[0].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152


def test_logits_match_transformers_gguf(smollm):
    llm, hf, tok = smollm
    ids = tok(PARAGRAPH)["input_ids"]
    assert llm.tokenizer.encode(PARAGRAPH) == ids
    ours = token_logprobs(llm, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    ref_lp = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(ours, ref_lp, atol=2e-3, rtol=1e-3)
    # and full distributions at a few positions
    ex = llm.executor
    state = ex.new_block([1], len(ids))
    full = ex.forward(state, [torch.tensor([ids])], [torch.arange(len(ids))[None]], [None], all_logits=True)[0][0]
    with torch.no_grad():
        ref_full = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(full, ref_full, atol=2e-3, rtol=1e-3)


def test_greedy_chat_answers_paris_like_transformers(smollm):
    llm, hf, tok = smollm
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
    assert "Paris" in out.text
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    eos = llm.config.eos_ids
    ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
    assert out.token_ids == ref
