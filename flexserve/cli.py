"""`flexserve generate | serve | plan | calibrate | ppl | bench`.

Every verb turns a `FlexServeError` into one clear line on stderr and exit status 1: users should never see a
traceback for a mistake of theirs (a missing model, a bad policy, a prompt too long).
"""
from __future__ import annotations

import argparse
import sys

from .errors import FlexServeError
from .offload.policy import WEIGHT_PLACEMENTS


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder, .gguf file or dummy:PRESET (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement policy (FlexGen's flags)")
    g.add_argument("--percent", nargs=6, type=float, metavar=("W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"),
                   help="percent of weights, KV cache, activations on GPU and CPU; the rest goes to disk")
    g.add_argument("--policy", choices=["auto"], help="auto: let the planner pick the policy")
    g.add_argument("--gpu-batch-size", type=int, default=None)
    g.add_argument("--num-gpu-batches", type=int, default=1)
    g.add_argument("--cpu-cache-compute", action="store_true", help="attention on the CPU where the cache is")
    g.add_argument("--cpu-attention-dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="dtype of the host cache that CPU attention reads (default: the model's)")
    g.add_argument("--weight-placement", choices=WEIGHT_PLACEMENTS, default=None,
                   help="how whole tensors meet the weight percentages: FlexGen's rule (default) or flexserve's "
                        "earlier largest-first rule (to reproduce runs made with it)")
    g.add_argument("--no-overlap", action="store_true", help="run loads, stores and compute in sequence")
    g.add_argument("--compress-weight", action="store_true", help="4-bit group-wise weight compression")
    g.add_argument("--compress-cache", action="store_true", help="4-bit group-wise KV cache compression")
    g.add_argument("--offload-dir", default=None, help="folder for the disk tier")
    g.add_argument("--gpu-mem", default=None, help="memory cap for --policy auto, e.g. 16GiB")
    g.add_argument("--cpu-mem", default=None)
    g.add_argument("--disk", default=None)


def policy_from_args(args, config=None, prompt_len: int = 512, gen_len: int = 32):
    """The `Policy` the flags describe, or None (fully resident, automatic batch) when none were given."""
    from .offload.policy import Policy

    if getattr(args, "policy", None) == "auto":
        from .errors import PolicyError
        from .planner import auto_policy

        if args.percent is not None:
            raise PolicyError("give either --policy auto or --percent, not both")
        return auto_policy(config, prompt_len, gen_len, gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem,
                           disk=args.disk)
    placement_flags = (args.percent, args.gpu_batch_size, args.cpu_cache_compute or None, args.no_overlap or None,
                       args.compress_weight or None, args.compress_cache or None,
                       args.num_gpu_batches if args.num_gpu_batches != 1 else None, args.cpu_attention_dtype,
                       args.weight_placement)
    if all(f is None for f in placement_flags):
        return None
    kw = dict(gpu_batch_size=args.gpu_batch_size or 1, num_gpu_batches=args.num_gpu_batches,
              overlap=not args.no_overlap, cpu_cache_compute=args.cpu_cache_compute,
              compress_weight=args.compress_weight, compress_cache=args.compress_cache,
              cpu_attention_dtype=args.cpu_attention_dtype, weight_placement=args.weight_placement or "flexgen")
    return Policy.from_percent(args.percent or (100, 0, 100, 0, 100, 0), **kw)


def _config_for(model):
    from .weights import open_source

    return open_source(model).config


# --- verbs -----------------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from . import LLM, SamplingParams

    if args.tensor_parallel > 1 or args.pipeline_parallel > 1:  # under torchrun: see docs/PARALLEL.md
        from .parallel.launch import run_parallel_generate

        return run_parallel_generate(args)

    config = _config_for(args.model) if args.policy == "auto" else None
    policy = policy_from_args(args, config, gen_len=args.max_tokens)
    llm = LLM(args.model, dtype=args.dtype, policy=policy, offload_dir=args.offload_dir, device=args.device)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop, n=args.n)
        prompts = args.prompt * args.num_prompts
        if args.raw:
            outs = llm.generate(prompts, params)
        else:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        for out in outs[: len(args.prompt)]:
            for c in out.outputs:
                print(c.text.strip())
    finally:
        llm.close()
    return 0


def cmd_ppl(args) -> int:
    from .benchmarks.perplexity import perplexity

    ppl = perplexity(args.model, args.file, dtype=args.dtype, device=args.device, window=args.window,
                     stride=args.stride)
    print(f"perplexity: {ppl:.4f}")
    return 0


def cmd_bench(args) -> int:
    if args.bench == "throughput":
        from .benchmarks.throughput import run_throughput

        return run_throughput(args)
    from .benchmarks.serve import run_serve_bench

    return run_serve_bench(args)


def cmd_serve(args) -> int:
    from .server.app import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    add_model_arguments(g)
    add_policy_arguments(g)
    g.add_argument("prompt", nargs="+")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("-n", type=int, default=1)
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    g.add_argument("--num-prompts", type=int, default=1, help="repeat the prompts (batched), e.g. to measure speed")
    from .parallel.launch import add_parallel_arguments

    add_parallel_arguments(g)
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity of a text file (sliding window)")
    add_model_arguments(p)
    p.add_argument("file")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.set_defaults(func=cmd_ppl)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_arguments(s)
    add_policy_arguments(s)
    from .server.args import add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks: throughput (offline) or serve (online)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bt = bsub.add_parser("throughput", help="offloaded generation throughput (FlexGen's benchmark)")
    add_model_arguments(bt)
    add_policy_arguments(bt)
    from .benchmarks.throughput import add_throughput_arguments

    add_throughput_arguments(bt)
    bs = bsub.add_parser("serve", help="replay a request trace against the serving engine")
    from .benchmarks.serve import add_serve_bench_arguments

    add_model_arguments(bs)
    add_serve_bench_arguments(bs)
    b.set_defaults(func=cmd_bench)

    from .planner.cli import add_calibrate_arguments, add_plan_arguments, run_calibrate, run_plan

    pl = sub.add_parser("plan", help="pick the fastest policy for a model and a memory budget")
    add_plan_arguments(pl)
    pl.set_defaults(func=run_plan)
    c = sub.add_parser("calibrate", help="measure this machine and save a hardware profile")
    add_calibrate_arguments(c)
    c.set_defaults(func=run_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlexServeError as e:
        print(f"flexserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flexserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
