"""How far the planner's predicted throughput is from measured runs, and `--policy auto` under caps.

For every policy in the list it runs `flexserve bench throughput` (a subprocess each, so peak memory and CUDA
state do not leak between runs), asks `flexserve.planner.estimate` for the same policy on the same hardware
profile, and reports the relative error; `--auto` adds the planner's own choice under the given memory caps
(e.g. a T4-like 16 GiB GPU), and `--cap-sweep` the planner's best at other GPU batch sizes and hand policies
(FlexGen's README policy) under the same caps, with the auto choice's fraction of the best of them. Writes a markdown table, one JSON line
and a predicted-vs-measured scatter plot.

    python bench/planner_validation.py --hardware h100 --gen-len 8 --plot bench/plots/planner_vs_measured.png
    python bench/planner_validation.py --hardware h100 --gen-len 8 --no-sweep --auto opt-30b --gpu-mem 16GiB --cap-sweep
    python bench/planner_validation.py --device cpu --quick      # tiny shapes, to check the script itself

An honest error figure needs constants fitted on one set of runs and the error measured on another:

    python bench/planner_validation.py --fit --fit-from-tally --save-profile fitted.json   # no GPU: the fit set
        # is every run recorded in bench/planner_tally.py; `--fit` alone measures GPU_CASES instead
    python bench/planner_validation.py --held-out --hardware fitted.json --held-out-pick 0,1,2,3 \
        --accuracy held_out_a.json                     # HELD_OUT_CASES: other models, lengths and caps
    python bench/planner_validation.py --merge held_out_a.json held_out_b.json --accuracy held_out.json

`--fit` grid-searches the constants the h100 profile carries from fitted runs (per-layer launch overhead,
CPU-attention overlap, the 4-bit rebuild rate) for the lowest median error on the fit set only. The
`--accuracy` record (kind "held-out": median and worst absolute error, number of runs) is what `flexserve plan`
quotes when `FLEXSERVE_PLANNER_ACCURACY` names it; its figures belong in `flexserve/planner/accuracy.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# (model, --percent, gpu batch size, num gpu batches, extra flags)
GPU_CASES = [
    ("opt-6.7b", (100, 0, 100, 0, 100, 0), 32, 1, []),
    ("opt-6.7b", (0, 100, 100, 0, 100, 0), 32, 4, []),
    ("opt-6.7b", (50, 50, 100, 0, 100, 0), 32, 2, []),
    ("opt-6.7b", (0, 100, 0, 100, 100, 0), 16, 2, []),
    ("opt-6.7b", (0, 100, 0, 100, 100, 0), 16, 2, ["--cpu-cache-compute"]),
    ("opt-13b", (30, 70, 100, 0, 100, 0), 32, 2, []),
    ("opt-30b", (20, 80, 0, 100, 0, 100), 16, 3, ["--cpu-cache-compute"]),
    ("llama-3-8b", (0, 100, 100, 0, 100, 0), 32, 4, []),
    ("llama-3-8b", (50, 50, 100, 0, 100, 0), 32, 2, []),
]
CPU_CASES = [
    ("opt-125m", (100, 0, 100, 0, 100, 0), 4, 1, []),
    ("opt-125m", (0, 100, 100, 0, 100, 0), 4, 2, []),
    ("opt-125m", (0, 100, 0, 100, 100, 0), 4, 2, ["--cpu-cache-compute"]),
]


# Held out from every fit: models, lengths and caps the constants never saw, with and without CPU attention and
# compression. (model, --percent, gpu batch size, num gpu batches, extra flags, prompt len, gen len, dtype)
HELD_OUT_CASES = [
    ("llama-2-7b", (0, 100, 100, 0, 100, 0), 32, 4, [], 256, 16, "float16"),
    ("llama-2-7b", (0, 100, 0, 100, 100, 0), 16, 2, ["--cpu-cache-compute"], 1024, 16, "float16"),
    ("llama-2-7b", (50, 50, 100, 0, 100, 0), 32, 2, ["--compress-weight"], 512, 16, "float16"),
    ("mistral-7b", (0, 100, 100, 0, 100, 0), 32, 4, [], 1024, 16, "bfloat16"),
    ("mistral-7b", (30, 70, 0, 100, 100, 0), 16, 3, ["--cpu-cache-compute"], 256, 32, "bfloat16"),
    ("qwen2-7b", (100, 0, 100, 0, 100, 0), 32, 1, [], 512, 16, "bfloat16"),
    ("qwen2-7b", (0, 100, 100, 0, 100, 0), 16, 4, ["--compress-weight"], 256, 16, "bfloat16"),
    ("opt-2.7b", (0, 100, 0, 100, 100, 0), 32, 2, ["--cpu-cache-compute"], 512, 32, "float16"),
    ("opt-2.7b", (100, 0, 50, 50, 100, 0), 64, 1, [], 256, 16, "float16"),
    ("llama-2-13b", (20, 80, 100, 0, 100, 0), 16, 2, [], 512, 16, "float16"),
    ("llama-2-13b", (0, 100, 50, 50, 100, 0), 16, 2, ["--compress-cache"], 256, 16, "float16"),
    ("llama-2-13b", (10, 90, 0, 100, 100, 0), 32, 2, ["--cpu-cache-compute"], 768, 16, "float16"),
    # part d, added after the host lane: cases the revised model has not seen, resident ones whose step the
    # host sets among them
    ("opt-1.3b", (100, 0, 100, 0, 100, 0), 64, 1, [], 256, 32, "float16"),
    ("llama-2-13b", (100, 0, 100, 0, 100, 0), 16, 1, [], 1024, 16, "float16"),
    ("opt-1.3b", (0, 100, 0, 100, 100, 0), 64, 2, ["--cpu-cache-compute"], 512, 16, "float16"),
    ("qwen2-7b", (50, 50, 100, 0, 100, 0), 32, 2, [], 768, 16, "bfloat16"),
    ("llama-2-7b", (0, 100, 100, 0, 100, 0), 32, 4, ["--compress-weight"], 512, 16, "float16"),
]
FIT_GRID = {  # multipliers of the profile's value (overlap: the value itself)
    "layer_overhead_s": (0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0),
    "cpu_attention_overlap": (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    "dequant_bw": (0.5, 0.7, 1.0, 1.4, 2.0),
    "layer_sync_s": (0.0, 50e-6, 100e-6, 150e-6, 200e-6, 250e-6, 300e-6, 400e-6),
}
ABSOLUTE = ("cpu_attention_overlap", "layer_sync_s")  # grids of values, not multipliers of the profile's


def measure(model: str, percent, bs: int, nb: int, extra: list[str], args, prompt_len: int | None = None,
            gen_len: int | None = None, dtype: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "flexserve.cli", "bench", "throughput", "--model", f"dummy:{model}",
           "--dtype", dtype or args.dtype, "--prompt-len", str(prompt_len or args.prompt_len),
           "--gen-len", str(gen_len or args.gen_len), "--json",
           "--percent", *map(str, percent), "--gpu-batch-size", str(bs), "--num-gpu-batches", str(nb), *extra]
    if args.device:
        cmd += ["--device", args.device]
    if args.offload_dir:
        cmd += ["--offload-dir", args.offload_dir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:  # one slow case must not lose the others' figures
        return {"error": f"timed out after {args.timeout} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FLEXSERVE_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[len("FLEXSERVE_RESULT "):])


def policy_of(percent, bs: int, nb: int, extra: list[str]):
    from flexserve.offload.policy import Policy

    return Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=nb,
                               cpu_cache_compute="--cpu-cache-compute" in extra,
                               compress_weight="--compress-weight" in extra, compress_cache="--compress-cache" in extra)


def policy_options(extra: list[str]) -> dict:
    return {k: True for k, flag in (("cpu_cache_compute", "--cpu-cache-compute"),
                                    ("compress_weight", "--compress-weight"),
                                    ("compress_cache", "--compress-cache")) if flag in extra}


def case_of(policy) -> tuple:
    """(percent, gpu batch size, num gpu batches, extra flags) of a planner policy, for `measure`."""
    extra = [flag for flag, on in (("--cpu-cache-compute", policy.cpu_cache_compute),
                                   ("--compress-weight", policy.compress_weight),
                                   ("--compress-cache", policy.compress_cache)) if on]
    return tuple(int(round(p)) for p in policy.percent), policy.gpu_batch_size, policy.num_gpu_batches, extra


def predict(model: str, percent, bs: int, nb: int, extra: list[str], hw, args, prompt_len: int | None = None,
            gen_len: int | None = None, dtype: str | None = None):
    from flexserve.config import preset
    from flexserve.planner import estimate

    dtype = dtype or args.dtype
    dtype_bytes = 4 if dtype == "float32" else 2
    return estimate(preset(model), policy_of(percent, bs, nb, extra), hw, prompt_len or args.prompt_len,
                    gen_len or args.gen_len, dtype_bytes=dtype_bytes, dtype=dtype,
                    placed=True)  # the shares the executor really places


# --- fitting on one set, reporting on another ----------------------------------------------------------------
def tally_rows() -> list[dict]:
    """The runs recorded in bench/planner_tally.py (one GPU, no parallelism) as fit rows."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from planner_tally import CASES

    return [dict(model=m, percent=list(pct), bs=bs, nb=nb, options=opts, prompt_len=512, gen_len=gen, dtype=dt,
                 weight_placement="flexgen" if where.startswith("F") else "largest-first", measured=meas)
            for where, m, pct, bs, nb, opts, gen, dt, tp, pp, meas in CASES if tp == 1 and pp == 1]


