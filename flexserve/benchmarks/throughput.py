"""`flexserve bench throughput`: FlexGen's offline benchmark (one block, prompt P, generate G) on our executor.

Reports prefill, decode and total tokens/s the way FlexGen does (decode = block_size * (G - 1) / decode time,
total = block_size * G / (prefill + decode time)), peak GPU and CPU memory, and the fraction of the transfer
bound reached: each decode step must move every offloaded weight byte over the host link once.
"""
from __future__ import annotations

import json
import time

import psutil
import torch

from ..offload.policy import Policy
from .settings import ThroughputSettings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transfer_bound(llm, h2d_gbps: float, disk_gbps: float | None) -> dict:
    """Decode-step lower bound from offloaded weight bytes (the REFERENCE.md method)."""
    from ..memory.tiers import Tier

    cpu = disk = 0
    for layer in llm.executor.layers:
        for h in layer.streamed.values():
            if h.tier is Tier.DISK:
                disk += h.nbytes
            elif h.tier is Tier.CPU:  # packed weights kept on the GPU never cross PCIe
                cpu += h.nbytes
    step = cpu / (h2d_gbps * 1e9) + (disk / (disk_gbps * 1e9) if disk and disk_gbps else 0.0)
    return {"offloaded_cpu_bytes": cpu, "offloaded_disk_bytes": disk, "bound_step_s": step}


def print_result(result: dict, as_json: bool) -> None:
    """The figures one per line (and one `FLEXSERVE_RESULT {json}` line), for either engine's run."""
    for k in ("prefill_tok_s", "decode_tok_s", "total_tok_s", "bound_decode_tok_s"):
        if k in result:
            v = result[k]
            print(f"{k:>20}: {v:,.2f}" if v is not None else f"{k:>20}: -")
    print(f"{'peak GPU / CPU (GB)':>20}: {result['peak_gpu_gb'] or 0:.2f} / {result['peak_cpu_rss_gb']:.2f}")
    if result.get("fraction_of_bound") is not None:
        print(f"{'fraction of bound':>20}: {result['fraction_of_bound']:.1%}")
    if as_json:
        print("FLEXSERVE_RESULT " + json.dumps(result))


def run_throughput(args: ThroughputSettings, policy: Policy | None) -> int:
    """Run the benchmark under `policy` (None: resident, automatic block) and print its figures."""
    from tqdm import tqdm

    from ..engine.llm import LLM
    from ..weights import open_source

    model = args.model or "dummy:opt-125m"
    config = open_source(model).config
    if getattr(args, "engine", "offload") == "paged":
        from .paged_throughput import run_paged_throughput

        return run_paged_throughput(args, policy)
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, policy=policy, offload_dir=args.offload_dir, device=args.device,
              progress=True)
    load_s = time.perf_counter() - t0
    ex = llm.executor
    pol = ex.policy if policy is None else policy
    bs, nb = pol.gpu_batch_size, pol.num_gpu_batches
    dev = ex.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(10, config.vocab_size, (bs, args.prompt_len), generator=gen) for _ in range(nb)]
    pos = [torch.arange(args.prompt_len).expand(bs, -1) for _ in range(nb)]
    from ..offload.budget import check_fits

    check_fits(config, pol, torch.empty((), dtype=ex.dtype).element_size(), args.prompt_len + args.gen_len, dev,
               weights_placed=True)
    warm = ex.new_block([1], 18)  # first CUDA/cuBLAS use pays one-off initialisation: keep it out of the timing
    ex.forward(warm, [torch.ones(1, 16, dtype=torch.long)], [torch.arange(16)[None]], [None])
    ex.forward(warm, [torch.ones(1, 1, dtype=torch.long)], [torch.tensor([[16]])], [None])
    ex.release_block(warm)
    state = ex.new_block([bs] * nb, args.prompt_len + args.gen_len)
    bar = tqdm(total=args.gen_len, desc="bench", unit="step")
    _sync(dev)
    t = time.perf_counter()
    logits = ex.forward(state, ids, pos, [None] * nb)
    nxt = [lg.argmax(-1, keepdim=True).cpu() for lg in logits]
    _sync(dev)
    prefill_s = time.perf_counter() - t
    bar.update(1)
    t = time.perf_counter()
    prof = None
    for step in range(1, args.gen_len):
        if args.profile and step == args.gen_len - 2:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            prof = profile(activities=acts)
            prof.__enter__()
        pos = [p[:, -1:] + 1 for p in pos]
        logits = ex.forward(state, nxt, pos, [None] * nb)
        nxt = [lg.argmax(-1, keepdim=True).cpu() for lg in logits]  # the host needs the token, as in real use
        bar.update(1)
    _sync(dev)
    decode_s = time.perf_counter() - t
    bar.close()
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(args.profile)
        for key in (["self_cuda_time_total"] if dev.type == "cuda" else []) + ["self_cpu_time_total"]:
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=50))
    block = bs * nb
    if ex.timers:
        print("host time by activity (whole run): " + ", ".join(f"{k} {v:.2f}" for k, v in ex.timers.items()))
    if args.h2d_gbps:
        h2d = args.h2d_gbps
    else:
        from ..planner.calibrate import copy_bandwidths

        h2d = copy_bandwidths(dev)["h2d_pinned_bw"] / 1e9
    bound = transfer_bound(llm, h2d, args.disk_gbps)
    decode_tps = block * (args.gen_len - 1) / decode_s if args.gen_len > 1 else 0.0
    bound_tps = block / bound["bound_step_s"] if bound["bound_step_s"] > 0 else None
    result = {
        "model": model, "policy": pol.percent_flags(), "weight_placement": pol.weight_placement,
        "dtype": str(ex.dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "prompt_len": args.prompt_len, "gen_len": args.gen_len, "block": block, "load_s": round(load_s, 2),
        "prefill_tok_s": block * args.prompt_len / prefill_s, "decode_tok_s": decode_tps,
        "total_tok_s": block * args.gen_len / (prefill_s + decode_s),
        "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
        "peak_cpu_rss_gb": psutil.Process().memory_info().rss / 1e9,
        "h2d_gbps": h2d, "bound_decode_tok_s": bound_tps,
        "disk_io": "buffered (page cache not bypassed)" if bound["offloaded_disk_bytes"] else None,
        "fraction_of_bound": decode_tps / bound_tps if bound_tps else None, **bound,
    }
    print_result(result, args.json)
    ex.release_block(state)
    llm.close()
    return 0
