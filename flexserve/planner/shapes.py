"""What the planner plans for, from the strings a user gives: a model's shape and the width of its dtype.

Only configs are read, never weights, so that `flexserve plan` answers for a 175B model on a laptop.
"""
from __future__ import annotations

import os

from ..config import ModelConfig, load_hf_config, preset
from ..errors import ModelLoadError

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def resolve_model_config(model: str | None) -> ModelConfig:
    """The shape of a model string: a preset name (`opt-30b`, `dummy:opt-30b`, `facebook/opt-30b`), an HF
    folder, a GGUF file, or None for the default model."""
    if model is None or (os.path.isfile(model) and model.endswith(".gguf")):
        from ..weights import open_source  # a GGUF source reads its header and tensor index, not the weights

        return open_source(model).config
    if model.startswith("dummy:"):
        return preset(model[len("dummy:"):])
    if os.path.isdir(model):
        return load_hf_config(model)
    try:
        return preset(model)
    except ModelLoadError as e:
        if os.path.exists(model) or model.endswith(".gguf") or os.sep in model:
            raise ModelLoadError(f"model {model!r} is neither a Hugging Face folder, a .gguf file nor a preset "
                                 f"shape ({e})") from None
        raise
