"""flexserve: run LLMs larger than your GPU (FlexGen-style offloading) and serve them online (FastServe-style).

The top-level names are imported lazily, so that torch-free parts (`flexserve.scheduler`, the simulator)
can be used without importing torch.
"""
from __future__ import annotations

import importlib

from .errors import FlexServeError, ModelLoadError, PolicyError, PromptTooLongError, RequestError

__version__ = "0.1.0"
_LAZY = {
    "LLM": "flexserve.engine.llm", "SamplingParams": "flexserve.engine.sampling",
    "RequestOutput": "flexserve.engine.outputs", "CompletionOutput": "flexserve.engine.outputs",
    "Policy": "flexserve.offload.policy",
}
__all__ = ["LLM", "SamplingParams", "Policy", "RequestOutput", "CompletionOutput", "FlexServeError",
           "ModelLoadError", "PolicyError", "PromptTooLongError", "RequestError"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flexserve' has no attribute {name!r}")
