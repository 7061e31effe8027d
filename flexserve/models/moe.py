"""The sparse MLP of a mixture-of-experts layer (Mixtral, Qwen2-MoE, Qwen3-MoE): route, run each expert on the
tokens sent to it, add the weighted outputs back.

Each token's router logits go through a softmax (in float32), the `experts_per_token` most probable experts
are kept, and their probabilities are renormalised to sum to one when the config says so. Token slots are then
sorted by expert, so that each active expert runs one gate/up matmul and one down matmul over all of its
tokens, and the outputs are scatter-added into place, scaled by the routing weight. A shared expert (Qwen2-MoE)
runs on every token and is scaled by its own sigmoid gate.

Who runs an expert is the weights' business, not this module's: a weight mapping that has a `run_experts`
method (the offloading executor's, whose experts may live in host memory or on disk) is handed every active
expert of the call at once, so it can start the copies it wants before computing anything; a plain dict of
tensors runs them here. Either way the same routing and the same sums happen, on the CPU as on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import torch

from ..config import ModelConfig
from ..kernels.fused import silu_mul
from .linear import linear

Weights = Mapping[str, torch.Tensor]
ExpertWork = list[tuple[int, torch.Tensor]]  # (expert index, the tokens routed to it [n, D])


class ExpertRunner(Protocol):
    """A weight mapping that runs experts itself (see the module docstring)."""

    def run_experts(self, work: ExpertWork) -> list[torch.Tensor]:
        """Each expert of `work` over its tokens: [n, D] -> [n, D], in the order given."""
        ...


@dataclass
class Routing:
    """Which experts each token goes to, with what weight."""

    experts: torch.Tensor  # [T, k] expert indices
    weights: torch.Tensor  # [T, k] routing weights, in the activation dtype

    def groups(self, num_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(expert, token indices, weights) of every expert at least one token goes to, in expert order.
        Reads the per-expert counts back to the host (one synchronisation per layer)."""
        flat = self.experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # token slots grouped by expert
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        k = self.experts.shape[1]
        slot_weights = self.weights.reshape(-1)
        out, start = [], 0
        for e, n in enumerate(counts):
            if n:
                slots = order[start:start + n]
                out.append((e, slots // k, slot_weights[slots]))
            start += n
        return out


def route(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> Routing:
    """Top-k routing of tokens h [T, D]."""
    logits = linear(h, w["router.weight"])  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, cfg.experts_per_token, dim=-1)
    if cfg.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return Routing(idx, top.to(h.dtype))


def expert_mlp(w: Weights, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert over x [n, D]; its gate and up projections are fused in `{prefix}up.weight`."""
    return linear(silu_mul(linear(x, w[f"{prefix}up.weight"])), w[f"{prefix}down.weight"])


def run_here(w: Weights, work: ExpertWork) -> list[torch.Tensor]:
    """Every expert of `work` with the weights as they are in `w` (all on the device the tokens are on)."""
    return [expert_mlp(w, f"experts.{e}.", x) for e, x in work]


def moe_mlp(cfg: ModelConfig, w: Weights, h: torch.Tensor) -> torch.Tensor:
    """The sparse MLP over the normed hidden states h [B, S, D] -> [B, S, D] (no residual)."""
    shape = h.shape
    flat = h.reshape(-1, shape[-1])  # [T, D]
    routing = route(cfg, w, flat)
    if flat.is_cuda and torch.cuda.is_current_stream_capturing():
        out = _every_expert(cfg, w, flat, routing)
    else:
        groups = routing.groups(cfg.num_experts)
        work = [(e, flat[tokens]) for e, tokens, _ in groups]
        runner = getattr(w, "run_experts", None)
        ys = runner(work) if runner is not None else run_here(w, work)
        out = torch.zeros_like(flat)
        for (_, tokens, weight), y in zip(groups, ys):
            out.index_add_(0, tokens, y * weight[:, None])
    if cfg.shared_expert_intermediate_size:
        gate = torch.sigmoid(linear(flat, w["shared_gate.weight"]))  # [T, 1]
        out = out + gate * expert_mlp(w, "shared.", flat)
    return out.view(shape)


def _every_expert(cfg: ModelConfig, w: Weights, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Every expert over every token, weighted by a dense [T, E] combine matrix (zero where a token is not
    routed): no data-dependent shapes and no host synchronisation, so a CUDA graph can capture it. It does
    E / k times the expert FLOPs, which decode steps (the only ones captured) can afford."""
    combine = torch.zeros(flat.shape[0], cfg.num_experts, dtype=flat.dtype, device=flat.device)
    combine.scatter_(1, routing.experts, routing.weights)
    out = torch.zeros_like(flat)
    for e in range(cfg.num_experts):
        out = out + combine[:, e:e + 1] * expert_mlp(w, f"experts.{e}.", flat)
    return out
