"""Tensor/pipeline parallel greedy generation under torchrun: `flexserve generate -tp N -pp M` and the
stand-alone command

    torchrun --nproc-per-node 2 -m flexserve.parallel.generate --model M --tensor-parallel 2 \
        --prompt-token-ids '[[1, 2, 3], [4, 5]]' --max-tokens 8

Every rank runs the same program (`flexserve.parallel.parallel_generate`); rank 0 prints the result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import FlexServeError, PolicyError, RequestError
from .common import add_policy_arguments, policy_from_args


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """`--tensor-parallel`, `--pipeline-parallel`, `--num-micro-batches` (for `flexserve generate` too)."""
    g = p.add_argument_group("parallelism (launch with torchrun; degrees multiply to the process count)")
    g.add_argument("--tensor-parallel", "-tp", type=int, default=1, help="ranks that split every layer")
    g.add_argument("--pipeline-parallel", "-pp", type=int, default=1, help="stages of contiguous layers")
    g.add_argument("--num-micro-batches", type=int, default=None,
                   help="micro-batches in flight through the pipeline (default: the number of stages)")


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
    add_policy_arguments(p)  # weight placement per stage (cache and activations stay on each stage's device)
    return p


def _tokenizer(model: str | None):
    from ..tokenizer import Tokenizer
    from ..weights import default_model_path, open_source

    path = model if model is not None else default_model_path()
    return Tokenizer(path, open_source(path).config.vocab_size)


def prompts_from_args(args: argparse.Namespace) -> list[list[int]]:
    """Token ids from `--prompt-token-ids` (JSON), else the prompt texts tokenised (chat template unless --raw)."""
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
    tok = _tokenizer(args.model)
    if getattr(args, "raw", True):
        return [tok.encode(t) for t in texts]
    return [tok.chat_prompt([{"role": "user", "content": t}]) for t in texts]


def run_parallel_generate(args: argparse.Namespace) -> int:
    """Generate under torchrun from parsed arguments; rank 0 prints. Returns the exit status."""
    import torch.distributed as dist

    from ..parallel import parallel_generate
    from ..parallel.groups import init_from_env

    rank = int(os.environ.get("RANK", "0"))
    try:
        if getattr(args, "temperature", 0.0) not in (0, 0.0) or getattr(args, "n", 1) != 1:
            raise PolicyError("parallel generation is greedy only: use --temperature 0 and -n 1")
        device = getattr(args, "device", None)
        rank, _ = init_from_env("gloo" if device == "cpu" else None)
        prompts = prompts_from_args(args)
        stop = () if getattr(args, "ignore_eos", False) else _eos_ids(args.model)
        if getattr(args, "policy", None) == "auto":
            raise PolicyError("--policy auto does not plan parallel runs yet: give --percent")
        policy = policy_from_args(args)  # placement flags: each stage offloads its own layers
        out = parallel_generate(args.model, prompts, args.max_tokens, args.tensor_parallel, args.pipeline_parallel,
                                dtype=getattr(args, "dtype", "auto"), device=device,
                                num_micro_batches=args.num_micro_batches, stop_token_ids=stop, policy=policy,
                                offload_dir=getattr(args, "offload_dir", None))
        if rank == 0:
            if getattr(args, "prompt_token_ids", None):
                print(json.dumps(out), flush=True)
            else:
                tok = _tokenizer(args.model)
                for ids in out[:len(args.prompt)]:
                    print(tok.decode(ids).strip())
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
    from ..models.loading import model_config

    return model_config(model).eos_ids


def main(argv: list[str] | None = None) -> int:
    return run_parallel_generate(build_parser().parse_args(argv))
