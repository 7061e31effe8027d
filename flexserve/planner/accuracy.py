"""How far the planner's throughput figure has been from measured runs: the data behind the spread that
`flexserve plan` states beside its prediction.

`kind` says what the error was measured on. "fitted" means the profile's fitted constants (launch overhead,
CPU-attention overlap, 4-bit rebuild rate) were fitted on the same runs the error is measured on, so it says
how well the model can describe runs it has seen, not how well it predicts new ones. "held-out" is the error on
runs disjoint from the fit (other models, lengths and caps): `python bench/planner_validation.py --held-out
... --accuracy FILE` writes that record, and its figures replace these.
"""
from __future__ import annotations

import json
import os

# bench/RESULTS.md section 2, "Held-out error": constants fitted on the recorded runs only
# (`bench/planner_tally.py`), then twenty-two policies measured on six models the fit never saw (an H200
# machine; held-out parts a-d, the Qwen2-7B re-measure and the Llama-2-13B capped sweep, merged and predicted by
# the cost model as it is). The error on the fitted runs themselves is lower (3.9%): that figure says how well the
# model describes runs it has seen, this one how well it predicts new ones. Part d's five runs were predicted
# blind (median 15.5%, worst 44.3%: a resident Llama-2-13B at 1,024 prompt tokens, where host dispatch and GPU
# work add up rather than overlap); the cost model's host lane was revised after the earlier parts' misses.
RECORDED = {
    "kind": "held-out",
    "median_abs_error": 0.101,
    "worst_abs_error": 0.443,
    "num_runs": 22,
    "num_models": 6,
    "source": "bench/RESULTS.md section 2 (bench/planner_validation.py --merge --repredict of the held-out runs)",
}


def accuracy(path: str | None = None) -> dict:
    """The error record `plan` quotes: a JSON file written by the validation script when `path` (or
    `$FLEXSERVE_PLANNER_ACCURACY`) names one, else the recorded figures above."""
    path = path or os.environ.get("FLEXSERVE_PLANNER_ACCURACY")
    if not path:
        return dict(RECORDED)
    with open(path) as f:
        data = json.load(f)
    for key in ("kind", "median_abs_error", "num_runs"):
        if key not in data:
            raise ValueError(f"{path}: planner accuracy record lacks {key!r}")
    return data


def spread_line(record: dict | None = None) -> str:
    """One line: the spread the recorded error implies for a prediction, and what it was measured on."""
    r = record or accuracy()
    pct = 100 * r["median_abs_error"]
    if r["kind"] == "held-out":
        worst = f", worst {100 * r['worst_abs_error']:.0f}%" if r.get("worst_abs_error") is not None else ""
        return (f"expected within ±{pct:.0f}% (held-out median error {pct:.1f}% over {r['num_runs']} runs"
                f"{worst})")
    return (f"expected within ±{pct:.0f}% on runs like those it was fitted to (fitted-set median error "
            f"{pct:.1f}% over {r['num_runs']} runs; no held-out error recorded yet, so expect more off them)")
