"""The planner's predictions for every offloading policy measured on the GPU machines so far, against the
measured decode throughput (bench/RESULTS.md section 2 tally).

    python bench/planner_tally.py          # no GPU needed: predicted (as percentages and as placed) vs measured

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
    ("s1 x1", "opt-6.7b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 32, "float16", 1, 1, 465.3),
    ("s1 x1", "llama-3-8b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 32, "bfloat16", 1, 1, 393.3),
    ("s1 x1", "opt-6.7b", (100, 0, 100, 0, 100, 0), 32, 1, {}, 32, "float16", 1, 1, 2077.0),
    ("s3 x2", "opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, CCC, 32, "float16", 1, 1, 29.3),
    ("s3 x2", "opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, {**CCC, "cpu_attention_dtype": "bfloat16"}, 32,
     "float16", 1, 1, 31.4),
    ("s2 x2", "opt-30b", (2, 98, 17, 83, 100, 0), 32, 2, CCC, 32, "float16", 1, 1, 47.3),
    ("s2 x2", "llama-3-70b", (100, 0, 100, 0, 100, 0), 16, 1, {}, 32, "bfloat16", 2, 1, 137.0),
    ("s4 x2", "llama-3-70b", (0, 100, 100, 0, 100, 0), 16, 2, {}, 8, "bfloat16", 1, 1, 12.52),
    ("s4 x2", "opt-175b", (40, 60, 100, 0, 100, 0), 8, 1, {"compress_weight": True}, 8, "float16", 1, 1, 3.33),
    ("s4 H200x2", "opt-175b", (80, 20, 100, 0, 100, 0), 8, 1, {"compress_weight": True}, 8, "float16", 1, 2, 5.82),
    ("s4 H200x2", "opt-175b", (100, 0, 100, 0, 100, 0), 8, 1, {"compress_weight": True}, 8, "float16", 1, 2, 6.60),
    ("s4 H200x2", "opt-6.7b", (100, 0, 100, 0, 100, 0), 32, 1, {}, 8, "float16", 1, 1, 2029.5),
    ("s4 H200x2", "opt-6.7b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 8, "float16", 1, 1, 427.2),
    ("s4 H200x2", "opt-6.7b", (50, 50, 100, 0, 100, 0), 32, 2, {}, 8, "float16", 1, 1, 793.2),
    ("s4 H200x2", "opt-6.7b", (0, 100, 0, 100, 100, 0), 16, 2, {}, 8, "float16", 1, 1, 76.2),
]


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
        # every run in the list was made before session 4 changed the default weight placement to FlexGen's
        policy = Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=nb, weight_placement="largest-first",
                                     **opts)
        cont = predict(model, policy, gen_len, dtype, tp, pp, placed=False)
        placed = predict(model, policy, gen_len, dtype, tp, pp, placed=True)
        err = (placed - measured) / measured
        errors.append(abs(err))
        extra = " ".join(f"{k}={v}" for k, v in opts.items())
        par = f" tp{tp}" if tp > 1 else f" pp{pp}" if pp > 1 else ""
        print(f"| {i} | {where} | {model} `{' '.join(map(str, percent))}` {bs}x{nb}{par} {extra} gen {gen_len} | "
              f"{measured:,.1f} | {cont:,.1f} | {placed:,.1f} | {err:+.0%} |")
    errors.sort()
    print(f"\nmedian absolute error over {len(errors)} policies: {errors[len(errors) // 2]:.1%}")


if __name__ == "__main__":
    main()
