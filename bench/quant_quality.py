"""Perplexity of one model under every weight quantisation scheme and the fp8 KV cache, as a Markdown table.

    python bench/quant_quality.py [--model M] [--text FILE] [--window 512] [--stride 512]

Each row is `flexserve ppl` with the matching flags (`--quantization S`, `--kv-cache-dtype fp8`), scored on
the same text; the last column is the change against the unquantised run. Defaults: the default model
(SmolLM2-135M), float32 on the CPU, and chapters 10-12 of Pride and Prejudice (bench/data/), which the
calibrated schemes never see (they calibrate on chapters 1-3).
"""
from __future__ import annotations

import argparse
import os
import time

from flexserve.benchmarks.perplexity import perplexity

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "data", "pride_and_prejudice_ch10-12.txt")
ROWS = (
    ("unquantized", {}),
    ("fp8 (e4m3 W + per-token A)", {"quantization": "fp8"}),
    ("int8 W8A8 (SmoothQuant a=0.5)", {"quantization": "int8"}),
    ("rtn4 g128", {"quantization": "rtn4"}),
    ("awq g128", {"quantization": "awq"}),
    ("fp8 KV cache", {"kv_cache_dtype": "fp8"}),
    ("rtn4 g64", {"quantization": "rtn4", "quant_group_size": 64}),
    ("awq g64", {"quantization": "awq", "quant_group_size": 64}),
    ("rtn4 g32", {"quantization": "rtn4", "quant_group_size": 32}),
    ("awq g32", {"quantization": "awq", "quant_group_size": 32}),
    ("gguf (the file's own Q4_1 blocks, kept packed)", {"quantization": "gguf"}),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--only", default=None, help="comma-separated row numbers to run (0-based)")
    args = p.parse_args()
    rows = [r for i, r in enumerate(ROWS) if args.only is None or str(i) in args.only.split(",")]
    print("| configuration | perplexity | vs unquantized | seconds |")
    print("|---|---|---|---|")
    base = None
    for name, quant in rows:
        t0 = time.perf_counter()
        ppl = perplexity(args.model, args.text, dtype=args.dtype, device=args.device, window=args.window,
                         stride=args.stride, **quant)
        base = ppl if base is None and not quant else base
        delta = f"{(ppl / base - 1) * 100:+.2f}%" if base is not None else "n/a"
        print(f"| {name} | {ppl:.4f} | {delta} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