def row_estimate(row: dict, hw):
    """The cost model's `Estimate` of one fit or held-out row under profile `hw`, as placed."""
    from flexserve.config import preset
    from flexserve.offload.policy import Policy
    from flexserve.planner import estimate

    policy = Policy.from_percent(row["percent"], gpu_batch_size=row["bs"], num_gpu_batches=row["nb"],
                                 weight_placement=row.get("weight_placement", "flexgen"), **row.get("options", {}))
    return estimate(preset(row["model"]), policy, hw, row["prompt_len"], row["gen_len"], dtype=row["dtype"],
                    dtype_bytes=4 if row["dtype"] == "float32" else 2, placed=True)


def row_error(row: dict, hw) -> float:
    """(predicted - measured) / measured of one fit or held-out row under profile `hw`."""
    return (row_estimate(row, hw).decode_tok_s - row["measured"]) / row["measured"]


def repredicted(row: dict, hw) -> dict:
    """A measured row with its predictions and error made again under `hw` and today's cost model."""
    est = row_estimate(row, hw)
    return {**row, "predicted": est.decode_tok_s, "predicted_total": est.total_tok_s,
            "error": (est.decode_tok_s - row["measured"]) / row["measured"]}


def case_key(row: dict) -> tuple | None:
    """What makes two measured rows the same case: model, placement and its rule, block, options, lengths and
    dtype (None for a row that does not say)."""
    fields = ("model", "percent", "bs", "nb", "prompt_len", "gen_len", "dtype")
    if any(f not in row for f in fields):
        return None
    return (row["model"], tuple(row["percent"]), row.get("weight_placement", "flexgen"), row["bs"], row["nb"],
            json.dumps(row.get("options", {}), sort_keys=True), row["prompt_len"], row["gen_len"], row["dtype"])


