"""Every client error gets an OpenAI-format error with its HTTP status, and the server stays healthy."""
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from flexserve.engine.serving import AsyncEngine, EngineConfig

from .conftest import API_KEY, Served


def _post(server, path, content, key=API_KEY):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def _assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def _assert_healthy(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = server.client().completions.create(model=server.model, prompt="Hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


@pytest.mark.parametrize("body", ['{"model": "x", "prompt": "hi"', "not json", "[1, 2]", "\xff\xfe"])
def test_malformed_json_is_400(smol_server, body):
    for path in ("/v1/completions", "/v1/chat/completions"):
        _assert_error(_post(smol_server, path, body.encode("latin-1")), 400)


@pytest.mark.parametrize("field, value", [("temperature", 3.0), ("temperature", -1), ("top_p", 0), ("n", 0),
                                          ("max_tokens", 0), ("logprobs", 50), ("temperature", "hot"),
                                          ("echo", True), ("presence_penalty", 0.5), ("prompt", [])])
def test_bad_values_are_400(smol_server, field, value):
    body = {"model": smol_server.model, "prompt": "Hello", "max_tokens": 4, field: value}
    err = _assert_error(_post(smol_server, "/v1/completions", httpx.Request("POST", "/", json=body).read()), 400)
    assert err["param"] is None or err["param"].startswith(field)


def test_bad_values_through_openai_client(smol_server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=smol_server.model, temperature=5,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=smol_server.model, messages=[])
    with pytest.raises(openai.BadRequestError):  # a token id outside the vocabulary
        client.completions.create(model=smol_server.model, prompt=[10**9], max_tokens=2)
    _assert_healthy(smol_server)


def test_unknown_model_is_404(smol_server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    _assert_error(_post(smol_server, "/v1/nothing-here", b"{}"), 404)


def test_prompt_over_context_is_400_context_length_exceeded(smol_server, client):
    """OpenAI's convention: 400 with code `context_length_exceeded`, so its client raises `BadRequestError`."""
    window = smol_server.engine.model_config.max_position
    for prompt in ([100] * (window + 5), "hello " * (window + 5)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=smol_server.model, prompt=prompt, max_tokens=4)
        assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
        assert e.value.body["param"] == "prompt" and str(window) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=smol_server.model, messages=[{"role": "user", "content": "hi " * window}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # streaming too: the status comes before any chunk
        client.completions.create(model=smol_server.model, prompt=[100] * window, max_tokens=4, stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    _assert_healthy(smol_server)


@pytest.mark.parametrize("body", [{"prompt": ""}, {"prompt": []}, {"prompt": ["hi", ""]}, {"prompt": [[]]},
                                  {"prompt": "hi", "max_tokens": 0}, {"prompt": "hi", "temperature": -1},
                                  {"prompt": "hi", "n": 0}, {"prompt": [10**9]}, {"prompt": "hi", "echo": True},
                                  {"prompt": 5}, {}])
def test_every_400_has_a_code_and_a_param(smol_server, body):
    err = _assert_error(_post(smol_server, "/v1/completions",
                              httpx.Request("POST", "/", json={"model": smol_server.model, **body}).read()), 400)
    assert err["code"] and err["param"], err


def test_every_chat_400_has_a_code_and_a_param(smol_server):
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": "hi"},
                 {"messages": [{"role": "user", "content": "hi"}], "top_p": 2}):
        err = _assert_error(_post(smol_server, "/v1/chat/completions",
                                  httpx.Request("POST", "/", json={"model": smol_server.model, **body}).read()), 400)
        assert err["code"] and err["param"], (body, err)


def test_api_key(smol_server):
    bad = openai.OpenAI(base_url=smol_server.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=smol_server.model, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=smol_server.model, messages=[{"role": "user", "content": "Hi"}])
    for path in ("/v1/completions", "/v1/chat/completions"):
        for key in (None, "wrong-key", "x" + API_KEY):
            _assert_error(_post(smol_server, path, b'{"prompt": "x"}', key=key), 401)
    assert httpx.get(smol_server.url + "/v1/models").status_code == 401
    basic = httpx.get(smol_server.url + "/v1/models", headers={"Authorization": f"Basic {API_KEY}"})
    assert basic.status_code == 401 and basic.headers["WWW-Authenticate"] == "Bearer"
    # Health and metrics stay open for probes and Prometheus.
    assert httpx.get(smol_server.url + "/health").status_code == 200
    assert "flexserve_request_errors_total" in httpx.get(smol_server.url + "/metrics").text
    _assert_healthy(smol_server)


@pytest.mark.parametrize("separate_process", [False, True], ids=["in-process", "engine-process"])
def test_queue_full_is_429_and_server_recovers(tiny_model, separate_process):
    from flexserve.engine.remote import make_engine

    folder, _ = tiny_model("llama-gqa")
    engine = make_engine(EngineConfig(model=folder, dtype="float32", device="cpu", max_num_seqs=1,
                                      max_queue_len=1, num_gpu_blocks=64), separate_process)
    server = Served(engine)
    try:
        def one(i):
            try:
                r = server.client().completions.create(model=server.model, prompt=[5 + i, 6, 7], max_tokens=40,
                                                       temperature=0, extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            except openai.RateLimitError as e:
                assert e.status_code == 429 and e.body["code"] == "queue_full"
                return 429

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        assert results.count(429) >= 1 and results.count(40) >= 1 and set(results) <= {40, 429}
        stats = server.wait_idle()
        assert stats["kv_blocks_used"] == 0
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        r = server.client().completions.create(model=server.model, prompt=[5, 6], max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3 or r.choices[0].finish_reason == "stop"
        assert 'flexserve_request_errors_total{status="429"}' in httpx.get(server.url + "/metrics").text
    finally:
        server.stop()


def test_request_larger_than_the_kv_pool_says_what_to_lower(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    server = Served(AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=4,
                                             block_size=16, num_cpu_blocks=4)))
    try:
        with pytest.raises(openai.BadRequestError) as e:
            server.client().completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=500)
        body = e.value.body
        assert body["code"] == "request_too_large" and body["param"] == "max_tokens"
        assert "lower max_tokens" in body["message"] and "cmpl-" not in body["message"]
        assert "64" in body["message"]  # what the pool holds, in tokens
        r = server.client().completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8  # and the server still serves
    finally:
        server.stop()
