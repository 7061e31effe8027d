"""What the planner plans for, from the strings a user gives: a model's shape and the width of its dtype.

Only configs are read, never weights, so that `flexserve plan` answers for a 175B model on a laptop.
"""
from __future__ import annotations

from ..config import ModelConfig
from ..models.loading import model_config

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def resolve_model_config(model: str | None) -> ModelConfig:
    """The shape of a model string: a preset name (`opt-30b`, `dummy:opt-30b`, `facebook/opt-30b`), an HF
    folder (its config.json alone), a GGUF file, or None for the default model. A plan may be for a model that
    is not on this machine, hence the bare preset names."""
    return model_config(model, presets=True)
