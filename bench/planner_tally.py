"""The planner's predictions for every policy measured on the H100 so far (bench/RESULTS.md section 2 tally).

    python bench/planner_tally.py          # no GPU needed: prints predicted decode tok/s per case
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

# (model, --percent, gpu batch, num gpu batches, policy options, gen len, dtype, tp, pp)
CASES = [
    ("opt-6.7b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 32, "float16", 1, 1),
    ("llama-3-8b", (0, 100, 100, 0, 100, 0), 32, 4, {}, 32, "bfloat16", 1, 1),
    ("opt-6.7b", (100, 0, 100, 0, 100, 0), 32, 1, {}, 32, "float16", 1, 1),
    ("opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, {"cpu_cache_compute": True}, 32, "float16", 1, 1),
    ("opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, {"cpu_cache_compute": True, "cpu_attention_dtype": "bfloat16"},
     32, "float16", 1, 1),
    ("opt-30b", (2, 98, 17, 83, 100, 0), 32, 2, {"cpu_cache_compute": True}, 32, "float16", 1, 1),
    ("llama-3-70b", (100, 0, 100, 0, 100, 0), 16, 1, {}, 32, "bfloat16", 2, 1),
]


def main() -> None:
    hw = profile("h100")
    for model, percent, bs, nb, opts, gen_len, dtype, tp, pp in CASES:
        policy = Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=nb, **opts)
        if tp > 1 or pp > 1:
            tok_s = estimate_parallel(preset(model), policy, hw, 512, gen_len, tp=tp, pp=pp, dtype=dtype).decode_tok_s
        else:
            tok_s = estimate(preset(model), policy, hw, 512, gen_len, dtype=dtype).decode_tok_s
        print(f"{model:12s} {policy.percent_flags():70s} {opts} tp={tp} pp={pp}: decode {tok_s:,.1f} tok/s")


if __name__ == "__main__":
    main()
