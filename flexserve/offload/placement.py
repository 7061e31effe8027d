"""Weight placement: every tensor of every pseudo-layer goes to the GPU, CPU or disk tier by the policy.

The model is a sequence of pseudo-layers, [embed, decoder 0 .. N-1, head], as in FlexGen. Within each
pseudo-layer whole tensors go to tiers by FlexGen's midpoint rule (`assign_tiers`), so `w_gpu_percent=20`
keeps about a fifth of every layer's bytes on the GPU, as closely as whole tensors allow (`tier_shares`
gives the exact shares): the spread is the same for every layer, which keeps the per-layer transfer time
flat across the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..compression import CompressedTensor, CompressionConfig, compress
from ..compression.qweight import QuantWeight
from ..config import EMBED_KEYS, ModelConfig
from ..memory.tiers import Handle, Tier, Tiers, tier_by_fraction
from ..weights import WeightSource, layer_weights
from .experts import assign_moe_tiers, expert_index
from .policy import WEIGHT_PLACEMENTS, Policy
from .quantized import LayerQuantizer, store_quantized


# FlexGen's weight lists (flex_opt.py), in our tensor names: a decoder layer is an attention layer (q, k, v,
# out, then its norm) and an MLP layer (fc1, fc2, then its norm), each spread by itself; the input embedding
# lists the token table, then the positions; the output embedding the final norm, then the LM head.
_FLEXGEN_ORDER = (
    ("qkv.weight", "qkv.bias", "o.weight", "o.bias", "attn_norm.weight", "attn_norm.bias"),
    ("up.weight", "up.bias", "down.weight", "down.bias", "mlp_norm.weight", "mlp_norm.bias"),
    ("embed.weight", "pos_embed.weight"),
    ("final_norm.weight", "final_norm.bias", "lm_head.weight"),
)
_ATTENTION_PREFIXES = ("qkv.", "o.", "attn_norm.", "q_norm.", "k_norm.")


def _flexgen_groups(names: list[str]) -> list[list[str]]:
    """The tensors of one pseudo-layer as FlexGen's separately spread weight lists, in its order."""
    names = list(names)
    if any(n.startswith(_ATTENTION_PREFIXES) for n in names):  # a decoder layer: attention part, MLP part
        attn = [n for n in names if n.startswith(_ATTENTION_PREFIXES)]
        parts = [attn, [n for n in names if n not in attn]]
    else:
        parts = [names]
    rank = {n: i for order in _FLEXGEN_ORDER for i, n in enumerate(order)}  # position within its own list
    tied_head = "embed.weight" in names and "final_norm.weight" in names

    def key(name: str) -> tuple[int, str]:
        if tied_head and name == "embed.weight":  # the output embedding lists the (shared) table last
            return len(rank) + 1, name
        return rank.get(name, len(rank)), name

    return [sorted(part, key=key) for part in parts]


def assign_tiers(sizes: dict[str, int], gpu_percent: float, cpu_percent: float,
                 rule: str = "flexgen") -> dict[str, Tier]:
    """The tier of each tensor of one pseudo-layer; whole tensors move, so the byte shares only approximate
    the percentages (`tier_shares` gives them exactly).

    `flexgen` (default) is FlexGen's rule, so that the same `--percent` places the same bytes in both
    engines: the attention and MLP parts of a layer are laid out separately in FlexGen's order and a tensor
    goes by its midpoint to the disk share first, then the CPU's, then the GPU's (for OPT `20 80`: the
    attention output projection and the MLP's second bias and norm on the GPU, a twelfth of the bytes).
    `largest-first` is flexserve's earlier rule (largest tensor first, GPU share first: `20 80` keeps one MLP
    matrix, a third, on the GPU), kept so that measurements made with it can be reproduced."""
    if rule not in WEIGHT_PLACEMENTS:
        raise ValueError(f"weight placement must be one of {WEIGHT_PLACEMENTS}, got {rule!r}")
    out: dict[str, Tier] = {}
    if rule == "largest-first":
        total = max(sum(sizes.values()), 1)
        acc = 0
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
            out[name] = tier_by_fraction((acc + sizes[name] / 2) / total * 100, gpu_percent, cpu_percent)
            acc += sizes[name]
        return out
    disk_percent = max(0.0, 100.0 - gpu_percent - cpu_percent)
    for group in _flexgen_groups(list(sizes)):
        total = max(sum(sizes[n] for n in group), 1)
        acc = 0
        for name in group:
            mid = (acc + sizes[name] / 2) / total * 100
            acc += sizes[name]
            out[name] = Tier.DISK if mid < disk_percent else Tier.CPU if mid < disk_percent + cpu_percent \
                else Tier.GPU
    return out


