"""Byte and parameter counts of a model under a policy's storage options (dtype, group-wise compression).

Kept apart from the cost model so that the search can check feasibility ("350 GB of weights but 100 GB of
memory") from the same numbers the cost model uses.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..compression.config import compression_ratio, kv_ratio, layer_ratio, stored_bytes_with_layers_at
from ..config import EMBED_KEYS, ModelConfig
from ..offload.policy import Policy


def dtype_name(dtype_bytes: int) -> str:
    return {2: "float16", 4: "float32"}.get(dtype_bytes, "float16")


@dataclass(frozen=True)
class Sizes:
    """Per-layer and whole-model sizes in bytes; `*16` are the uncompressed (compute dtype) sizes."""

    layer_params: int
    layer_w: float  # one decoder layer as stored (compressed if compress_weight)
    layer_w16: float
    embed_w: float  # the embed pseudo-layer's weights as stored
    head_w: float  # the head pseudo-layer's weights as stored (a tied embedding is moved again here)
    head_w16: float
    head_params: int
    total_w: float  # every unique weight byte as stored
    total_w16: float
    kv_token: float  # K and V of one token in one layer as stored
    kv_token16: float
    up_dim: int


def _params(shapes: dict[str, tuple[int, ...]]) -> int:
    n = 0
    for shape in shapes.values():
        k = 1
        for d in shape:
            k *= d
        n += k
    return n


def model_sizes(config: ModelConfig, policy: Policy, dtype_bytes: int = 2) -> Sizes:
    """Sizes of `config`'s weights and cache under `policy`'s compression options."""
    b = dtype_bytes
    wr = compression_ratio(policy.comp_num_bits, policy.comp_group_size, b) if policy.compress_weight else 1.0
    cr = compression_ratio(policy.comp_num_bits, policy.comp_group_size, b) if policy.compress_cache else 1.0
    cr *= kv_ratio(policy.kv_cache_dtype, b)
    lr = layer_ratio(config, policy.quantization, policy.quant_group_size, b, wr)  # --quantization
    glob = config.global_weight_shapes()
    head = {k: v for k, v in glob.items() if k not in EMBED_KEYS}
    if config.tie_word_embeddings:
        head["embed.weight"] = glob["embed.weight"]
    layer_params = config.num_layer_params()
    head_params = _params(head)
    unique = config.num_params()
    kv16 = config.kv_bytes_per_token(b) / config.num_layers
    embed_params = config.num_embed_params()
    tied = _params({"embed.weight": glob["embed.weight"]}) if config.tie_word_embeddings else 0
    # Embedding tables are never packed (the executor gathers rows from them), a tied head included.
    return Sizes(
        layer_params=layer_params, layer_w=layer_params * b * lr, layer_w16=layer_params * b,
        embed_w=embed_params * b, head_w=((head_params - tied) * wr + tied) * b, head_w16=head_params * b,
        head_params=head_params, total_w=stored_bytes_with_layers_at(config, b, wr, lr), total_w16=unique * b,
        kv_token=kv16 * cr, kv_token16=kv16,
        up_dim=2 * config.intermediate_size if config.gated_mlp else config.intermediate_size,
    )
