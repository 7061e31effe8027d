"""The FastAPI app (`build_app`) and the server behind `flexserve serve` (`run_server`).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (all behind `--api-key` when set),
GET /health and GET /metrics (always open, for load balancers and Prometheus). The app owns the engine's
life: the lifespan starts the engine thread on the server's event loop and, on shutdown, drains it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from ..errors import ConfigError
from .completions import serve_request
from .errors import APIError, from_exception, from_validation_error, install_handlers
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from ..engine.serving import EngineConfig


@dataclass(frozen=True)
class ServerOptions:
    """How `run_server` serves: where it listens, who may call it, how it drains on shutdown."""

    host: str = "127.0.0.1"  # this machine only, unless told otherwise
    port: int = 8000
    api_key: str | None = None  # None: FLEXSERVE_API_KEY if set, else an open server
    served_model_name: str | None = None  # None: the model's own name
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after Ctrl-C
    log_level: str = "info"
    engine_process: bool | None = None  # None: a child process on a GPU, this one on a CPU (`make_engine`)

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be an integer within 1..65535, got {self.port!r}")
        if not self.drain_timeout >= 0:
            raise ConfigError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout!r}")
        if not self.host:
            raise ConfigError("--host must not be empty")

    def check_bind(self) -> None:
        """Bind the address for a moment, so that a port in use or an address this machine does not have is
        reported before the model loads rather than after."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as e:
            raise ConfigError(f"--host {self.host!r} is not an address of this machine: {e}") from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as e:
                reason = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
                raise ConfigError(f"cannot serve on {self.host}:{self.port} (--host/--port): {reason}") from None


class AppState:
    """What every handler needs: the engine, the served name, the key, the metrics."""

    def __init__(self, engine, api_key: str | None, served_model_name: str | None):
        self.engine = engine
        self.api_key = api_key
        self.model_name = served_model_name or engine.model_name
        # Clients may also name the model by the path or file name it was loaded from.
        self.model_aliases = {self.model_name, engine.model_name, getattr(engine, "model_path", None)} - {None}
        self.max_position = engine.model_config.max_position
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())
        self.is_shutting_down = False

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_aliases:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not token or scheme.lower() != "bearer":
            raise APIError(401, "missing API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
        if not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")


async def parse_body(request: Request, model_cls):
    """The JSON body as `model_cls`; malformed JSON and bad values are 400s in OpenAI's format."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def build_app(engine, api_key: str | None = None, served_model_name: str | None = None,
              drain_timeout: float = 30.0) -> FastAPI:
    """An OpenAI-compatible app around `engine` (an `AsyncEngine`, not yet started: the lifespan starts it)."""
    state = AppState(engine, api_key, served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        # Load the tokenizer now rather than in the first request (seconds for a GGUF model); a model without
        # one still serves token-id prompts, and text prompts then get a 400 naming the cause.
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(None, lambda: engine.tokenizer.hf)
        engine.start()
        try:
            if str(getattr(engine, "device", "cpu")).startswith("cuda"):  # compile and capture before serving
                await engine.warm_up()
            yield
        finally:
            state.is_shutting_down = True
            await engine.shutdown(drain=True, timeout=drain_timeout)

    app = FastAPI(title="flexserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.flexserve = state
    install_handlers(app, on_error=lambda err: state.metrics.errors.labels(str(err.status)).inc())

    async def require_key(request: Request) -> None:
        state.check_api_key(request)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    async def handle(request: Request, model_cls):
        try:
            body = await parse_body(request, model_cls)
            return await serve_request(state, body, request)
        except Exception as e:  # the engine's and scheduler's errors carry their HTTP status
            err = from_exception(e, "messages" if model_cls is ChatCompletionRequest else "prompt")
            state.metrics.errors.labels(str(err.status)).inc()
            return err.response()

    @v1.post("/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest)

    @v1.get("/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "flexserve",
                "max_model_len": state.max_position, "vocab_size": engine.model_config.vocab_size}
        return {"object": "list", "data": [card]}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        error = getattr(engine, "error", None)
        if error is not None:
            return JSONResponse({"status": "error", "detail": str(error)}, status_code=503)
        return {"status": "shutting_down" if state.is_shutting_down else "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class QuietServer(uvicorn.Server):
    """uvicorn's server, except that a Ctrl-C (or SIGTERM) that led to a clean drain is not re-raised once the
    server stops, so `flexserve serve` exits 0. A second Ctrl-C still forces the exit."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_server(config: EngineConfig, options: ServerOptions = ServerOptions()) -> int:
    """Load the model, serve until Ctrl-C, drain in-flight requests; the exit status (0 after a clean drain)."""
    from ..engine.remote import make_engine

    logging.basicConfig(level=getattr(logging, options.log_level.upper()),
                        format="%(levelname)s %(name)s: %(message)s")
    api_key = options.api_key or os.environ.get("FLEXSERVE_API_KEY") or None
    options.check_bind()
    from ..weights import resolve_model

    path = resolve_model(config.model)  # a missing model or an uncached hub id fails here, in one line
    if config.model and path != config.model and options.served_model_name is None:  # a hub id: serve by it
        options = dataclasses.replace(options, served_model_name=config.model)
    config = dataclasses.replace(config, model=path)
    print(f"flexserve: loading {config.model} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    engine = make_engine(config, options.engine_process)
    print(f"flexserve: model loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    if engine.tp is not None and not engine.tp.is_driver:  # torchrun rank > 0: follow rank 0's steps
        from ..parallel.serving import exit_worker

        engine.run_worker()
        exit_worker(0)
    app = build_app(engine, api_key, options.served_model_name, drain_timeout=options.drain_timeout)
    name = app.state.flexserve.model_name
    print(engine.settings.summary(), flush=True)  # the pool, seats and token budget it chose, and why
    print(f"flexserve: serving {name!r} ({engine.config.scheduler}) at http://{options.host}:{options.port}/v1"
          f"{' (API key required)' if api_key else ''}; Ctrl-C drains and stops", flush=True)
    uv_config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                               lifespan="on", timeout_graceful_shutdown=options.drain_timeout)
    try:
        server = QuietServer(uv_config)
        server.run()
        if not server.started:  # uvicorn could not bind (bad host, port in use) and returned quietly
            print(f"flexserve: error: could not serve on {options.host}:{options.port} (see the log above)",
                  file=sys.stderr)
            return 1
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind or start
        return int(e.code or 0)
    return 0 if getattr(engine, "error", None) is None else 1
