"""The planner's predictions for every offloading policy measured on the GPU machines so far, against the
measured decode throughput (bench/RESULTS.md section 2 tally).

    python bench/planner_tally.py          # no GPU needed: predicted (as percentages and as placed) vs measured

Runs are grouped by the series of machine calls that measured them (A to F, oldest first). (*): measured
before the executor kept a decode step's hidden states on the GPU (before, with activations on the CPU, their
copy back queued behind the next layer's weights); the model no longer predicts that stall.

"As placed" evaluates the shares the executor really gives each tier (whole tensors: `placed_point`); the
search optimises the continuous shares. Errors are (predicted as placed - measured) / measured.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from flexserve.config import preset  # noqa: E402
from flexserve.offload.policy import Policy  # noqa: E402
from flexserve.planner import estimate  # noqa: E402
from flexserve.planner.hardware import profile  # noqa: E402
from flexserve.planner.parallel import estimate_parallel  # noqa: E402

CCC = {"cpu_cache_compute": True}
# (where, model, --percent, gpu batch, num gpu batches, policy options, gen len, dtype, tp, pp, measured decode tok/s)
CASES = [
    ("A x1", "opt-6.7b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 32, "float16", 1, 1, 465.3),
    ("A x1", "llama-3-8b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 32, "bfloat16", 1, 1, 393.3),
    ("A x1", "opt-6.7b", (100, 0, 100, 0, 100, 0), 32, 1, {}, 32, "float16", 1, 1, 2077.0),
    ("C x2 (*)", "opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, CCC, 32, "float16", 1, 1, 29.3),
    ("C x2 (*)", "opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, {**CCC, "cpu_attention_dtype": "bfloat16"}, 32,
     "float16", 1, 1, 31.4),
    ("B x2", "opt-30b", (2, 98, 17, 83, 100, 0), 32, 2, CCC, 32, "float16", 1, 1, 47.3),
    ("B x2", "llama-3-70b", (100, 0, 100, 0, 100, 0), 16, 1, {}, 32, "bfloat16", 2, 1, 137.0),
    ("D x2", "llama-3-70b", (0, 100, 100, 0, 100, 0), 16, 2, {}, 8, "bfloat16", 1, 1, 12.52),
    ("D x2", "opt-175b", (40, 60, 100, 0, 100, 0), 8, 1, {"compress_weight": True}, 8, "float16", 1, 1, 3.33),
    ("D H200x2", "opt-175b", (80, 20, 100, 0, 100, 0), 8, 1, {"compress_weight": True}, 8, "float16", 1, 2, 5.82),
    ("D H200x2", "opt-175b", (100, 0, 100, 0, 100, 0), 8, 1, {"compress_weight": True}, 8, "float16", 1, 2, 6.60),
    ("D H200x2", "opt-6.7b", (100, 0, 100, 0, 100, 0), 32, 1, {}, 8, "float16", 1, 1, 2029.5),
    ("D H200x2", "opt-6.7b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 8, "float16", 1, 1, 427.2),
    ("D H200x2", "opt-6.7b", (50, 50, 100, 0, 100, 0), 32, 2, {}, 8, "float16", 1, 1, 793.2),
    ("D H200x2", "opt-6.7b", (0, 100, 0, 100, 100, 0), 16, 2, {}, 8, "float16", 1, 1, 76.2),
    # series F, one H100 (nvidia-h100-x1), FlexGen's weight placement (the default from then on)
    ("F x1 (*)", "opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, CCC, 32, "float16", 1, 1, 28.46),
    ("F x1 (*)", "opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, CCC, 8, "float16", 1, 1, 27.15),
    ("F x1", "opt-30b", (20, 80, 0, 100, 100, 0), 16, 3, CCC, 32, "float16", 1, 1, 41.0),
    ("F x1", "opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, CCC, 32, "float16", 1, 1, 40.03),
    ("F x1", "opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, CCC, 32, "float16", 1, 1, 43.08),
    ("F x1", "opt-30b", (1, 99, 18, 82, 100, 0), 16, 5, CCC, 8, "float16", 1, 1, 54.94),
    ("F x1", "opt-30b", (13, 87, 7, 93, 97, 3), 32, 3, CCC, 8, "float16", 1, 1, 51.6),
    ("F x1", "opt-30b", (13, 87, 4, 96, 100, 0), 64, 1, CCC, 8, "float16", 1, 1, 50.9),
    ("F x1", "opt-30b", (2, 98, 17, 83, 100, 0), 32, 2, CCC, 8, "float16", 1, 1, 49.18),
    ("F x1", "opt-30b", (1, 99, 11, 89, 100, 0), 64, 1, CCC, 8, "float16", 1, 1, 52.2),
    ("F x1", "opt-6.7b", (100, 0, 100, 0, 100, 0), 32, 1, {}, 8, "float16", 1, 1, 1039.6),
    ("F x1", "opt-6.7b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 8, "float16", 1, 1, 467.1),
    ("F x1", "opt-6.7b", (50, 50, 100, 0, 100, 0), 32, 2, {}, 8, "float16", 1, 1, 407.8),
    ("F x1", "opt-6.7b", (0, 100, 0, 100, 100, 0), 16, 2, {}, 8, "float16", 1, 1, 70.8),
    ("F x1", "opt-6.7b", (0, 100, 0, 100, 100, 0), 16, 2, CCC, 8, "float16", 1, 1, 90.5),
    ("F x1", "opt-13b", (30, 70, 100, 0, 100, 0), 32, 2, {}, 8, "float16", 1, 1, 214.5),
    ("F x1", "llama-3-8b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 8, "float16", 1, 1, 428.6),
    ("F x1", "llama-3-8b", (50, 50, 100, 0, 100, 0), 32, 2, {}, 8, "float16", 1, 1, 378.3),
]


S6 = [c for c in CASES if c[0].startswith("F")]  # last in the list


def predict(model, policy, gen_len, dtype, tp, pp, placed: bool) -> float:
    hw = profile("h100")
    if tp > 1 or pp > 1:  # the parallel estimate evaluates each rank's own share
        return estimate_parallel(preset(model), policy, hw, 512, gen_len, tp=tp, pp=pp, dtype=dtype).decode_tok_s
    return estimate(preset(model), policy, hw, 512, gen_len, dtype=dtype, placed=placed).decode_tok_s


def main() -> None:
    print("| # | where | model, policy | measured | predicted (percentages) | predicted (as placed) | error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    errors = []
    for i, (where, model, percent, bs, nb, opts, gen_len, dtype, tp, pp, measured) in enumerate(CASES, 1):
        # runs before series F placed weights largest-first; FlexGen's rule is the default since
        rule = "flexgen" if where.startswith("F") else "largest-first"
        policy = Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=nb, weight_placement=rule, **opts)
        cont = predict(model, policy, gen_len, dtype, tp, pp, placed=False)
        placed = predict(model, policy, gen_len, dtype, tp, pp, placed=True)
        err = (placed - measured) / measured
        errors.append(abs(err))
        extra = " ".join(f"{k}={v}" for k, v in opts.items())
        par = f" tp{tp}" if tp > 1 else f" pp{pp}" if pp > 1 else ""
        print(f"| {i} | {where} | {model} `{' '.join(map(str, percent))}` {bs}x{nb}{par} {extra} gen {gen_len} | "
              f"{measured:,.1f} | {cont:,.1f} | {placed:,.1f} | {err:+.0%} |")
    current = [e for e, c in zip(errors, CASES) if "(*)" not in c[0]]
    for label, errs in (("all", errors), ("series F (one H100, one series of calls)", errors[-len(S6):]),
                        ("runs the current executor reproduces (no (*) row)",
                         current)):
        errs = sorted(errs)
        print(f"\nmedian absolute error, {label}: {errs[len(errs) // 2]:.1%} over {len(errs)} policies")


if __name__ == "__main__":
    main()
