"""Issue 5's check: the planner's predicted throughput against measured runs, and `--policy auto` under caps.

For every policy in the list it runs `flexserve bench throughput` (a subprocess each, so peak memory and CUDA
state do not leak between runs), asks `flexserve.planner.estimate` for the same policy on the same hardware
profile, and reports the relative error; `--auto` adds the planner's own choice under the given memory caps
(e.g. a T4-like 16 GiB GPU), and `--cap-sweep` the planner's best at other GPU batch sizes and hand policies
(FlexGen's README policy) under the same caps, with the auto choice's fraction of the best of them. Writes a markdown table, one JSON line
and a predicted-vs-measured scatter plot.

    python bench/planner_validation.py --hardware h100 --gen-len 8 --plot bench/plots/planner_vs_measured.png
    python bench/planner_validation.py --hardware h100 --gen-len 8 --no-sweep --auto opt-30b --gpu-mem 16GiB --cap-sweep
    python bench/planner_validation.py --device cpu --quick      # tiny shapes, to check the script itself
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


def measure(model: str, percent, bs: int, nb: int, extra: list[str], args) -> dict:
    cmd = [sys.executable, "-m", "flexserve.cli", "bench", "throughput", "--model", f"dummy:{model}",
           "--dtype", args.dtype, "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--json",
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


def case_of(policy) -> tuple:
    """(percent, gpu batch size, num gpu batches, extra flags) of a planner policy, for `measure`."""
    extra = [flag for flag, on in (("--cpu-cache-compute", policy.cpu_cache_compute),
                                   ("--compress-weight", policy.compress_weight),
                                   ("--compress-cache", policy.compress_cache)) if on]
    return tuple(int(round(p)) for p in policy.percent), policy.gpu_batch_size, policy.num_gpu_batches, extra


def predict(model: str, percent, bs: int, nb: int, extra: list[str], hw, args):
    from flexserve.config import preset
    from flexserve.planner import estimate

    dtype_bytes = 4 if args.dtype == "float32" else 2
    return estimate(preset(model), policy_of(percent, bs, nb, extra), hw, args.prompt_len, args.gen_len,
                    dtype_bytes=dtype_bytes, placed=True)  # the shares the executor really places


# Hand policies measured beside the planner's under a cap: FlexGen's README policy for OPT-30B on a 16 GB GPU,
# and the planner's choice of session 2 (before the CPU-attention overlap was fitted).
CAP_HAND_POLICIES = {
    "opt-30b": [("FlexGen README policy", (20, 80, 0, 100, 0, 100), 16, 3, ["--cpu-cache-compute"]),
                ("planner choice, session 2", (2, 98, 17, 83, 100, 0), 32, 2, ["--cpu-cache-compute"])],
}


def capped_cases(model: str, hw, args, sweep: bool) -> list[tuple]:
    """`--policy auto` under the caps, and with `--cap-sweep` the planner's best at other GPU batch sizes
    plus the hand policies: the measured sweep that the auto choice must come within 10% of."""
    from flexserve.config import preset
    from flexserve.errors import PolicyError
    from flexserve.planner import search

    def best(sizes=None):
        kw = {"gpu_batch_sizes": sizes} if sizes else {}
        return search(preset(model), hw, args.prompt_len, args.gen_len, gpu_mem=args.gpu_mem,
                      cpu_mem=args.cpu_mem, **kw).policy

    auto = best()
    cases = [("auto", *case_of(auto))]
    for size in (CAP_BATCH_SIZES if sweep else ()):
        try:
            case = case_of(best([size]))
        except PolicyError:
            continue
        if case not in [c[1:] for c in cases]:
            cases.append((f"planner best at gpu batch {size}", *case))
    for label, *case in (CAP_HAND_POLICIES.get(model, []) if sweep else []):
        if tuple(case) not in [c[1:] for c in cases]:
            cases.append((label, *case))
    return cases


CAP_BATCH_SIZES = (8, 16, 32, 64)


def run_case(model: str, percent, bs: int, nb: int, extra: list[str], hw, args, group: str) -> dict:
    got = measure(model, percent, bs, nb, extra, args)
    est = predict(model, percent, bs, nb, extra, hw, args)
    meas = got.get("decode_tok_s")
    row = dict(group=group, model=model, percent=list(percent), block=f"{bs}x{nb}", extra=" ".join(extra),
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
    args = ap.parse_args()
    from flexserve.planner import resolve_hardware

    hw = resolve_hardware(args.hardware)
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
