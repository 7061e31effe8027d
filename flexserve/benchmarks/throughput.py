"""`flexserve bench throughput`: FlexGen's offline benchmark (one block, prompt P, generate G) on our executor.

Reports prefill, decode and total tokens/s the way FlexGen does (decode = block_size * (G - 1) / decode time,
total = block_size * G / (prefill + decode time)), peak GPU and CPU memory, and the fraction of the transfer
bound reached: each decode step must move every offloaded weight byte over the host link once.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import psutil
import torch

from ..offload.policy import Policy
from .settings import ThroughputSettings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transfer_bound(llm, h2d_gbps: float, disk_gbps: float | None) -> dict:
    """Decode-step lower bound from offloaded weight bytes (the REFERENCE.md method). Experts of a mixture
    that live off the GPU count with the bytes a step is expected to reach (`moe_cost.reached_expert_bytes`),
    as if copied in: an expert the rule computes on the CPU instead can beat this bound."""
    from ..memory.tiers import Tier
    from ..planner.moe_cost import reached_expert_bytes

    pol = llm.executor.policy
    reached = reached_expert_bytes(llm.executor, pol.gpu_batch_size, pol.num_gpu_batches)
    cpu, disk = reached["cpu"], reached["disk"]
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


@dataclass
class TimedBlock:
    """What one timed block produced: every sequence's tokens, and where the time went."""

    token_ids: list[list[int]]  # per prompt, the generated tokens
    prefill_s: float  # the prefill, up to the first tokens on the host
    decode_s: float  # every decode step after it
    probed: float | None = None  # what `probe` grew by over the decode steps (None without a probe)


class _StepClock:
    """`on_step` of the benchmark's generation: marks the prefill and the end of the decode (the device
    synchronised at those marks only, so the weights of the next step keep loading during a step), moves the
    progress bar, and profiles the last two decode steps when asked."""

    def __init__(self, device: torch.device, gen_len: int, profile: str | None, bar, probe=None):
        self.device, self.gen_len, self.profile, self.bar, self.probe = device, gen_len, profile, bar, probe
        self.start = self.decode_start = 0.0
        self.prefill_s = self.decode_s = 0.0
        self.probe_marks: list[float] = []
        self.prof = None

    def __call__(self, steps: int) -> None:
        if steps in (0, 1, self.gen_len):
            _sync(self.device)
            now = time.perf_counter()
            if steps == 0:
                self.start = now
            if steps == 1:
                self.prefill_s, self.decode_start = now - self.start, now
            if steps == self.gen_len:
                self.decode_s = now - self.decode_start
            if self.probe is not None and steps in (1, self.gen_len):
                self.probe_marks.append(self.probe())
        if steps:
            self.bar.update(1)
        if self.profile and steps >= 1 and steps == self.gen_len - 2:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()


def greedy_block(ex, prompts: list[list[int]], gen_len: int, gpu_batch_size: int, profile: str | None = None,
                 progress: bool = True, probe=None) -> TimedBlock:
    """Generate `gen_len` greedy tokens for every prompt (eos ignored) as one block of `gpu_batch_size` batches,
    through the generation loop `LLM.generate` runs; `profile` writes a torch.profiler trace of the last two
    decode steps there; `probe()`, a running total read at the first and last decode step, is reported as what
    it grew by over the decode."""
    from tqdm import tqdm

    from ..engine.block import run_block
    from ..engine.generation import Sequence
    from ..engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    unused = torch.Generator()  # greedy: no draws
    seqs = [Sequence(list(p), params, unused, set()) for p in prompts]
    bar = tqdm(total=gen_len, desc="bench", unit="step", disable=not progress)
    clock = _StepClock(ex.device, gen_len, profile, bar, probe)
    run_block(ex, seqs, gpu_batch_size, on_step=clock)
    bar.close()
    if clock.prof is not None:
        clock.prof.__exit__(None, None, None)
        clock.prof.export_chrome_trace(profile)
        for key in (["self_cuda_time_total"] if ex.device.type == "cuda" else []) + ["self_cpu_time_total"]:
            print(clock.prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=50))
    marks = clock.probe_marks
    return TimedBlock([s.out_ids for s in seqs], clock.prefill_s, clock.decode_s,
                      marks[-1] - marks[0] if len(marks) == 2 else None)


