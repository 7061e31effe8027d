"""A client that goes away mid-request has its engine request cancelled and its KV blocks freed."""
import json

import httpx
import pytest

from .conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise KeyError(name)


def test_stream_disconnect_frees_blocks(smol_server):
    before = smol_server.wait_idle()["generated_tokens"]  # the counter runs over the server's whole life
    aborted = _metric(smol_server, 'flexserve_requests_finished_total{reason="abort"}') \
        if 'reason="abort"' in httpx.get(smol_server.url + "/metrics").text else 0.0
    body = {"model": smol_server.model, "prompt": "Tell me a long story.", "max_tokens": 2000,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", smol_server.url + "/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and "choices" in json.loads(line[6:]):
                seen += 1
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
        assert smol_server.engine.stats()["kv_blocks_used"] > 0
    stats = smol_server.wait_idle(timeout=20)
    # at least the tokens of the three chunks read (each carries one or more), and the request was cancelled
    # rather than run to its 2000 tokens
    assert stats["kv_blocks_used"] == 0 and 3 <= stats["generated_tokens"] - before < 2000
    assert _metric(smol_server, 'flexserve_kv_blocks_used{tier="gpu"}') == 0
    assert _metric(smol_server, 'flexserve_requests_finished_total{reason="abort"}') == aborted + 1
    assert httpx.get(smol_server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("path, extra", [("/v1/completions", {"prompt": "Tell me a long story."}),
                                         ("/v1/chat/completions",
                                          {"messages": [{"role": "user", "content": "Tell me a long story."}]})])
def test_non_streaming_disconnect_frees_blocks(smol_server, path, extra):
    smol_server.wait_idle()
    before = smol_server.engine.stats()["generated_tokens"]
    body = {"model": smol_server.model, "max_tokens": 2000, "temperature": 0, "ignore_eos": True, **extra}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(smol_server.url + path, json=body, headers=HEADERS, timeout=httpx.Timeout(60, read=1.5))
    stats = smol_server.wait_idle(timeout=20)
    assert stats["kv_blocks_used"] == 0
    assert stats["generated_tokens"] - before < 2000  # cancelled, not run to the end
