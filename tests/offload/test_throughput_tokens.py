"""The throughput benchmark times the generation loop that `LLM.generate` runs, so its figures are those of
correct work: the greedy tokens it produces equal `LLM.generate`'s and Hugging Face's, resident or offloaded."""
import pytest

from flexserve import LLM, Policy, SamplingParams
from flexserve.benchmarks.throughput import greedy_block

from ..conftest import PROMPTS, hf_greedy

GEN_LEN = 6


@pytest.mark.parametrize("percent, bs, nb", [((100, 0, 100, 0, 100, 0), 4, 1), ((40, 60, 50, 50, 100, 0), 2, 2)],
                         ids=["resident-one-batch", "offloaded-two-batches"])
def test_benchmark_greedy_tokens_equal_llm_and_transformers(tiny_model, percent, bs, nb):
    folder, hf = tiny_model("llama-gqa")
    policy = Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=nb)
    with LLM(folder, dtype="float32", device="cpu", policy=policy) as llm:
        timed = greedy_block(llm.executor, PROMPTS, GEN_LEN, bs, progress=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=GEN_LEN, temperature=0.0, ignore_eos=True))
    assert timed.token_ids == [o.outputs[0].token_ids for o in outs]
    assert timed.token_ids == [hf_greedy(hf, p, GEN_LEN) for p in PROMPTS]
    assert timed.prefill_s > 0 and timed.decode_s > 0