def run_throughput(args: ThroughputSettings, policy: Policy | None) -> int:
    """Run the benchmark under `policy` (None: resident, automatic block) and print its figures."""
    from ..engine.llm import LLM

    model = args.model or "dummy:opt-125m"
    if getattr(args, "engine", "offload") == "paged":
        from .paged_throughput import run_paged_throughput

        return run_paged_throughput(args, policy)
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, policy=policy, offload_dir=args.offload_dir, device=args.device,
              progress=True)
    load_s = time.perf_counter() - t0
    ex, config = llm.executor, llm.config
    pol = ex.policy if policy is None else policy
    bs, nb = pol.gpu_batch_size, pol.num_gpu_batches
    dev = ex.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, config.vocab_size, (bs * nb, args.prompt_len), generator=gen).tolist()
    from ..offload.budget import check_fits

    check_fits(config, pol, torch.empty((), dtype=ex.dtype).element_size(), args.prompt_len + args.gen_len, dev,
               weights_placed=True)
    # First use of each kernel pays one-off costs (CUDA module loading, cuBLAS's choice for the shape, Triton
    # specialisations): a 16-token prefill and a decode step of one GPU batch at the timed batch size, before
    # the clock, so that the decode's matrix shapes are met here and not inside the timed steps.
    greedy_block(ex, [[1] * 16] * bs, 2, bs, progress=False)
    modelled = (lambda: ex.experts.modelled_s) if config.is_moe else None
    timed = greedy_block(ex, prompts, args.gen_len, bs, args.profile, probe=modelled)
    prefill_s, decode_s = timed.prefill_s, timed.decode_s
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
    if config.is_moe:
        result.update(expert_columns(ex, block, decode_tps, timed.probed, args.gen_len - 1))
    print_result(result, args.json)
    llm.close()
    return 0


def expert_columns(ex, block: int, decode_tps: float, modelled_s: float | None = None, steps: int = 0) -> dict:
    """For a mixture of experts: how its off-GPU experts ran (`expert_runs`: on the GPU, copied in, reused from
    a slot, computed on the CPU), the rates the rule measured, the decode bound of the division the streamer
    made (`modelled_s`: its off-GPU experts' time over the `steps` decode steps at those rates, the CPU and the
    copies running at the same time), and the bound had every reached expert been computed on the CPU at the
    measured host-read rate (the transfer bound assumes they are copied)."""
    from ..planner.moe_cost import reached_expert_bytes

    out = {"expert_runs": dict(ex.experts.counts)}
    rates = ex.experts.rates
    if rates is not None:
        out["expert_rates"] = {"cpu_flops": rates.cpu_flops, "host_read_gbps": rates.host_read_bytes / 1e9,
                               "pcie_gbps": rates.pcie_bytes / 1e9,
                               "cpu_time_factor": ex.experts.cpu_time_factor}  # measured / probed CPU time
        cpu_bytes = reached_expert_bytes(ex, ex.policy.gpu_batch_size, ex.policy.num_gpu_batches,
                                         shared_copies=False)["cpu"]  # the CPU reads each batch's experts
        if cpu_bytes:
            bound = block / (cpu_bytes / rates.host_read_bytes)
            out["bound_decode_tok_s_cpu_experts"] = bound
            out["fraction_of_cpu_experts_bound"] = decode_tps / bound
    if modelled_s and steps:
        bound = block * steps / modelled_s
        out["bound_decode_tok_s_split_experts"] = bound
        out["fraction_of_split_experts_bound"] = decode_tps / bound
    return out
