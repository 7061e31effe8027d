"""The OpenAI-compatible API through the real `openai` client: chat and completions, streaming and not."""
import httpx


def test_models_and_health(smol_server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [smol_server.model]
    assert models.data[0].model_extra["max_model_len"] == smol_server.engine.model_config.max_position
    r = httpx.get(smol_server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_non_streaming(smol_server, client):
    r = client.chat.completions.create(model=smol_server.model, temperature=0, max_tokens=24,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert "Paris" in c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(smol_server, client):
    kw = dict(model=smol_server.model, temperature=0, max_completion_tokens=16,
              messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}])
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_streaming_and_not(smol_server, client):
    kw = dict(model=smol_server.model, prompt="The capital of France is", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    full = client.completions.create(**kw)
    c = full.choices[0]
    assert full.object == "text_completion" and c.finish_reason == "length"
    assert len(c.model_extra["token_ids"]) == 8 and full.usage.completion_tokens == 8
    assert c.model_extra["prompt_token_ids"] == smol_server.engine.tokenizer.encode("The capital of France is")
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert sum((ch.choices[0].model_extra["token_ids"] for ch in chunks), []) == c.model_extra["token_ids"]


def test_completion_prompt_forms_n_and_logprobs(smol_server, client):
    ids = smol_server.engine.tokenizer.encode("One, two,")
    r = client.completions.create(model=smol_server.model, prompt=[ids, ids], n=2, max_tokens=4,
                                  temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) == 1  # the same prompt twice, greedy: four equal choices
    texts = client.completions.create(model=smol_server.model, prompt=["One, two,", "Hello"], max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert texts.choices[0].text == r.choices[0].text and texts.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 16
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) == 2 and top[tok] == chosen  # greedy: the chosen is the best


def test_streaming_n_choices(smol_server, client):
    kw = dict(model=smol_server.model, prompt="Red, green,", max_tokens=6, temperature=0, n=3,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    texts = {0: "", 1: "", 2: ""}
    finished = []
    for ch in client.completions.create(**kw, stream=True):
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.append(c.index)
    assert sorted(finished) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [c.text for c in full.choices]


def test_sampling_with_seed_is_reproducible(smol_server, client):
    kw = dict(model=smol_server.model, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9,
              seed=7, n=2, extra_body={"top_k": 50, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_stop_string(smol_server, client):
    r = client.completions.create(model=smol_server.model, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                  stop=[" 7"])
    c = r.choices[0]
    assert c.finish_reason == "stop" and " 7" not in c.text and "6" in c.text


def test_chat_logprobs(smol_server, client):
    r = client.chat.completions.create(model=smol_server.model, temperature=0, max_tokens=5, logprobs=True,
                                       top_logprobs=3, messages=[{"role": "user", "content": "Hi"}])
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in content)


def test_metrics_after_requests(smol_server, client):
    client.completions.create(model=smol_server.model, prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(smol_server.url + "/metrics").text
    for name in ("flexserve_time_to_first_token_seconds_count", "flexserve_time_per_output_token_seconds_count",
                 "flexserve_e2e_request_latency_seconds_count", 'flexserve_queue_length{level="0"}',
                 'flexserve_kv_blocks_used{tier="gpu"}', 'flexserve_kv_blocks_total{tier="cpu"}',
                 "flexserve_num_requests_running", "flexserve_num_requests_waiting",
                 "flexserve_num_requests_swapped", "flexserve_generated_tokens_total",
                 'flexserve_requests_finished_total{reason="length"}', "flexserve_preemptions_total",
                 "flexserve_swaps_total", "flexserve_recomputes_total",
                 "flexserve_recent_generation_tokens_per_second"):
        assert name in text, name
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["flexserve_generated_tokens_total"] >= 3
    assert values["flexserve_e2e_request_latency_seconds_count"] >= 1
