"""`--quantization auto`: plan with no weight quantization and with each scheme, and keep the best trade.

The rule (`choose_quantization`): among the schemes whose plan fits the memory, take the fastest predicted
total throughput; then choose the best-quality scheme within `tolerance` (5%) of it. Quality, best first:
none > fp8 ≈ int8 > awq > rtn4 (bench/RESULTS.md section 6); fp8 and int8 rank equal, so the faster of the two
wins between them, and fp8 at equal speed (the cost model prices them the same; fp8 needs no calibration at
load, int8 measured a little better: ask for it by name). So the unquantized model is kept whenever it fits at
nearly the fastest speed, since every scheme costs some quality; and rtn4 is never chosen over awq, which the
cost model prices the same (same bytes, same kernels) but which loses less.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import PolicyError
from .quant import QUALITY_ORDER, QUALITY_RANK, ROUNDING_SCHEMES
from .search import Plan

AUTO = "auto"
TOLERANCE = 0.05  # a scheme of better quality is kept when no more than 5% slower than the fastest plan


@dataclass(frozen=True)
class SchemeTrial:
    """One scheme's plan, or why nothing fits with it."""

    scheme: str | None  # None: no weight quantization
    plan: Plan | None
    why_not: str = ""  # the search's refusal when `plan` is None

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def total_tok_s(self) -> float:
        return self.plan.estimate.total_tok_s if self.plan is not None else 0.0

    @property
    def name(self) -> str:
        return self.scheme or "none"


@dataclass(frozen=True)
class QuantChoice:
    """The chosen scheme and plan, every scheme tried, and the reason in words."""

    scheme: str | None
    plan: Plan
    trials: tuple[SchemeTrial, ...]
    reason: str
    tolerance: float = TOLERANCE


def choose_quantization(plan_for: Callable[[str | None], Plan],
                        schemes: tuple[str | None, ...] = (None, *ROUNDING_SCHEMES),
                        tolerance: float = TOLERANCE) -> QuantChoice:
    """Plan with each of `schemes` (`plan_for(scheme)`, which raises `PolicyError` when nothing fits) and choose
    by the module's rule: the best-quality scheme within `tolerance` of the fastest fitting plan. The default
    `schemes` are none and those that round a float checkpoint (a GGUF file's own form is not a choice)."""
    trials = []
    for scheme in schemes:
        try:
            trials.append(SchemeTrial(scheme, plan_for(scheme)))
        except PolicyError as e:
            trials.append(SchemeTrial(scheme, None, str(e)))
    fitting = [t for t in trials if t.fits]
    if not fitting:
        raise PolicyError("no policy fits with any weight quantization (" + ", ".join(t.name for t in trials)
                          + f"); {trials[0].name}: {trials[0].why_not}")
    fastest = max(fitting, key=lambda t: t.total_tok_s)
    near = [t for t in fitting if t.total_tok_s >= (1 - tolerance) * fastest.total_tok_s]
    chosen = min(near, key=lambda t: (QUALITY_RANK[t.scheme], -t.total_tok_s))
    reason = _reason(chosen, fastest, near, trials, tolerance)
    return QuantChoice(chosen.scheme, chosen.plan, tuple(trials), reason, tolerance)


def _reason(chosen: SchemeTrial, fastest: SchemeTrial, near: list[SchemeTrial], trials: list[SchemeTrial],
            tolerance: float) -> str:
    unq = next((t for t in trials if t.scheme is None), None)
    speed = f"{chosen.total_tok_s:,.2f} tok/s"
    if chosen.scheme is None:
        if fastest is chosen:
            return f"the unquantized model fits and is the fastest plan ({speed})"
        return (f"the unquantized model fits within {tolerance:.0%} of the fastest plan ({speed} against "
                f"{fastest.name}'s {fastest.total_tok_s:,.2f} tok/s), and quantization costs quality")
    if unq is None:
        why = "no unquantized plan was tried"
    elif not unq.fits:
        why = "the unquantized model does not fit the memory"
    else:
        why = (f"{chosen.total_tok_s / unq.total_tok_s:.2f}x the unquantized plan's {unq.total_tok_s:,.2f} tok/s, "
               f"more than the {tolerance:.0%} that would keep full quality")
    rank = ("the fastest plan" if fastest is chosen else
            f"the best quality within {tolerance:.0%} of the fastest ({fastest.name}, {fastest.total_tok_s:,.2f} "
            f"tok/s)")
    worse = [t.name for t in near if QUALITY_RANK[t.scheme] > QUALITY_RANK[chosen.scheme]]
    also = f"; {' and '.join(worse)} also within {tolerance:.0%} but of lower quality" if worse else ""
    return f"{chosen.name} predicts {speed}, {why}; {rank}{also} (quality: {QUALITY_ORDER})"
