"""Microbenchmark: decode attention on the CPU over a cache in host memory, by layout and dtype.

Decides how flexserve stores a KV cache that CPU attention reads (REFERENCE.md: 84-86 GB/s of cache read is
what this host reaches in bf16/fp32 with contiguous heads). Shapes default to one OPT-30B layer, 16 sequences.
"""
import argparse
import time

import torch
import torch.nn.functional as F


def bench(fn, reps=5):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--len", type=int, default=544)
    ap.add_argument("--heads", type=int, default=56)
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    b, L, h, d = a.batch, a.len, a.heads, a.head_dim
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.randn(b, h, 1, d, dtype=dt)
        seq_major = torch.randn(L, b, h, d, dtype=dt)  # [S, B, H, D] (flexserve's offload layout)
        head_major = torch.randn(b, h, L, d, dtype=dt)  # [B, H, S, D]
        nbytes = 2 * seq_major.numel() * seq_major.element_size()
        t1 = bench(lambda: F.scaled_dot_product_attention(q, seq_major.permute(1, 2, 0, 3),
                                                          seq_major.permute(1, 2, 0, 3)))
        t2 = bench(lambda: F.scaled_dot_product_attention(q, head_major, head_major))

        def manual():
            k = seq_major.permute(1, 2, 0, 3)
            s = torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5
            return torch.matmul(s.softmax(-1), k)
        t3 = bench(manual)
        big = torch.randn(b, h, L + 32, d, dtype=dt)  # a cache with room for 32 more tokens, read up to L
        t4 = bench(lambda: F.scaled_dot_product_attention(q, big[:, :, :L], big[:, :, :L]))
        mask = torch.zeros(1, 1, 1, L + 32, dtype=torch.bool)
        mask[..., :L] = True
        t5 = bench(lambda: F.scaled_dot_product_attention(q, big, big, attn_mask=mask))
        print(f"{str(dt):15s} head-major sliced {t4 * 1e3:7.2f} ms | full+mask {t5 * 1e3:7.2f} ms")
        print(f"{str(dt):15s} seq-major SDPA {t1 * 1e3:7.2f} ms ({nbytes / t1 / 1e9:5.1f} GB/s) | head-major SDPA "
              f"{t2 * 1e3:7.2f} ms ({nbytes / t2 / 1e9:5.1f} GB/s) | seq-major matmul {t3 * 1e3:7.2f} ms "
              f"({nbytes / t3 / 1e9:5.1f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
