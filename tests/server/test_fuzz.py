"""A bounded property-based fuzz of the HTTP API: random JSON bodies (the request fields with values of every
JSON type, plausible and not, plus unknown fields and bodies that are not objects) for /v1/completions and
/v1/chat/completions. No body may get a 5xx, every error has OpenAI's shape, and the server is healthy and idle
afterwards."""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexserve.engine.serving import AsyncEngine, EngineConfig

from .conftest import Served

VOCAB = 96  # the tiny model's (tests/conftest.py)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=False),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=8)
token_ids = st.lists(st.integers(-3, VOCAB + 3), max_size=12)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "robot"]),
     "content": st.one_of(st.text(max_size=20), st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=8)}), max_size=2), json_values)}),
    max_size=3)
FIELDS = {
    "model": st.one_of(st.just("tiny"), json_values),
    "prompt": st.one_of(token_ids, st.lists(token_ids, max_size=3), st.text(max_size=20), json_values),
    "messages": st.one_of(messages, json_values),
    "max_tokens": st.one_of(st.integers(-2, 200), json_values),
    "max_completion_tokens": st.one_of(st.integers(-2, 40), json_values),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), json_values),
    "top_p": st.one_of(st.floats(-0.5, 1.5, allow_nan=False), json_values),
    "top_k": st.one_of(st.integers(-3, 200), json_values),
    "n": st.one_of(st.integers(-1, 6), json_values),
    "seed": st.one_of(st.integers(-2**70, 2**70), json_values),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "logprobs": st.one_of(st.integers(-1, 25), st.booleans(), json_values),
    "top_logprobs": st.one_of(st.integers(-1, 25), json_values),
    "echo": st.one_of(st.booleans(), json_values),
    "ignore_eos": st.one_of(st.booleans(), json_values),
    "return_token_ids": st.one_of(st.booleans(), json_values),
    "presence_penalty": st.one_of(st.floats(-2, 2, allow_nan=False), json_values),
    "logit_bias": json_values,
    "tools": json_values,
    "unknown_field": json_values,
}
bodies = st.one_of(st.fixed_dictionaries({}, optional=FIELDS), json_values)


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    server = Served(AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=48,
                                             block_size=8, num_cpu_blocks=16, max_num_seqs=8)),
                    served_model_name="tiny")
    yield server
    server.stop()


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies)
def test_random_bodies_never_get_a_server_error(fuzz_server, path, body):
    resp = httpx.post(fuzz_server.url + path, content=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert resp.status_code < 500, (body, resp.status_code, resp.text)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"], (body, err)


def test_server_is_healthy_and_idle_after_the_fuzz(fuzz_server):  # runs after the fuzz (file order)
    assert httpx.get(fuzz_server.url + "/health").json() == {"status": "ok"}
    stats = fuzz_server.wait_idle()
    assert stats["kv_blocks_used"] == 0
    r = fuzz_server.client().completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
