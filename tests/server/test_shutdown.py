"""`flexserve serve` as a user runs it: Ctrl-C stops accepting, lets in-flight requests finish, exits 0."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine_flag", ["--no-engine-process", "--engine-process"])
def test_ctrl_c_drains_in_flight_requests_and_exits_0(engine_flag):
    """Ctrl-C as a terminal sends it: to the whole process group, the engine's child process included."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "flexserve.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--num-gpu-blocks", "64", "--max-num-seqs", "4", "--log-level", "warning", engine_flag],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "Count to a hundred: 1, 2,", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        tokens, done = 0, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    tokens += sum(len(c["token_ids"]) for c in json.loads(line[6:])["choices"])
                    if tokens == 3:
                        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C while the stream is mid-way
                        time.sleep(0.5)
                        try:  # no new connections while draining
                            refused = httpx.get(url + "/health", timeout=2).status_code != 200
                        except httpx.TransportError:
                            refused = True
                        assert refused
        assert done and tokens == 40  # the in-flight request was drained, not cut
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "Traceback" not in out, out
