"""flexserve reproduces Hugging Face transformers in float32: logits and greedy tokens, batched with padding."""
import pytest
import torch

from flexserve import LLM, SamplingParams
from flexserve.benchmarks.perplexity import token_logprobs

from ..conftest import FAMILIES, PROMPTS, hf_greedy

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_and_logits_match_transformers(tiny_model, kind):
    folder, hf = tiny_model(kind)
    with LLM(folder, dtype="float32", device="cpu") as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
        got = [o.outputs[0].token_ids for o in outs]
        assert got == [hf_greedy(hf, p, 10) for p in PROMPTS]
        # Logits of every prompt position, batched with left padding inside the executor.
        ex = llm.executor
        L = max(map(len, PROMPTS))
        state = ex.new_block([len(PROMPTS)], L)
        valid = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in PROMPTS])
        ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        logits = ex.forward(state, [ids], [pos], [valid], all_logits=True)[0]
    with torch.no_grad():
        for r, p in enumerate(PROMPTS):
            ref = hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[r, L - len(p):], ref, atol=1e-4, rtol=1e-4)


def test_prompt_logprobs_and_logprobs(tiny_model):
    folder, hf = tiny_model("llama-gqa")
    p = PROMPTS[0]
    with LLM(folder, dtype="float32", device="cpu") as llm:
        out = llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=3, temperature=0, logprobs=2,
                                                                   prompt_logprobs=1, ignore_eos=True))[0]
        lp = token_logprobs(llm, p)
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(p)):
        assert out.prompt_logprobs[i][p[i]] == pytest.approx(float(ref[i - 1, p[i]]), abs=1e-4)
        assert float(lp[i - 1]) == pytest.approx(float(ref[i - 1, p[i]]), abs=1e-4)
    c = out.outputs[0]
    assert len(c.logprobs) == 3 and all(c.token_ids[i] in c.logprobs[i] for i in range(3))
    assert c.cumulative_logprob == pytest.approx(sum(c.logprobs[i][c.token_ids[i]] for i in range(3)))


def test_sampling_is_seeded_and_independent_of_batch(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    with LLM(folder, dtype="float32", device="cpu") as llm:
        alone = llm.generate({"prompt_token_ids": PROMPTS[0]}, params)[0].outputs[0].token_ids
        batched = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)[0].outputs[0].token_ids
        other = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(
            max_tokens=8, temperature=0.9, seed=8, ignore_eos=True))[0].outputs[0].token_ids
        n2 = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(
            n=2, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True))[0].outputs
    assert alone == batched
    assert alone != other
    assert len(n2) == 2 and n2[0].token_ids != n2[1].token_ids


def test_bf16_and_fp16_run_close_to_fp32(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu") as ref:
        r = token_logprobs(ref, PROMPTS[2])
    for dt in ("bfloat16", "float16"):
        with LLM(folder, dtype=dt, device="cpu") as llm:
            got = token_logprobs(llm, PROMPTS[2])
        assert torch.allclose(got.float(), r, atol=0.1), dt
