"""Hugging Face folders: config.json plus one or many (indexed) *.safetensors files, read lazily.

An AutoAWQ checkpoint (config.json's `quantization_config`, see `awq_blocks`) stores its decoder projections as
4-bit `qweight`/`qzeros`/`scales` triples. They are read dense (dequantised in float32, exactly) unless
`keep_quantized()` was called, which the offload layer does for such a folder by default: then the dense
layers' projections (q, k, v, o, gate, up, down) come back as `AWQBlocks`, to be held as 4-bit weights. Every
other quantisation in a config.json is refused when the folder is opened.
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig, load_hf_config
from ..errors import ModelLoadError
from .awq_blocks import SCHEME, SUFFIXES, AWQBlocks, AWQFormat, awq_format
from .base import Tensors, finish_globals

# Checkpoint name -> raw part name, per family. "{i}" is the layer index.
_OPT_LAYER = {
    "self_attn_layer_norm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
    "self_attn.v_proj": "v", "self_attn.out_proj": "o", "final_layer_norm": "mlp_norm", "fc1": "up", "fc2": "down",
}
_LLAMA_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.o_proj": "o", "post_attention_layernorm": "mlp_norm", "mlp.gate_proj": "gate",
    "mlp.up_proj": "up", "mlp.down_proj": "down", "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
    "block_sparse_moe.gate": "router", "mlp.gate": "router", "mlp.shared_expert_gate": "shared_gate",
    "mlp.shared_expert.gate_proj": "shared.gate", "mlp.shared_expert.up_proj": "shared.up",
    "mlp.shared_expert.down_proj": "shared.down",
}
# Routed experts: Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen's `mlp.experts.{e}.gate_proj/...`.
_EXPERT_RE = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)$")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_OPT_GLOBAL = {
    "decoder.embed_tokens": "embed", "decoder.embed_positions": "pos_embed", "decoder.final_layer_norm":
    "final_norm", "decoder.project_in": "project_in", "decoder.project_out": "project_out", "lm_head": "lm_head",
}
_LLAMA_GLOBAL = {"embed_tokens": "embed", "norm": "final_norm", "lm_head": "lm_head"}
_LAYER_RE = re.compile(r"^(?:model\.)?(?:decoder\.)?layers\.(\d+)\.(.+)\.(weight|bias|qweight|qzeros|scales)$")
# The raw parts an AWQ checkpoint's projections may be kept as (experts and shared experts are read dense: the
# expert offloader moves plain tensors).
_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def _expert_part(stem: str) -> str | None:
    """`experts.{e}.gate` / `.up` / `.down` for a routed expert's checkpoint name, else None."""
    m = _EXPERT_RE.match(stem)
    part = _EXPERT_PART.get(m.group(2)) if m else None
    return None if part is None else f"experts.{m.group(1)}.{part}"


