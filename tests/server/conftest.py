"""Servers started by the tests on 127.0.0.1 (a free port), each in a background thread.

`smol_server`: the default SmolLM2 model (real tokenizer, chat template) with an API key, shared by the module
tests. Tiny random models (tests/conftest.py) serve the cases that need their own engine settings.
"""
from __future__ import annotations

import time

import openai
import pytest

from flexserve.engine.serving import AsyncEngine, EngineConfig
from flexserve.server import ServerThread, build_app

API_KEY = "test-key"


class Served:
    """An engine behind a running server."""

    def __init__(self, engine: AsyncEngine, api_key: str | None = None, **app_kw):
        self.engine = engine
        self.api_key = api_key
        self.thread = ServerThread(build_app(engine, api_key=api_key, **app_kw)).start()
        self.url = self.thread.url
        self.model = app_kw.get("served_model_name") or engine.model_name

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Engine stats once no request holds a KV block (or fail after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stats = self.engine.stats()
            except RuntimeError:  # the engine thread changed its tables mid-read
                continue
            if stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
                return stats
            assert time.monotonic() < deadline, f"engine still busy: {stats}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture(scope="session")
def smol_server():
    engine = AsyncEngine(EngineConfig(device="cpu", num_gpu_blocks=768, num_cpu_blocks=64, max_num_seqs=16,
                                      scheduler="skip-join-mlfq"))
    served = Served(engine, API_KEY)
    yield served
    served.stop()


@pytest.fixture
def client(smol_server) -> openai.OpenAI:
    return smol_server.client()
