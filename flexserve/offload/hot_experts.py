"""Which experts hold the GPU's share of a mixture-of-experts layer: the ones the router has used most lately.

Real routers are skewed: a few experts of each layer take most of the tokens. The placement
(`assign_moe_tiers`) fixes how many experts of a layer live on the GPU, H, but not which: it starts with the
first H by index. `RoutingCounter` counts, per layer, the tokens the router sends to each expert (from the
per-expert token counts the executor already has on the host, so it costs no device synchronisation), each
count decaying by `decay` per step so that it follows the workload. `HotExperts` says when to look again:
after `warmup_steps` steps, then every `period_steps`. At those times `choose_swaps` names, per layer, the
off-GPU experts that out-count a resident one; `ExpertStreamer.end_step` exchanges each such pair between
steps, so the GPU keeps exactly H experts per layer and every other tier its own count.

This module is plain Python over numbers; the copies are the streamer's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

HOT_WARMUP_STEPS = 8  # steps counted before the first choice (a prefill alone is a poor sample)
HOT_PERIOD_STEPS = 32  # steps between later choices: each one may copy H experts per layer each way
HOT_DECAY = 0.98  # per step: a count halves in about 34 steps
HOT_MARGIN = 1.25  # an expert displaces a resident only when routed this many times as much: a swap copies two
# experts (one each way), and near-uniform routing would otherwise trade residents back and forth on noise
_RENORMALISE = 1e6  # the increment's growth at which the stored sums are rescaled


class RoutingCounter:
    """Tokens routed to each expert, per layer, each step's counts weighing `decay` times the next one's.

    Decay is lazy: a token adds `decay ** -steps` to the stored sum instead of every sum shrinking every step,
    so a step costs O(1) whatever the number of layers and experts; `counts` divides back."""

    def __init__(self, num_experts: int, decay: float = HOT_DECAY):
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.num_experts, self.decay = num_experts, decay
        self._sums: dict[object, list[float]] = {}
        self._weight = 1.0  # what one token adds now

    def observe(self, layer: object, routed: Iterable[tuple[int, int]]) -> None:
        """Add one call's (expert, tokens routed to it) pairs for `layer` (any hashable key)."""
        sums = self._sums.setdefault(layer, [0.0] * self.num_experts)
        for e, n in routed:
            sums[e] += n * self._weight

    def step(self) -> None:
        """A step has passed: everything counted so far now weighs `decay` times as much."""
        self._weight /= self.decay
        if self._weight > _RENORMALISE:
            for sums in self._sums.values():
                sums[:] = [c / self._weight for c in sums]
            self._weight = 1.0

    def counts(self, layer: object) -> list[float]:
        """The decayed token counts of `layer`'s experts (zeros for a layer never observed)."""
        sums = self._sums.get(layer)
        return [c / self._weight for c in sums] if sums else [0.0] * self.num_experts


def choose_swaps(counts: list[float], residents: set[int], others: set[int],
                 margin: float = HOT_MARGIN) -> list[tuple[int, int]]:
    """(expert to bring to the GPU, resident to send back) pairs that move the residents towards the
    len(residents) most counted experts of `residents | others`: the most counted newcomer against the least
    counted resident, and so on, each pair kept only when the newcomer was routed more than `margin` times as
    many tokens. A resident wins a tie, so equal counts never swap."""
    ranked = sorted(residents | others, key=lambda e: (-counts[e], e not in residents, e))
    hot = set(ranked[:len(residents)])
    promote = sorted(hot - residents, key=lambda e: (-counts[e], e))
    demote = sorted(residents - hot, key=lambda e: (counts[e], e))
    return [(p, d) for p, d in zip(promote, demote) if counts[p] > margin * counts[d]]


@dataclass
class HotExperts:
    """The hot-set schedule of one executor and its routing counts (see the module docstring). Set
    `enabled = False` to keep the placement's residents (the first H experts by index)."""

    num_experts: int
    warmup_steps: int = HOT_WARMUP_STEPS
    period_steps: int = HOT_PERIOD_STEPS
    decay: float = HOT_DECAY
    enabled: bool = True
    steps: int = 0
    counter: RoutingCounter = field(init=False)

    def __post_init__(self) -> None:
        if self.warmup_steps < 1 or self.period_steps < 1:
            raise ValueError("warmup_steps and period_steps must be >= 1")
        self.counter = RoutingCounter(self.num_experts, self.decay)

    def step(self) -> bool:
        """Count a finished step; whether the residents are to be chosen again now."""
        self.steps += 1
        self.counter.step()
        due = self.steps >= self.warmup_steps and (self.steps - self.warmup_steps) % self.period_steps == 0
        return self.enabled and due
