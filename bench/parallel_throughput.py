"""Throughput of tensor/pipeline-parallel generation, one JSON line from rank 0.

    torchrun --nproc-per-node 2 bench/parallel_throughput.py --model dummy:llama-3-70b --dtype bfloat16 \
        --tensor-parallel 2 --batch 16 --prompt-len 512 --gen-len 32

The model is built once (`PipelineRunner`); a warm-up generation, then one with a single new token (the
prefill) and one with `--gen-len` tokens are timed; decode throughput is (gen_len - 1) * batch over the
difference. Same prompt/generation shape as `flexserve bench throughput`, so the two compare directly.
On a machine without GPUs it runs on gloo/CPU (use a small model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from flexserve.engine.llm import resolve_dtype  # noqa: E402
from flexserve.parallel.groups import Groups, Layout, check_degrees, init_from_env, local_device, make_groups  # noqa: E402
from flexserve.offload.policy import Policy  # noqa: E402
from flexserve.parallel.pipeline import PipelineRunner  # noqa: E402
from flexserve.weights import DummySource, open_source  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy:llama-3-70b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tensor-parallel", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel", "-pp", type=int, default=1)
    p.add_argument("--num-micro-batches", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--percent", nargs=6, type=float, default=None,
                   help="weight placement of each stage (W_GPU W_CPU 100 0 100 0); default all on the GPU")
    p.add_argument("--compress-weight", action="store_true")
    p.add_argument("--offload-dir", default=None)
    args = p.parse_args()
    rank, world = init_from_env() if "RANK" in os.environ else (0, 1)  # plain python: one process
    source = open_source(args.model, dtype=torch.float32, device="cpu")
    check_degrees(source.config, args.tensor_parallel, args.pipeline_parallel, world)
    dev = local_device()
    dt = resolve_dtype(args.dtype, dev, source.config.family)
    if isinstance(source, DummySource):
        source.dtype, source.device = dt, dev
    layout = Layout(args.tensor_parallel, args.pipeline_parallel, rank)
    groups = make_groups(layout) if world > 1 else Groups(layout)
    t0 = time.perf_counter()
    policy = Policy.from_percent(args.percent or (100, 0, 100, 0, 100, 0), compress_weight=args.compress_weight) \
        if args.percent or args.compress_weight else None
    runner = PipelineRunner(source, groups, dev, dt, policy, args.offload_dir)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, min(source.config.vocab_size, 10_000), (args.batch, args.prompt_len),
                            generator=g).tolist()

    def timed(n: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dist.barrier() if world > 1 else None
        t = time.perf_counter()
        runner.generate(prompts, n, args.num_micro_batches)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t

    timed(2)  # warm-up: kernels, NCCL communicators
    prefill_s = timed(1)
    total_s = timed(args.gen_len)
    decode_s = max(total_s - prefill_s, 1e-9)
    if rank == 0:
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        print("PARALLEL_RESULT " + json.dumps({
            "model": args.model, "tp": args.tensor_parallel, "pp": args.pipeline_parallel, "world": world,
            "batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "load_s": round(load_s, 1),
            "prefill_tok_s": args.batch * args.prompt_len / prefill_s,
            "decode_tok_s": args.batch * (args.gen_len - 1) / decode_s,
            "total_tok_s": args.batch * args.gen_len / total_s, "total_s": total_s,
            "peak_gpu_gib_rank0": mem}), flush=True)
    runner.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
