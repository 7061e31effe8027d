"""Paged attention kernel against the GPU's own bounds: prefill in TFLOP/s beside PyTorch's FlashAttention
(dense, contiguous, no block tables: the ceiling a paged kernel aims for), decode in GB/s of KV read beside the
measured HBM copy rate. `--sweep` times the prefill launch settings and prints the best.

    python bench/attention_kernel.py [--sweep] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexserve.engine.paged_batch import PagedBatch, SeqChunk, paged_attend
from flexserve.kernels import paged_attention as pa


def _timed(fn, reps: int = 20) -> float:
    """Median GPU milliseconds of `fn`, replayed from a CUDA graph so that launch overhead (which the engine's
    decode graphs also remove) does not count."""
    import triton.testing

    fn()  # compile, build the step's metadata
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=reps * 10, return_mode="median")


def _batch(spec: list[tuple[int, int]], block: int, dev: torch.device) -> tuple[PagedBatch, int]:
    """Sequences (start, n) laid out in scattered blocks of a pool; returns the batch and the pool's blocks."""
    g = torch.Generator().manual_seed(0)
    need = sum(-(-(s + n) // block) for s, n in spec)
    perm = torch.randperm(need, generator=g).tolist()
    seqs, at = [], 0
    for start, n in spec:
        nb = -(-(start + n) // block)
        seqs.append(SeqChunk([1] * n, start, perm[at:at + nb], True))
        at += nb
    return PagedBatch.build(seqs, block, dev), need


def prefill(heads: int, kv_heads: int, hd: int, num_seqs: int, length: int, block: int = 16) -> dict:
    """Causal prefill of `num_seqs` prompts of `length` tokens: kernel vs dense FlashAttention."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    batch, nblocks = _batch([(0, length)] * num_seqs, block, dev)
    t = num_seqs * length
    pool = torch.randn(2, nblocks * block, kv_heads, hd, device=dev, dtype=dt)
    q = torch.randn(1, t, heads, hd, device=dev, dtype=dt)
    k = torch.randn(1, t, kv_heads, hd, device=dev, dtype=dt)
    attend = paged_attend(pool, batch)
    ms = _timed(lambda: attend(q, k, k))
    qd = torch.randn(num_seqs, heads, length, hd, device=dev, dtype=dt)
    kd = torch.randn(num_seqs, kv_heads, length, hd, device=dev, dtype=dt)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref_ms = _timed(lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True, enable_gqa=True))
    flops = 4 * num_seqs * heads * hd * length * (length + 1) / 2
    return {"case": f"prefill H{heads}/{kv_heads} hd{hd} {num_seqs}x{length}", "kernel_ms": round(ms, 3),
            "kernel_tflops": round(flops / ms / 1e9, 1), "flash_sdpa_ms": round(ref_ms, 3),
            "flash_sdpa_tflops": round(flops / ref_ms / 1e9, 1), "kernel_vs_flash": round(ref_ms / ms, 2)}


def decode(heads: int, kv_heads: int, hd: int, num_seqs: int, ctx: int, hbm_gbps: float, block: int = 16) -> dict:
    """One decode token per sequence over `ctx` cached positions: GB/s of K and V read."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    batch, nblocks = _batch([(ctx - 1, 1)] * num_seqs, block, dev)
    pool = torch.randn(2, nblocks * block, kv_heads, hd, device=dev, dtype=dt)
    q = torch.randn(1, num_seqs, heads, hd, device=dev, dtype=dt)
    k = torch.randn(1, num_seqs, kv_heads, hd, device=dev, dtype=dt)
    attend = paged_attend(pool, batch)
    ms = _timed(lambda: attend(q, k, k))
    kv_bytes = 2 * num_seqs * ctx * kv_heads * hd * 2
    splits = pa._num_splits(num_seqs, kv_heads, batch.block_tables.shape[1] * block, dev)
    return {"case": f"decode H{heads}/{kv_heads} hd{hd} {num_seqs}x{ctx}", "kernel_ms": round(ms, 4),
            "kv_gbps": round(kv_bytes / ms / 1e6, 1), "fraction_of_hbm": round(kv_bytes / ms / 1e6 / hbm_gbps, 3),
            "splits": splits}


def hbm_gbps() -> float:
    """Device copy rate (bytes read + written) of a 2 GiB buffer."""
    a = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    ms = _timed(lambda: b.copy_(a))
    return 2 * a.numel() * 2 / ms / 1e6


def sweep(heads: int, kv_heads: int, hd: int, num_seqs: int, length: int) -> dict:
    """Time every prefill launch setting on one shape; keep the best in `PREFILL_LAUNCH` for the run."""
    best = None
    for bn, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
        pa.PREFILL_LAUNCH.update(block_n=bn, num_warps=warps, num_stages=stages)
        try:
            r = prefill(heads, kv_heads, hd, num_seqs, length)
        except Exception as e:  # a setting over the shared-memory limit
            print(json.dumps({"block_n": bn, "num_warps": warps, "num_stages": stages, "error": str(e)[:80]}))
            continue
        r.update(block_n=bn, num_warps=warps, num_stages=stages)
        print(json.dumps(r))
        if best is None or r["kernel_ms"] < best["kernel_ms"]:
            best = r
    pa.PREFILL_LAUNCH.update(block_n=best["block_n"], num_warps=best["num_warps"], num_stages=best["num_stages"])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="time the prefill launch settings first")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.sweep:
        print("BEST", json.dumps(sweep(32, 8, 128, 8, 2048)))
        print("BEST", json.dumps(sweep(32, 32, 128, 8, 1024)))
    bw = hbm_gbps()
    rows = [{"case": "HBM copy", "gbps": round(bw, 1)}]
    for heads, kvh, hd in ((32, 8, 128), (32, 32, 128), (9, 3, 64)):
        for n, length in ((32, 512), (8, 2048), (2, 8192)):
            rows.append(prefill(heads, kvh, hd, n, length))
    for n, ctx in ((256, 640), (256, 2048), (64, 4096), (4, 16384), (1, 32768)):
        rows.append(decode(32, 8, 128, n, ctx, bw))
    rows.append(decode(32, 32, 128, 32, 544, bw))
    for r in rows:
        print(json.dumps(r) if args.json else "  ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
