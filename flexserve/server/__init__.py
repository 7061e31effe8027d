"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the online engine: streaming, errors, metrics.

See docs/SERVER.md. `build_app(engine)` makes the app; `run_server(config, options)` loads an engine and serves
it (`flexserve serve`); `ServerThread` runs an app in a background thread (tests, `flexserve bench serve --launch`).
"""
from .app import build_app, run_server
from .thread import ServerThread

__all__ = ["build_app", "run_server", "ServerThread"]
