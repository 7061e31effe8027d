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
    "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
}
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and layer switches of a decoder-only transformer.

    `family` is "opt" or "llama" (Llama 2/3, Mistral, Qwen2/3, SmolLM2, and the mixture-of-experts Mixtral,
    Qwen2-MoE and Qwen3-MoE are all "llama" with switches). With `num_experts` > 0 every decoder layer's MLP is
    a set of SwiGLU experts behind a router (`flexserve.models.moe`), each expert's weights named apart
    (`experts.{e}.up.weight`, ...) so that the expert is the unit the offloading placement moves.
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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k (weights [head_dim]) before rotary
    num_experts: int = 0  # 0: a dense MLP
    experts_per_token: int = 0  # top-k of the router
    moe_intermediate_size: int = 0  # one expert's MLP width
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an expert every token uses, behind a sigmoid gate
    norm_topk_prob: bool = True  # renormalise the chosen experts' probabilities to sum to one (Mixtral: yes)
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
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts
                                     and self.moe_intermediate_size > 0 and self.gated_mlp):
            raise ModelLoadError(
                f"model config: a mixture of {self.num_experts} experts needs 1..{self.num_experts} experts per "
                f"token (got {self.experts_per_token}), a positive moe_intermediate_size and a gated MLP")

    # --- derived sizes (used by the planner and the offload executor) -------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
        }
        if self.qk_norm:
            shapes["q_norm.weight"] = shapes["k_norm.weight"] = (self.head_dim,)
        if self.is_moe:
            shapes.update(self.moe_weight_shapes())
        else:
            shapes["up.weight"] = ((2 * i if self.gated_mlp else i), d)
            shapes["down.weight"] = (d, i)
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

    def moe_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The sparse MLP's weights: the router, each expert's fused gate/up and down, the shared expert."""
        d, m, sh = self.hidden_size, self.moe_intermediate_size, self.shared_expert_intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"router.weight": (self.num_experts, d)}
        for e in range(self.num_experts):
            shapes[f"experts.{e}.up.weight"] = (2 * m, d)
            shapes[f"experts.{e}.down.weight"] = (d, m)
        if sh:
            shapes.update({"shared.up.weight": (2 * sh, d), "shared.down.weight": (d, sh),
                           "shared_gate.weight": (1, d)})
        return shapes

    def expert_params(self) -> int:
        """Parameters of one routed expert (0 for a dense model)."""
        return 3 * self.hidden_size * self.moe_intermediate_size if self.is_moe else 0

    def active_layer_params(self) -> int:
        """Parameters of a decoder layer one token computes with: all but the experts it is not routed to."""
        return self.num_layer_params() - (self.num_experts - self.experts_per_token) * self.expert_params()

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
    if model_type in LLAMA_TYPES or LLAMA_ARCHS & set(archs):
        return _llama_from_hf(cfg, name)
    raise ModelLoadError(
        f"unsupported architecture {archs or model_type!r} in {name or 'config.json'}: "
        "flexserve supports OPT, the Llama family (Llama 2/3, Mistral, Qwen2/3, SmolLM2) and the mixtures of "
        "experts Mixtral, Qwen2-MoE and Qwen3-MoE")


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
    qwen2 = model_type in ("qwen2", "qwen2_moe")
    return ModelConfig(
        family="llama", name=name,
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position=cfg.get("max_position_embeddings", 4096),
        norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6), activation="silu", gated_mlp=True,
        qkv_bias=cfg.get("attention_bias", cfg.get("qkv_bias", qwen2)), o_bias=False if qwen2
        else cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
        qk_norm=model_type in ("qwen3", "qwen3_moe"), **_moe_from_hf(cfg, model_type),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), positional="rope",
        rope_theta=float(rope_theta or 10000.0), rope_scaling=dict(rope_scaling) if rope_scaling else None,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos, pad_token_id=cfg.get("pad_token_id"),
    )


def _moe_from_hf(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts switches of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json (none for a dense one).

    Mixtral's experts have the model's `intermediate_size` and always renormalise the top-k probabilities;
    the Qwen ones have their own width and say whether they renormalise. Models that interleave dense and
    sparse layers (`decoder_sparse_step` > 1, `mlp_only_layers`) are refused: every layer here has one shape."""
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if model_type not in ("mixtral", "qwen2_moe", "qwen3_moe") or not experts:
        return {}
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise ModelLoadError(f"{model_type}: dense layers between the sparse ones (decoder_sparse_step, "
                             "mlp_only_layers) are not supported")
    mixtral = model_type == "mixtral"
    return dict(num_experts=int(experts), experts_per_token=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=int(cfg["intermediate_size"] if mixtral else cfg["moe_intermediate_size"]),
                shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
                if model_type == "qwen2_moe" else 0,
                norm_topk_prob=True if mixtral else bool(cfg.get("norm_topk_prob", False)))


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
    "mixtral-8x7b": _llama(32, 4096, 14336, 32, 8, 32000, 32768, 1000000.0, model_type="mixtral",
                           num_local_experts=8, num_experts_per_tok=2),
    "mixtral-8x22b": _llama(56, 6144, 16384, 48, 8, 32768, 65536, 1000000.0, model_type="mixtral",
                            num_local_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": _llama(48, 2048, 6144, 32, 4, 151936, 40960, 1000000.0, model_type="qwen3_moe", head_dim=128,
                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    "qwen3-235b-a22b": _llama(94, 4096, 12288, 64, 4, 151936, 40960, 1000000.0, model_type="qwen3_moe",
                              head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536,
                              norm_topk_prob=True),
}


def preset(name: str) -> ModelConfig:
    key = name.lower().split("/")[-1]
    if key not in PRESETS:
        raise ModelLoadError(f"unknown preset shape {name!r}; known: {', '.join(sorted(PRESETS))}")
    return from_hf_dict(PRESETS[key], name=key)
