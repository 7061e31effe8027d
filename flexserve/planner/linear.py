"""Affine functions of the six placement fractions, the one currency of the cost model and the MILP.

Every time term and memory term of the cost model is written as `const + coef · x` over
x = (w_gpu, w_cpu, cache_gpu, cache_cpu, act_gpu, act_cpu) as fractions in [0, 1]; the disk share of each kind is
`1 - gpu - cpu`. `estimate` evaluates these at a policy's point, and `search` hands the very same coefficients
to HiGHS, so the linear program optimises exactly what the estimate reports, with no second copy of the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

VARS = ("w_gpu", "w_cpu", "cache_gpu", "cache_cpu", "act_gpu", "act_cpu")
NUM_VARS = len(VARS)
_INDEX = {name: i for i, name in enumerate(VARS)}
KINDS = ("w", "cache", "act")


@dataclass(frozen=True)
class Linear:
    """`const + sum(coef[i] * x[i])` over the six placement fractions."""

    coef: tuple[float, ...] = (0.0,) * NUM_VARS
    const: float = 0.0

    @staticmethod
    def constant(value: float) -> "Linear":
        return Linear(const=float(value))

    @staticmethod
    def var(name: str) -> "Linear":
        coef = [0.0] * NUM_VARS
        coef[_INDEX[name]] = 1.0
        return Linear(tuple(coef))

    @staticmethod
    def share(kind: str, tier: str) -> "Linear":
        """The fraction of `kind` ("w", "cache", "act") that lives on `tier` ("gpu", "cpu", "disk")."""
        if tier == "disk":
            return Linear.constant(1.0) - Linear.share(kind, "gpu") - Linear.share(kind, "cpu")
        return Linear.var(f"{kind}_{tier}")

    def __add__(self, other: "Linear | float") -> "Linear":
        if not isinstance(other, Linear):
            return Linear(self.coef, self.const + float(other))
        return Linear(tuple(a + b for a, b in zip(self.coef, other.coef)), self.const + other.const)

    __radd__ = __add__

    def __sub__(self, other: "Linear | float") -> "Linear":
        return self + (other * -1.0 if isinstance(other, Linear) else -float(other))

    def __rsub__(self, other: float) -> "Linear":
        return self * -1.0 + float(other)

    def __mul__(self, k: float) -> "Linear":
        k = float(k)
        return Linear(tuple(a * k for a in self.coef), self.const * k)

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> "Linear":
        return self * (1.0 / k)

    def at(self, x: Sequence[float]) -> float:
        return self.const + sum(a * v for a, v in zip(self.coef, x))


def total(terms: Iterable[Linear]) -> Linear:
    out = Linear()
    for t in terms:
        out = out + t
    return out


@dataclass(frozen=True)
class Switch:
    """Memory that exists only when `when(x) > 0` (a staging buffer allocated whole as soon as it is needed)."""

    when: Linear
    num_bytes: float
    label: str


@dataclass(frozen=True)
class TierMemory:
    """Peak bytes of one tier: an affine part plus all-or-nothing buffers (modelled with binaries in the MILP)."""

    base: Linear
    switches: tuple[Switch, ...] = ()
    parts: dict[str, Linear] = field(default_factory=dict, compare=False)

    def at(self, x: Sequence[float]) -> float:
        return self.base.at(x) + sum(s.num_bytes for s in self.switches if s.when.at(x) > 1e-9)

    def minimum(self) -> float:
        """A lower bound over every placement: the affine part's minimum, no switch on."""
        return minimum(self.base)


def minimum(lin: Linear) -> float:
    """The exact minimum of `lin` over the placements (per kind gpu, cpu >= 0 and gpu + cpu <= 1): each kind
    contributes min(0, a_gpu, a_cpu), a vertex of its triangle."""
    return lin.const + sum(min(0.0, lin.coef[2 * k], lin.coef[2 * k + 1]) for k in range(len(KINDS)))


def point(w_gpu: float, w_cpu: float, cache_gpu: float, cache_cpu: float, act_gpu: float,
          act_cpu: float) -> tuple[float, ...]:
    """A placement point as fractions, from percentages."""
    return tuple(v / 100.0 for v in (w_gpu, w_cpu, cache_gpu, cache_cpu, act_gpu, act_cpu))