def tier_shares(sizes: dict[str, int], gpu_percent: float, cpu_percent: float,
                rule: str = "flexgen") -> dict[Tier, float]:
    """Fraction of the layer's bytes that `assign_tiers` puts on each tier: what the cost model, the memory
    check and the planner must use (OPT-6.7B's `--percent 50 50` keeps 42% of each layer on the GPU under
    FlexGen's rule, two thirds under the largest-first one)."""
    return _shares(sizes, assign_tiers(sizes, gpu_percent, cpu_percent, rule))


def _shares(sizes: dict[str, int], tiers_of: dict[str, Tier]) -> dict[Tier, float]:
    total = max(sum(sizes.values()), 1)
    placed = dict.fromkeys(Tier, 0)
    for name, tier in tiers_of.items():
        placed[tier] += sizes[name]  # whole numbers: an all-GPU layer is exactly 1.0, not 0.9999999
    return {tier: n / total for tier, n in placed.items()}


def expert_shares(sizes: dict[str, int], gpu_percent: float, cpu_percent: float) -> dict[Tier, float]:
    """`tier_shares` of a mixture-of-experts layer whose experts are placed whole (`assign_moe_tiers`)."""
    return _shares(sizes, assign_moe_tiers(sizes, gpu_percent, cpu_percent))


def per_expert(names) -> bool:
    """Whether a layer's experts are placed and run one by one (`offload.experts`): any mixture-of-experts
    layer. Its experts are stored as they are or group-wise packed (`compress_weight`); `--quantization`
    quantises the attention projections and leaves the experts in the model's dtype."""
    return any(expert_index(n) is not None for n in names)


@dataclass
class CompressedHandle:
    """A weight kept group-wise quantised: its packed data, scales and minima each on a tier (the GPU's too).

    Only these bytes cross PCIe; the executor rebuilds the full tensor on the GPU after the copy (or straight
    from the packed GPU copy)."""

    parts: dict[str, Handle]  # "data", "scale", "min"
    shape: tuple[int, ...]
    dtype: torch.dtype
    config: CompressionConfig

    @property
    def tier(self) -> Tier:
        return self.parts["data"].tier

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.parts.values())

    def empty_on(self, device: torch.device) -> CompressedTensor:
        return CompressedTensor.empty(self.shape, self.dtype, self.config, device=device)

    def on_device(self, device: torch.device) -> CompressedTensor | None:
        """The packed tensor itself when every part already lives on `device` (nothing to copy), else None."""
        if any(h.data is None or h.data.device != device for h in self.parts.values()):
            return None
        return CompressedTensor(data=self.parts["data"].data, scale=self.parts["scale"].data,
                                min=self.parts["min"].data, shape=torch.Size(self.shape), dtype=self.dtype,
                                config=self.config)


@dataclass
class PseudoLayer:
    """One unit of the zig-zag schedule: its GPU-resident tensors and the handles of the offloaded ones."""

    kind: str  # "embed" | "decoder" | "head"
    index: int  # decoder index, -1 for embed/head
    resident: dict[str, torch.Tensor] = field(default_factory=dict)
    offloaded: dict[str, Handle] = field(default_factory=dict)
    gathered: set[str] = field(default_factory=set)  # offloaded tables read row by row, never moved whole
    experts: dict[str, Handle] = field(default_factory=dict)  # experts off the GPU: run one by one, never streamed

    @property
    def streamed(self) -> dict[str, Handle]:
        """The offloaded tensors that cross to the GPU whole, every time the layer runs."""
        return {n: h for n, h in self.offloaded.items() if n not in self.gathered}

    @property
    def slot_key(self) -> str:
        """Layers sharing a key share a GPU staging slot; decoders rotate over three (two load ahead)."""
        return f"decoder{self.index % 3}" if self.kind == "decoder" else self.kind

    def offloaded_bytes(self) -> int:
        return sum(h.nbytes for h in self.streamed.values())


def layer_weight_shares(config: ModelConfig, policy: Policy) -> dict[Tier, float]:
    """Fraction of a decoder layer's weights that `_place` puts on each tier under `policy` (the bulk of the
    model's bytes): what the memory check and the planner count."""
    sizes = config.layer_weight_sizes()
    if per_expert(sizes):
        return expert_shares(sizes, policy.w_gpu_percent, policy.w_cpu_percent)
    return tier_shares(sizes, policy.w_gpu_percent, policy.w_cpu_percent, policy.weight_placement)


