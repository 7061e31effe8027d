"""Tensor parallelism (Megatron-style): split every decoder layer's weights across the ranks of a group.

Attention is split by heads: rank r of R keeps heads [r*H/R, (r+1)*H/R) of q and the matching kv heads, so
its `attention_in` and attention run unchanged on a config with H/R and Hkv/R heads (column parallel: rows of
`qkv.weight`). `o.weight` is split by its input columns (row parallel): each rank's product is a partial sum
of the full output, and `attention_out(..., reduce=all_reduce)` sums the partials before the residual add.
The MLP is split the same way: `up.weight` by rows (gate and up halves separately, so `chunk(2)` still pairs
them), `down.weight` by columns. Biases of column-parallel weights are split with them; those of
row-parallel weights are kept whole and added once after the reduce. Norms, embeddings and the LM head are
replicated. Two all-reduces per layer, of [B, S, D] each, are the whole communication.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import ModelConfig
from ..errors import PolicyError

Tensors = dict[str, torch.Tensor]
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise `PolicyError` unless heads, kv heads and the MLP width divide evenly by `tp`."""
    if tp < 1:
        raise PolicyError(f"--tensor-parallel must be >= 1, got {tp}")
    for what, n in (("attention heads", cfg.num_heads), ("key/value heads", cfg.num_kv_heads),
                    ("MLP width (intermediate_size)", cfg.intermediate_size)):
        if n % tp:
            raise PolicyError(f"tensor parallel {tp} does not divide the model's {n} {what}; "
                              f"pick a degree that divides {n}")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config one rank's shard looks like: H/tp heads, Hkv/tp kv heads, intermediate_size/tp.

    `head_dim` was fixed when `cfg` was built, so it survives the change of head count."""
    check_tensor_parallel(cfg, tp)
    if tp == 1:
        return cfg
    return cfg.replace(num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                       intermediate_size=cfg.intermediate_size // tp)


def _rows(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    n = t.shape[0] // tp
    return t[rank * n:(rank + 1) * n]


def _split_qkv(cfg: ModelConfig, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    # t: [(H + 2 Hkv) hd, ...] -> [(H + 2 Hkv) hd / tp, ...]; heads are contiguous blocks of hd rows
    q, k, v = t.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
    return torch.cat([_rows(q, rank, tp), _rows(k, rank, tp), _rows(v, rank, tp)], dim=0)


def _split_up(cfg: ModelConfig, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    # t: [2I or I, ...]; a gated MLP keeps gate_r and up_r paired so that `chunk(2)` splits them again
    if not cfg.gated_mlp:
        return _rows(t, rank, tp)
    gate, up = t.chunk(2, dim=0)
    return torch.cat([_rows(gate, rank, tp), _rows(up, rank, tp)], dim=0)


def shard_layer(cfg: ModelConfig, w: Tensors, rank: int, tp: int) -> Tensors:
    """Rank `rank`'s part of one layer's canonical weights (`cfg` is the full, unsharded config)."""
    check_tensor_parallel(cfg, tp)
    if not 0 <= rank < tp:
        raise PolicyError(f"tensor parallel rank {rank} is outside 0..{tp - 1}")
    if tp == 1:
        return dict(w)
    out: Tensors = {}
    for name, t in w.items():
        if name in ("qkv.weight", "qkv.bias"):
            out[name] = _split_qkv(cfg, t, rank, tp)
        elif name in ("up.weight", "up.bias"):
            out[name] = _split_up(cfg, t, rank, tp)
        elif name in ("o.weight", "down.weight"):  # row parallel: split the input features (columns)
            n = t.shape[1] // tp
            out[name] = t[:, rank * n:(rank + 1) * n]
        else:  # norms and the row-parallel biases (added after the reduce) stay whole
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def all_reduce_fn(group=None) -> ReduceFn:
    """`reduce` for `attention_out`: an in-place SUM all-reduce over the tensor-parallel group."""
    import torch.distributed as dist

    def reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    return reduce