def median_abs(errors: list[float]) -> float:
    errs = sorted(abs(e) for e in errors)
    return errs[len(errs) // 2]


def fit_profile(hw, rows: list[dict], grid: dict = FIT_GRID):
    """The profile with the fitted constants that give the lowest median absolute error on `rows`, one constant
    at a time over its grid (twice round, as they interact), and that error."""
    import dataclasses

    base = {k: getattr(hw, k) for k in grid}
    best = hw
    for _ in range(2):
        for key, values in grid.items():
            if key == "dequant_bw" and not hw.dequant_bw:
                continue
            scored = []
            for v in values:
                value = v if key in ABSOLUTE else base[key] * v
                trial = dataclasses.replace(best, **{key: value})
                # ties go to the value nearest the profile's own
                scored.append((round(median_abs([row_error(r, trial) for r in rows]), 9), abs(value - base[key]),
                               value))
            best = dataclasses.replace(best, **{key: min(scored)[2]})
    return dataclasses.replace(best, name=f"{hw.name} (fitted on {len(rows)} runs)"), median_abs(
        [row_error(r, best) for r in rows])


def error_record(rows: list[dict], kind: str, source: str) -> dict:
    """The accuracy record `flexserve plan` reads: median and worst absolute error over the rows measured."""
    errs = [abs(r["error"]) for r in rows if r.get("error") is not None]
    if not errs:
        raise SystemExit("no measured rows: nothing to report")
    return {"kind": kind, "median_abs_error": median_abs(errs), "worst_abs_error": max(errs),
            "num_runs": len(errs), "num_models": len({r["model"] for r in rows if r.get("error") is not None}),
            "source": source, "rows": rows}


# Hand policies measured beside the planner's under a cap: FlexGen's README policy for OPT-30B on a 16 GB GPU,
# and an earlier choice of the planner (before the CPU-attention overlap was fitted).
CAP_HAND_POLICIES = {
    "opt-30b": [("FlexGen README policy", (20, 80, 0, 100, 0, 100), 16, 3, ["--cpu-cache-compute"]),
                ("earlier planner choice", (2, 98, 17, 83, 100, 0), 32, 2, ["--cpu-cache-compute"])],
}


def capped_cases(model: str, hw, args, sweep: bool) -> list[tuple]:
    """`--policy auto` under the caps, and with `--cap-sweep` the planner's best at other GPU batch sizes
    plus the hand policies: the measured sweep that the auto choice must come within 10% of."""
    from flexserve.config import preset
    from flexserve.errors import PolicyError
    from flexserve.planner import search

    def best(sizes=None, **kw):
        if sizes:
            kw["gpu_batch_sizes"] = sizes
        return search(preset(model), hw, args.prompt_len, args.gen_len, gpu_mem=args.gpu_mem,
                      cpu_mem=args.cpu_mem, **kw).policy

    auto = best()
    cases = [("auto", *case_of(auto))]
    # other block shapes, and the other side of the CPU-attention choice: a different kind of policy, not a
    # neighbour of the auto one
    alternatives = [(f"planner best at gpu batch {size}", [size], {}) for size in CAP_BATCH_SIZES]
    alternatives.append((f"planner best with {'GPU' if auto.cpu_cache_compute else 'CPU'} attention", None,
                         {"cpu_cache_compute": not auto.cpu_cache_compute}))
    for label, sizes, kw in (alternatives if sweep else ()):
        try:
            case = case_of(best(sizes, **kw))
        except PolicyError:
            continue
        if case not in [c[1:] for c in cases]:
            cases.append((label, *case))
    for label, *case in (CAP_HAND_POLICIES.get(model, []) if sweep else []):
        if tuple(case) not in [c[1:] for c in cases]:
            cases.append((label, *case))
    return cases


CAP_BATCH_SIZES = (8, 16, 32, 64)


def run_case(model: str, percent, bs: int, nb: int, extra: list[str], hw, args, group: str,
             prompt_len: int | None = None, gen_len: int | None = None, dtype: str | None = None) -> dict:
    got = measure(model, percent, bs, nb, extra, args, prompt_len, gen_len, dtype)
    est = predict(model, percent, bs, nb, extra, hw, args, prompt_len, gen_len, dtype)
    meas = got.get("decode_tok_s")
    row = dict(group=group, model=model, percent=list(percent), block=f"{bs}x{nb}", extra=" ".join(extra),
               bs=bs, nb=nb, options=policy_options(extra), prompt_len=prompt_len or args.prompt_len,
               gen_len=gen_len or args.gen_len, dtype=dtype or args.dtype,
               predicted=est.decode_tok_s, measured=meas, error=(est.decode_tok_s - meas) / meas if meas else None,
               predicted_total=est.total_tok_s, measured_total=got.get("total_tok_s"),
               peak_gpu_gb=got.get("peak_gpu_gb"), failure=got.get("error"))
    print(f"{group:34s} {model:12s} {' '.join(map(str, percent)):22s} {bs}x{nb} {' '.join(extra):20s} predicted "
          f"{est.decode_tok_s:10.1f}  measured {meas if meas is not None else float('nan'):10.1f}  "
          f"total {row['measured_total'] or float('nan'):8.1f}  peak GPU {row['peak_gpu_gb'] or 0:.1f} GB",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="h100", help="profile name, 'saved', or a JSON file")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--quick", action="store_true", help="tiny CPU shapes (checks the script, not the planner)")
    ap.add_argument("--auto", default=None, help="also run --policy auto for MODEL under the --gpu-mem/--cpu-mem caps")
    ap.add_argument("--gpu-mem", default="16GiB")
    ap.add_argument("--cpu-mem", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-sweep", action="store_true", help="skip the policy list; only --auto")
    ap.add_argument("--cap-sweep", action="store_true",
                    help="with --auto: also measure the planner's best at other GPU batch sizes and the hand "
                         "policies under the same caps, and compare the auto choice with the best of them")
    ap.add_argument("--cap-pick", default=None, help="with --cap-sweep: measure only these indices of the capped "
                    "list (0 = auto), comma-separated")
    ap.add_argument("--sweep-pick", default=None, help="measure only these indices of the policy list")
    ap.add_argument("--fit", action="store_true", help="fit the profile's fitted constants on the fit set "
                    "(GPU_CASES measured now, or with --fit-from-tally the recorded runs) and report its error")
    ap.add_argument("--fit-from-tally", action="store_true", help="with --fit: the runs of bench/planner_tally.py")
    ap.add_argument("--save-profile", default=None, help="with --fit: write the fitted profile (JSON) here")
    ap.add_argument("--held-out", action="store_true", help="measure HELD_OUT_CASES (never used for fitting) and "
                    "report the error of --hardware on them")
    ap.add_argument("--held-out-pick", default=None, help="only these indices of HELD_OUT_CASES")
    ap.add_argument("--accuracy", default=None, help="write the error record `flexserve plan` quotes here")
    ap.add_argument("--merge", nargs="+", default=None, help="merge held-out records into one (--accuracy); a "
                    "later record's run of a case replaces an earlier one's")
    ap.add_argument("--repredict", action="store_true", help="with --merge: predict every row again with "
                    "--hardware and the cost model as it is now")
    args = ap.parse_args()
    if args.repredict and not args.merge:
        ap.error("--repredict goes with --merge")
    from flexserve.planner import resolve_hardware, save_hardware

    if args.merge:
        merged: dict[tuple, dict] = {}  # a later record's run of the same case replaces an earlier one
        for path in args.merge:
            for i, r in enumerate(json.load(open(path))["rows"]):
                key = case_key(r) or (path, i)
                if r.get("measured") or key not in merged:  # a failed re-run does not drop a measured one
                    merged[key] = r
        rows = list(merged.values())
        if args.repredict:  # today's cost model under --hardware, on the same measurements
            hw = resolve_hardware(args.hardware)
            rows = [repredicted(r, hw) if r.get("measured") else r for r in rows]
        record = error_record(rows, "held-out", "bench/planner_validation.py --held-out, merged from "
                              + ", ".join(os.path.basename(p) for p in args.merge))
        print(f"held-out: median absolute error {record['median_abs_error']:.1%}, worst "
              f"{record['worst_abs_error']:.1%} over {record['num_runs']} runs on {record['num_models']} models")
        if args.accuracy:
            with open(args.accuracy, "w") as f:
                json.dump(record, f, indent=1)
        return
    hw = resolve_hardware(args.hardware)
    if args.fit:
        if args.fit_from_tally:
            fit_rows = tally_rows()
        else:
            fit_rows = [dict(model=m, percent=list(p), bs=bs, nb=nb, options=policy_options(extra),
                             prompt_len=args.prompt_len, gen_len=args.gen_len, dtype=args.dtype,
                             measured=measure(m, p, bs, nb, extra, args).get("decode_tok_s"))
                        for m, p, bs, nb, extra in GPU_CASES]
            fit_rows = [r for r in fit_rows if r["measured"]]
        before = median_abs([row_error(r, hw) for r in fit_rows])
        fitted, after = fit_profile(hw, fit_rows)
        print(f"fit set: {len(fit_rows)} runs on {len({r['model'] for r in fit_rows})} models; median absolute "
              f"error {before:.1%} with '{hw.name}', {after:.1%} fitted (this is the fitted-set error)")
        for key in FIT_GRID:
            print(f"  {key}: {getattr(hw, key):.4g} -> {getattr(fitted, key):.4g}")
        if args.save_profile:
            print(f"saved {save_hardware(fitted, args.save_profile)}")
        return
    if args.held_out:
        cases = HELD_OUT_CASES
        if args.held_out_pick:
            cases = [cases[int(i)] for i in args.held_out_pick.split(",") if int(i) < len(cases)]
        rows = [run_case(m, p, bs, nb, extra, hw, args, "held-out", pl, gl, dt)
                for m, p, bs, nb, extra, pl, gl, dt in cases]
        record = error_record(rows, "held-out", f"bench/planner_validation.py --held-out on '{hw.name}'")
        print(f"\nheld-out: median absolute error {record['median_abs_error']:.1%}, worst "
              f"{record['worst_abs_error']:.1%} over {record['num_runs']} runs on {record['num_models']} models")
        print("PLANNER_HELD_OUT " + json.dumps(record))
        if args.accuracy:
            with open(args.accuracy, "w") as f:
                json.dump(record, f, indent=1)
        return
    cases = [] if args.no_sweep else CPU_CASES if args.quick else GPU_CASES
    if args.sweep_pick:  # a subset of the policy list (indices), e.g. the cases a short device call still owes
        cases = [cases[int(i)] for i in args.sweep_pick.split(",") if int(i) < len(cases)]
    if args.quick:
        args.dtype, args.prompt_len, args.gen_len = "float32", 32, 4
    rows = [run_case(model, percent, bs, nb, extra, hw, args, "sweep") for model, percent, bs, nb, extra in cases]
    if args.auto:
        capped = capped_cases(args.auto, hw, args, args.cap_sweep)
        if args.cap_pick:  # a subset (indices into the list), e.g. to split the sweep over two GPUs
            capped = [capped[int(i)] for i in args.cap_pick.split(",") if int(i) < len(capped)]
        for label, percent, bs, nb, extra in capped:
            rows.append(run_case(args.auto, percent, bs, nb, extra, hw, args, f"cap {args.gpu_mem}: {label}"))
    errors = sorted(abs(r["error"]) for r in rows if r["error"] is not None)
    median = errors[len(errors) // 2] if errors else None
    print("\n| group | model | --percent | block | flags | predicted decode tok/s | measured | error | "
          "predicted / measured total tok/s | peak GPU GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        err = f"{r['error']:+.1%}" if r["error"] is not None else (r["failure"] or "-")
        meas = f"{r['measured']:.1f}" if r["measured"] is not None else "-"
        total = f"{r['predicted_total']:.1f} / {r['measured_total']:.1f}" if r["measured_total"] else "-"
        peak = f"{r['peak_gpu_gb']:.1f}" if r["peak_gpu_gb"] else "-"
        print(f"| {r['group']} | {r['model']} | {' '.join(map(str, r['percent']))} | {r['block']} | {r['extra']} | "
              f"{r['predicted']:.1f} | {meas} | {err} | {total} | {peak} |")
    capped = [r for r in rows if r["group"].startswith("cap") and r["measured_total"]]
    auto_row = next((r for r in capped if r["group"].endswith(": auto")), None)
    if auto_row and len(capped) > 1:
        for key, what in (("measured_total", "total"), ("measured", "decode")):
            top = max(capped, key=lambda r: r[key])
            print(f"auto vs best of the capped sweep ({what} tok/s): {auto_row[key]:.1f} / {top[key]:.1f} = "
                  f"{auto_row[key] / top[key]:.1%} (best: {top['group']})")
    print(f"\nmedian absolute error: {median:.1%}" if median is not None else "\nno successful runs")
    print("PLANNER_VALIDATION " + json.dumps({"hardware": hw.name, "rows": rows, "median_abs_error": median}))
    if args.plot and errors:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if r["measured"]]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.loglog([r["measured"] for r in ok], [r["predicted"] for r in ok], "o")
        lo, hi = min(r["measured"] for r in ok) / 2, max(r["measured"] for r in ok) * 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("measured decode tok/s")
        ax.set_ylabel("predicted decode tok/s")
        ax.set_title(f"planner vs measured ({hw.name})")
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
