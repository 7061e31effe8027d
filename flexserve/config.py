"""`ModelConfig`: one dataclass that describes every supported model family.

A family is a handful of switches here (norm kind, activation, biases, positional encoding), not a forked
model file. Configs come from a Hugging Face `config.json`, from GGUF metadata (see `weights/gguf_reader.py`), or
from a named preset shape (`opt-30b`, `llama-3-70b`, ...) used with dummy weights for benchmarks.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError

# The embedding pseudo-layer's tables: placed like any weight, but never packed by weight compression (rows
# are gathered from them), and a tied LM head reuses `embed.weight` as it is.
EMBED_KEYS = ("embed.weight", "pos_embed.weight", "project_in.weight")

OPT_ARCHS = {"OPTForCausalLM", "OPTModel"}
LLAMA_ARCHS = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "LlamaModel", "MistralModel", "Qwen2Model",
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and layer switches of a decoder-only transformer.

    `family` is "opt" or "llama" (Llama 2/3, Mistral, Qwen2 and SmolLM2 are all "llama" with switches).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    activation: str = "silu"  # "silu" | "relu" | "gelu"
    gated_mlp: bool = True  # SwiGLU (gate * up) vs a plain fc1 -> act -> fc2
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    tie_word_embeddings: bool = False
    positional: str = "rope"  # "rope" | "learned"
    learned_pos_offset: int = 2  # OPT's learned positions start at index 2
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # linear or llama3 (HF's keys); GGUF files may add "freq_factors"
    pre_norm: bool = True  # OPT-350m is post-norm
    word_embed_proj_dim: int = 0  # OPT-350m projects embeddings; 0 means hidden_size
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.family not in ("opt", "llama"):
            raise ModelLoadError(f"unknown model family {self.family!r}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")

    # --- derived sizes (used by the planner and the offload executor) -------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def layer_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical per-layer weight names and shapes (after q/k/v and gate/up fusion)."""
        d, i = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "attn_norm.weight": (d,),
            "qkv.weight": (self.q_size + 2 * self.kv_size, d),
            "o.weight": (d, self.q_size),
            "mlp_norm.weight": (d,),
            "up.weight": ((2 * i if self.gated_mlp else i), d),
            "down.weight": (d, i),
        }
        if self.norm_bias:
            shapes["attn_norm.bias"] = (d,)
            shapes["mlp_norm.bias"] = (d,)
        if self.qkv_bias:
            shapes["qkv.bias"] = (self.q_size + 2 * self.kv_size,)
        if self.o_bias:
            shapes["o.bias"] = (d,)
        if self.mlp_bias:
            shapes["up.bias"] = ((2 * i if self.gated_mlp else i),)
            shapes["down.bias"] = (d,)
        return shapes

    def global_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weights outside the decoder layers: embeddings, final norm, LM head."""
        d, e = self.hidden_size, self.word_embed_proj_dim
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (self.vocab_size, e)}
        if self.pre_norm:  # post-norm OPT (350m) has no final norm
            shapes["final_norm.weight"] = (d,)
            if self.norm_bias:
                shapes["final_norm.bias"] = (d,)
        if self.positional == "learned":
            shapes["pos_embed.weight"] = (self.max_position + self.learned_pos_offset, d)
        if e != d:
            shapes["project_in.weight"] = (d, e)
            shapes["project_out.weight"] = (e, d)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, e)
        return shapes

    def layer_weight_sizes(self) -> dict[str, int]:
        """Elements of each per-layer weight (what the placement rule lays out)."""
        return {name: _prod(shape) for name, shape in self.layer_weight_shapes().items()}

    def num_layer_params(self) -> int:
        return sum(self.layer_weight_sizes().values())

    def num_params(self) -> int:
        return self.num_layers * self.num_layer_params() + sum(_prod(s) for s in self.global_weight_shapes().values())

    def num_embed_params(self) -> int:
        return sum(_prod(s) for k, s in self.global_weight_shapes().items() if k in EMBED_KEYS)

    def stored_weight_bytes(self, dtype_bytes: int, packed_ratio: float = 1.0) -> float:
        """Every weight byte as stored: embedding tables at full width, the rest at `packed_ratio` of it
        (the compression ratio under weight compression, else 1)."""
        embed = self.num_embed_params()
        return (embed + (self.num_params() - embed) * packed_ratio) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V for one token across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- from Hugging Face config.json -------------------------------------------------------------------------
def from_hf_dict(cfg: dict[str, Any], name: str = "") -> ModelConfig:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    if model_type == "opt" or OPT_ARCHS & set(archs):
        return _opt_from_hf(cfg, name)
    if model_type in ("llama", "mistral", "qwen2") or LLAMA_ARCHS & set(archs):
        return _llama_from_hf(cfg, name)
    raise ModelLoadError(
        f"unsupported architecture {archs or model_type!r} in {name or 'config.json'}: "
        "flexserve supports OPT and the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2)")


def _opt_from_hf(cfg: dict[str, Any], name: str) -> ModelConfig:
    act = cfg.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ModelLoadError(f"OPT activation {act!r} is not supported")
    return ModelConfig(
        family="opt", name=name,
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["ffn_dim"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_attention_heads"], max_position=cfg.get("max_position_embeddings", 2048),
        norm="layernorm", norm_eps=1e-5, activation=act, gated_mlp=False,
        qkv_bias=cfg.get("enable_bias", True), o_bias=cfg.get("enable_bias", True),
        mlp_bias=cfg.get("enable_bias", True), norm_bias=cfg.get("layer_norm_elementwise_affine", True),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), positional="learned",
        pre_norm=cfg.get("do_layer_norm_before", True),
        word_embed_proj_dim=cfg.get("word_embed_proj_dim", cfg["hidden_size"]),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _llama_from_hf(cfg: dict[str, Any], name: str) -> ModelConfig:
    model_type = cfg.get("model_type", "llama")
    heads = cfg["num_attention_heads"]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"activation {act!r} is not supported for {model_type}")
    rope_theta = cfg.get("rope_theta")
    rope_scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")  # transformers 5 nests rope settings here
    if isinstance(params, dict):
        rope_theta = params.get("rope_theta", rope_theta)
        if params.get("rope_type", "default") != "default":
            rope_scaling = params
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if kind not in ("default", "llama3", "linear"):
            raise ModelLoadError(f"rope scaling {kind!r} is not supported (default, linear and llama3 are)")
        if kind == "default":
            rope_scaling = None
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    return ModelConfig(
        family="llama", name=name,
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position=cfg.get("max_position_embeddings", 4096),
        norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6), activation="silu", gated_mlp=True,
        qkv_bias=cfg.get("attention_bias", model_type == "qwen2"), o_bias=False if model_type == "qwen2"
        else cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), positional="rope",
        rope_theta=float(rope_theta or 10000.0), rope_scaling=dict(rope_scaling) if rope_scaling else None,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos, pad_token_id=cfg.get("pad_token_id"),
    )


def load_hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"no config.json in {folder}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    try:
        return from_hf_dict(data, name=os.path.basename(os.path.normpath(folder)))
    except KeyError as e:
        raise ModelLoadError(f"{path} lacks the field {e}") from None


# --- presets (benchmark shapes with dummy weights) ---------------------------------------------------------
def _opt(layers: int, hidden: int, heads: int) -> dict[str, Any]:
    return dict(model_type="opt", vocab_size=50272, hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=2048, bos_token_id=2, eos_token_id=2,
                pad_token_id=1)


def _llama(layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int, ctx: int, theta: float,
           scaling: dict | None = None, **kw: Any) -> dict[str, Any]:
    return dict(model_type=kw.pop("model_type", "llama"), vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, max_position_embeddings=ctx, rope_theta=theta, rope_scaling=scaling,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **kw)


_LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)

PRESETS: dict[str, dict[str, Any]] = {
    "opt-125m": _opt(12, 768, 12),
    "opt-1.3b": _opt(24, 2048, 32),
    "opt-2.7b": _opt(32, 2560, 32),
    "opt-6.7b": _opt(32, 4096, 32),
    "opt-13b": _opt(40, 5120, 40),
    "opt-30b": _opt(48, 7168, 56),
    "opt-66b": _opt(64, 9216, 72),
    "opt-175b": _opt(96, 12288, 96),
    "llama-2-7b": _llama(32, 4096, 11008, 32, 32, 32000, 4096, 10000.0),
    "llama-2-13b": _llama(40, 5120, 13824, 40, 40, 32000, 4096, 10000.0),
    "llama-2-70b": _llama(80, 8192, 28672, 64, 8, 32000, 4096, 10000.0),
    "llama-3-8b": _llama(32, 4096, 14336, 32, 8, 128256, 8192, 500000.0),
    "llama-3-70b": _llama(80, 8192, 28672, 64, 8, 128256, 8192, 500000.0),
    "llama-3.1-8b": _llama(32, 4096, 14336, 32, 8, 128256, 131072, 500000.0, _LLAMA3_SCALING),
    "llama-3.1-70b": _llama(80, 8192, 28672, 64, 8, 128256, 131072, 500000.0, _LLAMA3_SCALING),
    "mistral-7b": _llama(32, 4096, 14336, 32, 8, 32000, 32768, 1000000.0, model_type="mistral"),
    "qwen2-7b": _llama(28, 3584, 18944, 28, 4, 152064, 32768, 1000000.0, model_type="qwen2"),
    "smollm2-135m": _llama(30, 576, 1536, 9, 3, 49152, 8192, 100000.0, tie_word_embeddings=True),
}


def preset(name: str) -> ModelConfig:
    key = name.lower().split("/")[-1]
    if key not in PRESETS:
        raise ModelLoadError(f"unknown preset shape {name!r}; known: {', '.join(sorted(PRESETS))}")
    return from_hf_dict(PRESETS[key], name=key)
