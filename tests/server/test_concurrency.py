"""16 concurrent streamed requests of different lengths, each equal to what the offline `LLM` gives for its
prompt alone with greedy sampling: no token lost, duplicated or given to the wrong stream."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from flexserve import LLM, SamplingParams

TOPICS = ["the sea", "a cat", "Paris", "rain", "a robot", "music", "winter", "the moon"]
REQUESTS = [("chat" if i % 2 else "completion", f"Write one sentence about {TOPICS[i % 8]}." if i % 2
             else f"A short story about {TOPICS[i % 8]}: Once", 4 + (i * 7) % 29) for i in range(16)]


@pytest.fixture(scope="module")
def reference():
    """Each request alone through the offline `LLM`: token ids and text."""
    out = []
    with LLM(device="cpu") as llm:
        for kind, prompt, n in REQUESTS:
            params = SamplingParams(max_tokens=n, temperature=0.0)
            if kind == "chat":
                res = llm.chat([{"role": "user", "content": prompt}], params)[0]
            else:
                res = llm.generate(prompt, params)[0]
            out.append((res.outputs[0].token_ids, res.outputs[0].text))
    return out


def _stream(server, kind, prompt, n):
    client = server.client()
    kw = dict(model=server.model, temperature=0, max_tokens=n, stream=True,
              extra_body={"return_token_ids": True})
    if kind == "chat":
        chunks = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
        pieces = [(ch.choices[0].delta.content or "", ch.choices[0].model_extra.get("token_ids") or [])
                  for ch in chunks if ch.choices]
    else:
        chunks = client.completions.create(prompt=prompt, **kw)
        pieces = [(ch.choices[0].text, ch.choices[0].model_extra["token_ids"]) for ch in chunks]
    return sum((ids for _, ids in pieces), []), "".join(text for text, _ in pieces)


def test_concurrent_streams_equal_offline_greedy(smol_server, reference):
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        results = list(pool.map(lambda r: _stream(smol_server, *r), REQUESTS))
    for (kind, prompt, n), (ids, text), (ref_ids, ref_text) in zip(REQUESTS, results, reference):
        assert ids == ref_ids, (kind, prompt, n)
        assert text.strip() == ref_text.strip(), (kind, prompt)
    smol_server.wait_idle()
