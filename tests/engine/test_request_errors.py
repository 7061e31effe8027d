"""Requests the engine cannot serve are refused with a `RequestError` that says why; the engine stays usable."""
import pytest

from flexserve import LLM, PromptTooLongError, RequestError, SamplingParams


def test_prompt_longer_than_context(tiny_model):
    folder, _ = tiny_model("llama-gqa")  # context window 128
    with LLM(folder, dtype="float32", device="cpu") as llm:
        with pytest.raises(PromptTooLongError, match="context window is 128"):
            llm.generate({"prompt_token_ids": [5] * 200})
        # a prompt that fits still works afterwards, and generation is clipped to the window
        out = llm.generate({"prompt_token_ids": [5] * 120}, SamplingParams(max_tokens=50, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 8 and out[0].outputs[0].finish_reason == "length"
        with pytest.raises(RequestError, match="empty"):
            llm.generate({"prompt_token_ids": []})
        with pytest.raises(RequestError, match="token ids"):
            llm.generate({"prompt_token_ids": [1, 10_000]})


@pytest.mark.parametrize("kw, msg", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k": -5}, "top_k"), ({"n": 0}, "n must"),
    ({"logprobs": 99}, "logprobs"),
])
def test_bad_sampling_values(kw, msg):
    with pytest.raises(RequestError, match=msg):
        SamplingParams(**kw)
