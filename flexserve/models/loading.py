"""How a model string becomes what runs it: its shape, its weight source, the compute device and the dtype.

Model strings are those of `flexserve.weights`: a Hugging Face folder, a `.gguf` file, `dummy:PRESET`, or None
for the default model. Every front end opens its model here (the offline `LLM`, the serving engine, parallel
generation, the benchmarks) and every tool that only needs a model's shape asks `model_config`, so the
default-model lookup, the dtype rule and the set-up of random weights are decided in one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import ModelConfig, load_hf_config, preset
from ..errors import ModelLoadError, PolicyError
from ..weights import DummySource, WeightSource, open_source, resolve_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device, a GPU always with its index: tensors report `cuda:N`, device comparisons and
    threads that select the device by index need the same."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PolicyError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PolicyError("--device cuda was asked for but this machine has no usable CUDA GPU")
    if dev.type not in ("cuda", "cpu"):
        raise PolicyError(f"device {device!r} is not supported (use cuda or cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, family: str) -> torch.dtype:
    """The runtime dtype: `auto` is float32 on a CPU (half-precision CPU matmuls are slow and less exact),
    float16 for OPT on a GPU (its checkpoints are fp16) and bfloat16 for the others."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if family == "opt" else torch.bfloat16
    if dtype not in DTYPES:
        raise PolicyError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_config(model: str | None, presets: bool = False) -> ModelConfig:
    """The shape of a model string, without reading its weights (a GGUF file's header is read).

    With `presets` (planning for a model that need not be on this machine) a folder needs only its
    config.json, and a bare preset name is accepted too (`opt-30b`, `facebook/opt-30b`)."""
    if not presets or model is None or model.startswith("dummy:") or (os.path.isfile(model)
                                                                     and model.endswith(".gguf")):
        return open_source(model).config
    if os.path.isdir(model):
        return load_hf_config(model)
    try:
        return preset(model)
    except ModelLoadError as e:
        if os.path.exists(model) or model.endswith(".gguf") or os.sep in model:
            raise ModelLoadError(f"model {model!r} is neither a Hugging Face folder, a .gguf file nor a preset "
                                 f"shape ({e})") from None
        raise


@dataclass
class OpenModel:
    """A model ready to be placed: where it came from, its lazy weight source, the device and dtype to run in."""

    path: str  # the folder, file or `dummy:PRESET` (what the tokenizer reads)
    source: WeightSource
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self) -> ModelConfig:
        return self.source.config


def open_model(model: str | None, dtype: str | torch.dtype = "auto",
               device: str | torch.device | None = None) -> OpenModel:
    """Resolve a model string, device and dtype. Nothing is read but the config (readers are lazy).

    Random weights are generated straight in the runtime dtype, on the GPU when there is one: filling there runs
    at memory bandwidth, and a 175B shape never exists as a full fp32 copy on the host."""
    path = resolve_model(model)
    dev = resolve_device(device)
    source = open_source(path, dtype=torch.float32, device="cpu")
    dt = resolve_dtype(dtype, dev, source.config.family)
    if isinstance(source, DummySource):
        source.dtype = dt
        if dev.type == "cuda":
            source.device = dev
    return OpenModel(path, source, dev, dt)
