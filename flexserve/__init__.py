"""flexserve: run LLMs larger than your GPU (FlexGen-style offloading) and serve them online (FastServe-style)."""
from .engine import LLM, CompletionOutput, RequestOutput, SamplingParams
from .errors import FlexServeError, ModelLoadError, PolicyError, PromptTooLongError, RequestError
from .offload.policy import Policy

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "Policy", "RequestOutput", "CompletionOutput", "FlexServeError",
           "ModelLoadError", "PolicyError", "PromptTooLongError", "RequestError"]