class SafetensorsSource:
    """Lazy reader of a Hugging Face safetensors folder (single file or sharded with an index)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.config: ModelConfig = load_hf_config(folder)
        self.awq: AWQFormat | None = awq_format(self._raw_config(), folder)
        self.is_keeping_quantized = False
        self._handles: dict[str, object] = {}
        self._files = self._index()
        layer_map = _OPT_LAYER if self.config.family == "opt" else _LLAMA_LAYER
        global_map = _OPT_GLOBAL if self.config.family == "opt" else _LLAMA_GLOBAL
        self._layers: dict[int, dict[str, str]] = {}
        self._globals: dict[str, str] = {}
        for name in self._files:
            m = _LAYER_RE.match(name)
            if m and m.group(3) in SUFFIXES and self.awq is None:
                continue  # AWQ's tensor names mean nothing in a dense checkpoint
            if m:
                part = layer_map.get(m.group(2)) or (None if self.config.family == "opt" else _expert_part(m.group(2)))
                if part is not None:
                    self._layers.setdefault(int(m.group(1)), {})[f"{part}.{m.group(3)}"] = name
                continue
            stem, _, kind = name.rpartition(".")
            stem = stem.removeprefix("model.")
            if stem in global_map:
                self._globals[f"{global_map[stem]}.{kind}"] = name
        missing = [i for i in range(self.config.num_layers) if i not in self._layers]
        if missing:
            raise ModelLoadError(f"{folder}: the checkpoint lacks decoder layers {missing[:5]}"
                                 f"{'...' if len(missing) > 5 else ''}")

    def _raw_config(self) -> dict:
        """config.json as read (load_hf_config has checked it is valid JSON)."""
        with open(os.path.join(self.folder, "config.json")) as f:
            return json.load(f)

    @property
    def stored_scheme(self) -> str | None:
        """The `--quantization` scheme that keeps this checkpoint's stored weights: `awq-checkpoint` for an
        AWQ folder, else None."""
        return None if self.awq is None else SCHEME

    @property
    def default_scheme(self) -> str | None:
        """The scheme this folder loads with when none is asked for: an AWQ checkpoint's own 4-bit weights, as
        it has no dense ones (reading them dense would hold about four times the memory)."""
        return self.stored_scheme

    def keep_quantized(self) -> int:
        """From now on hand over the dense layers' AWQ projections as `AWQBlocks` (module docstring); returns
        how many tensors that keeps."""
        self.is_keeping_quantized = True
        return sum(1 for names in self._layers.values() for part in names
                   if part.endswith(".qweight") and part.split(".")[0] in _PROJECTIONS)

    def _index(self) -> dict[str, str]:
        """Tensor name -> file, from the shard index or by opening every *.safetensors file."""
        index = os.path.join(self.folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from None
            for shard in set(weight_map.values()):
                if not os.path.isfile(os.path.join(self.folder, shard)):
                    raise ModelLoadError(f"{self.folder}: shard {shard} named in the index is missing")
            return {k: os.path.join(self.folder, v) for k, v in weight_map.items()}
        files = sorted(f for f in os.listdir(self.folder) if f.endswith(".safetensors"))
        if not files:
            raise ModelLoadError(f"{self.folder}: no *.safetensors files (other formats are not supported)")
        out: dict[str, str] = {}
        for f in files:
            path = os.path.join(self.folder, f)
            for key in self._open(path).keys():
                out[key] = path
        return out

    def _open(self, path: str):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"{path} is corrupt or truncated: {e}") from None
        return self._handles[path]

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._files[name]).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{self._files[name]}: cannot read {name}: {e}") from None

    def global_parts(self) -> Tensors:
        return finish_globals(self.config, {k: self._get(v) for k, v in self._globals.items()})

    def layer_parts(self, index: int) -> Tensors:
        names = self._layers[index]
        parts = {k: self._get(v) for k, v in names.items() if k.rpartition(".")[2] not in SUFFIXES}
        for stem in sorted({k.rpartition(".")[0] for k in names if k.rpartition(".")[2] in SUFFIXES}):
            blocks = self._awq_blocks(index, stem, names)
            is_kept = self.is_keeping_quantized and stem in _PROJECTIONS
            parts[f"{stem}.weight"] = blocks if is_kept else blocks.dequantize()
        return parts

    def _awq_blocks(self, index: int, stem: str, names: dict[str, str]) -> AWQBlocks:
        """The AWQ triple of raw part `stem` in layer `index`, checked to fit together."""
        missing = [s for s in SUFFIXES if f"{stem}.{s}" not in names]
        if missing:
            raise ModelLoadError(f"{self.folder}: layer {index}'s {stem} projection lacks its AWQ tensor(s) "
                                 f"{', '.join(missing)}")
        try:
            return AWQBlocks(*(self._get(names[f"{stem}.{s}"]) for s in SUFFIXES), self.awq.group_size)
        except ModelLoadError as e:
            raise ModelLoadError(f"{self.folder}: layer {index}'s {stem} projection: {e}") from None
