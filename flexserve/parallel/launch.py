"""Entry points for parallel generation: a Python API inside a process group, and the torchrun command.

    torchrun --nproc-per-node 2 -m flexserve.parallel.generate --model M --tensor-parallel 2 \
        --prompt-token-ids '[[1, 2, 3], [4, 5]]' --max-tokens 8

Every rank runs the same program; rank 0 prints the result. `add_parallel_arguments` and
`run_parallel_generate` let `flexserve generate --tensor-parallel/--pipeline-parallel` reuse the same path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import torch

from ..errors import FlexServeError, PolicyError, RequestError
from .groups import Groups, Layout, check_degrees, init_from_env, local_device, make_groups
from .pipeline import PipelineRunner


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device, family: str) -> torch.dtype:
    from ..engine.llm import resolve_dtype

    return resolve_dtype(dtype, device, family)


def parallel_generate(model: str | None, prompts_token_ids: Sequence[Sequence[int]], max_tokens: int,
                      tensor_parallel: int = 1, pipeline_parallel: int = 1, dtype: str | torch.dtype = "auto",
                      device: str | torch.device | None = None, num_micro_batches: int | None = None,
                      stop_token_ids: Sequence[int] = (), policy=None,
                      offload_dir: str | None = None) -> list[list[int]]:
    """Greedy token ids for every prompt, on every rank of an initialised process group (collective).

    The group must hold exactly tensor_parallel x pipeline_parallel ranks; without an initialised group the
    degrees must be 1 and this runs in the calling process. `model` is what `open_source` takes. `policy`
    (weight percentages, --compress-weight) places each stage's own layers on its GPU, CPU and disk."""
    import torch.distributed as dist

    from ..weights import DummySource, open_source

    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    source = open_source(model, dtype=torch.float32, device="cpu")
    check_degrees(source.config, tensor_parallel, pipeline_parallel, world)
    dev = local_device() if device is None or str(device) == "cuda" else torch.device(device)
    dt = _resolve_dtype(dtype, dev, source.config.family)
    if isinstance(source, DummySource):  # random weights are made straight in the runtime dtype and device
        source.dtype, source.device = dt, dev
    layout = Layout(tensor_parallel, pipeline_parallel, rank)
    groups = make_groups(layout) if world > 1 else Groups(layout)
    runner = PipelineRunner(source, groups, dev, dt, policy, offload_dir)
    try:
        prompts = [[int(t) for t in p] for p in prompts_token_ids]
        if not prompts:
            return []
        return runner.generate(prompts, max_tokens, num_micro_batches, frozenset(int(t) for t in stop_token_ids))
    finally:
        runner.close()


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """`--tensor-parallel`, `--pipeline-parallel`, `--num-micro-batches` (for `flexserve generate` too)."""
    g = p.add_argument_group("parallelism (launch with torchrun; degrees multiply to the process count)")
    g.add_argument("--tensor-parallel", "-tp", type=int, default=1, help="ranks that split every layer")
    g.add_argument("--pipeline-parallel", "-pp", type=int, default=1, help="stages of contiguous layers")
    g.add_argument("--num-micro-batches", type=int, default=None,
                   help="micro-batches in flight through the pipeline (default: the number of stages)")


def _prompts_from_args(args, model: str | None) -> list[list[int]]:
    raw_ids = getattr(args, "prompt_token_ids", None)
    if raw_ids:
        try:
            ids = json.loads(raw_ids)
        except json.JSONDecodeError as e:
            raise RequestError(f"--prompt-token-ids is not JSON: {e}") from None
        if ids and isinstance(ids[0], int):
            ids = [ids]
        return [[int(t) for t in p] for p in ids]
    texts = list(getattr(args, "prompt", None) or []) * getattr(args, "num_prompts", 1)
    if not texts:
        raise RequestError("give --prompt-token-ids or prompt text")
    from ..tokenizer import Tokenizer
    from ..weights import default_model_path, open_source

    path = model if model is not None else default_model_path()
    tok = Tokenizer(path, open_source(path).config.vocab_size)
    if getattr(args, "raw", True):
        return [tok.encode(t) for t in texts]
    return [tok.chat_prompt([{"role": "user", "content": t}]) for t in texts]


def run_parallel_generate(args) -> int:
    """Generate under torchrun from parsed arguments; rank 0 prints. Returns the exit status."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    try:
        if getattr(args, "temperature", 0.0) not in (0, 0.0) or getattr(args, "n", 1) != 1:
            raise PolicyError("parallel generation is greedy only: use --temperature 0 and -n 1")
        device = getattr(args, "device", None)
        rank, _ = init_from_env("gloo" if device == "cpu" else None)
        prompts = _prompts_from_args(args, args.model)
        stop = () if getattr(args, "ignore_eos", False) else _eos_ids(args.model)
        policy = None
        if hasattr(args, "percent"):  # placement flags: each stage offloads its own layers
            from ..cli import policy_from_args

            if getattr(args, "policy", None) == "auto":
                raise PolicyError("--policy auto does not plan parallel runs yet: give --percent")
            policy = policy_from_args(args)
        out = parallel_generate(args.model, prompts, args.max_tokens, args.tensor_parallel, args.pipeline_parallel,
                                dtype=getattr(args, "dtype", "auto"), device=device,
                                num_micro_batches=args.num_micro_batches, stop_token_ids=stop, policy=policy,
                                offload_dir=getattr(args, "offload_dir", None))
        if rank == 0:
            if getattr(args, "prompt_token_ids", None):
                print(json.dumps(out), flush=True)
            else:
                _print_text(args.model, out[:len(args.prompt)])
        return 0
    except FlexServeError as e:
        # Every rank reports: the checks fail on all of them at once, and torchrun stops the others as soon as
        # the first one exits, so a message left to rank 0 alone could be lost.
        print(f"flexserve: error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _eos_ids(model: str | None) -> tuple[int, ...]:
    from ..weights import open_source

    return open_source(model).config.eos_ids


def _print_text(model: str | None, out: list[list[int]]) -> None:
    from ..tokenizer import Tokenizer
    from ..weights import default_model_path, open_source

    path = model if model is not None else default_model_path()
    tok = Tokenizer(path, open_source(path).config.vocab_size)
    for ids in out:
        print(tok.decode(ids).strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexserve.parallel.generate",
                                description="tensor/pipeline parallel greedy generation (run under torchrun)")
    p.add_argument("--model", default=None, help="HF folder, .gguf file or dummy:PRESET")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is present, else cpu")
    p.add_argument("--prompt-token-ids", default=None, help="JSON list of prompts, each a list of token ids")
    p.add_argument("prompt", nargs="*", help="prompt text (tokenised without a chat template)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    add_parallel_arguments(p)
    from ..cli import add_policy_arguments

    add_policy_arguments(p)  # weight placement per stage (cache and activations stay on each stage's device)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_parallel_generate(build_parser().parse_args(argv))