def _placed_size(v, dtype: torch.dtype) -> int:
    """A tensor's size in elements of the model's dtype; a quantised weight counts its stored bytes the same
    way, so that the percentages split the bytes that are actually placed."""
    return v.numel() if isinstance(v, torch.Tensor) else -(-v.nbytes // dtype.itemsize)


def _place(tiers: Tiers, policy: Policy, layer: PseudoLayer, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
           shared: dict[str, tuple[str, object]] | None = None) -> None:
    sizes = {k: _placed_size(v, dtype) for k, v in tensors.items()}
    experts = per_expert(sizes)
    tiers_of = (assign_moe_tiers(sizes, policy.w_gpu_percent, policy.w_cpu_percent) if experts else
                assign_tiers(sizes, policy.w_gpu_percent, policy.w_cpu_percent, policy.weight_placement))
    for name, tier in tiers_of.items():
        if shared is not None and name in shared:
            kind, obj = shared[name]
            (layer.resident if kind == "resident" else layer.offloaded)[name] = obj
            continue
        label = f"{layer.kind}{layer.index}.{name}"
        if isinstance(tensors[name], QuantWeight):  # quantised as placed: its parts go to the tier as they are
            (layer.resident if tier is Tier.GPU else layer.offloaded)[name] = store_quantized(
                tiers, tier, tensors[name], label)
            continue
        t = tensors[name].to(dtype)
        if policy.compress_weight and t.dim() == 2 and name not in EMBED_KEYS:
            # Every tier keeps the packed form, the GPU's too (FlexGen's meaning of compress_weight, and the
            # planner's byte counts): a GPU-tier weight is unpacked into the layer's slot when it runs.
            cfg = CompressionConfig(num_bits=policy.comp_num_bits, group_size=policy.comp_group_size)
            c = compress(t.to(tiers.device), cfg)  # quantise where the tensor is (fast on a GPU)
            parts = {k: tiers.store(tier, getattr(c, k), name=f"{label}.{k}") for k in ("data", "scale", "min")}
            handle = CompressedHandle(parts, tuple(t.shape), dtype, cfg)
            (layer.experts if experts and expert_index(name) is not None else layer.offloaded)[name] = handle
        elif tier is Tier.GPU:
            layer.resident[name] = t.to(tiers.device)
        else:
            handle = tiers.store(tier, t, name=label)
            (layer.experts if experts and expert_index(name) is not None else layer.offloaded)[name] = handle


def place_weights(source: WeightSource, policy: Policy, tiers: Tiers, dtype: torch.dtype,
                  progress: bool = False, quantizer: LayerQuantizer | None = None) -> list[PseudoLayer]:
    """Read the checkpoint layer by layer straight into its tiers (never a whole-model copy in memory);
    `quantizer` quantises each decoder layer on its way."""
    cfg = source.config
    glob = source.global_parts()
    if quantizer is not None:
        quantizer.start(glob)
    embed = PseudoLayer("embed", -1)
    _place(tiers, policy, embed, {k: v for k, v in glob.items() if k in EMBED_KEYS}, dtype)
    table = embed.offloaded.get("embed.weight")
    if table is not None and table.tier is Tier.CPU:  # a lookup needs B*S rows, not the 50k-row table
        embed.gathered.add("embed.weight")
    head_tensors = {k: v for k, v in glob.items() if k not in EMBED_KEYS}
    shared = {}
    if cfg.tie_word_embeddings and "embed.weight" in glob:  # the head reuses the embedding matrix where placed
        # (a middle pipeline stage has neither the embedding nor the head)
        head_tensors["embed.weight"] = glob["embed.weight"]
        if "embed.weight" in embed.resident:
            shared["embed.weight"] = ("resident", embed.resident["embed.weight"])
        else:
            shared["embed.weight"] = ("offloaded", embed.offloaded["embed.weight"])
    del glob
    layers = [embed]
    iterator = range(cfg.num_layers)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="placing weights", unit="layer", leave=False)
    for i in iterator:
        layer = PseudoLayer("decoder", i)
        tensors = layer_weights(source, i)
        _place(tiers, policy, layer, tensors if quantizer is None else quantizer.layer(tensors), dtype)
        layers.append(layer)
    head = PseudoLayer("head", -1)
    _place(tiers, policy, head, head_tensors, dtype, shared)
    layers.append(head)
    return layers
