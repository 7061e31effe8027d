"""Does the shared generation loop cost an offloaded decode anything? Two loops over one loaded model, one process.

`flexserve bench throughput` drives the offloading executor through the generation loop every front end shares
(`engine.generation`: sequences, sampling, stop checks, left-padded feeds). This script times, on the same
executor and the same block, that loop against the bare minimum a benchmark needs: `executor.forward` over
the block's batches and a per-batch argmax brought to the host. Run back to back in one process, on one
host, the two figures differ only by the loop; the executor's host timers (CPU attention, waits) are printed
for each.

    python bench/loop_ab.py --model dummy:opt-30b --dtype float16 --percent 20 80 0 100 0 100 \
        --gpu-batch-size 16 --num-gpu-batches 3 --cpu-cache-compute
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from flexserve.benchmarks.throughput import greedy_block
from flexserve.engine.llm import LLM
from flexserve.offload.policy import Policy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(ex, prompts: list[list[int]], gen_len: int, bs: int) -> float:
    """Decode seconds of `gen_len - 1` steps after the prefill: forward, then each batch's argmax on the host."""
    nb = len(prompts) // bs
    ids = [torch.tensor(prompts[k * bs:(k + 1) * bs]) for k in range(nb)]
    pos = [torch.arange(ids[0].shape[1]).expand(bs, -1) for _ in range(nb)]
    state = ex.new_block([bs] * nb, ids[0].shape[1] + gen_len)
    try:
        logits = ex.forward(state, ids, pos, [None] * nb)
        nxt = [lg.argmax(-1, keepdim=True).cpu() for lg in logits]
        _sync(ex.device)
        t = time.perf_counter()
        for _ in range(1, gen_len):
            pos = [p[:, -1:] + 1 for p in pos]
            logits = ex.forward(state, nxt, pos, [None] * nb)
            nxt = [lg.argmax(-1, keepdim=True).cpu() for lg in logits]
        _sync(ex.device)
        return time.perf_counter() - t
    finally:
        ex.release_block(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dummy:opt-125m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two loops this many times")
    ap.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0],
                    help="FlexGen's placement: weights, cache, activations on GPU and CPU")
    ap.add_argument("--gpu-batch-size", type=int, default=8)
    ap.add_argument("--num-gpu-batches", type=int, default=1)
    ap.add_argument("--cpu-cache-compute", action="store_true", help="decode attention on the CPU")
    args = ap.parse_args()
    w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu = args.percent
    policy = Policy(gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches, w_gpu_percent=w_gpu,
                    w_cpu_percent=w_cpu, cache_gpu_percent=c_gpu, cache_cpu_percent=c_cpu, act_gpu_percent=a_gpu,
                    act_cpu_percent=a_cpu, cpu_cache_compute=args.cpu_cache_compute)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, policy=policy)
    ex = llm.executor
    bs, nb = ex.policy.gpu_batch_size, ex.policy.num_gpu_batches
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, llm.config.vocab_size, (bs * nb, args.prompt_len), generator=gen).tolist()
    greedy_block(ex, [[1] * 16], 2, 1, progress=False)  # one-off CUDA/cuBLAS initialisation
    tokens = bs * nb * (args.gen_len - 1)
    for r in range(args.rounds):
        for name in ("bare", "shared"):
            ex.timers.clear()
            if name == "bare":
                seconds = bare_loop(ex, prompts, args.gen_len, bs)
            else:
                seconds = greedy_block(ex, prompts, args.gen_len, bs, progress=False).decode_s
            print("LOOP_AB_RESULT " + json.dumps({"round": r, "loop": name, "decode_tok_s": round(tokens / seconds, 2),
                                           "timers_s": {k: round(v, 2) for k, v in ex.timers.items()}}))
    llm.close()


if __name__ == "__main__":
    main()
