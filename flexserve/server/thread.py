"""`ServerThread`: an app served by uvicorn in a background thread, on a port chosen by the OS.

The socket is bound before the thread starts, so the port is known at once and no other process can take it
in between. Used by the tests and by `flexserve bench serve --launch`.
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


class ServerThread:
    """`with ServerThread(app) as srv: ... srv.url ...`; stopping drains in-flight requests."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=drain_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="flexserve-http", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:41234 (the OpenAI base_url is this + /v1)."""
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # SystemExit on startup failure included: report it to start()
            self.error = e

    def start(self, timeout: float = 120.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {self.error!r}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
