"""FlexGen 0.1.8's pipeline-parallel mode (`flexgen.dist_flex_opt`) run offline with dummy weights: the peer
of the OPT-175B pipeline runs. One process per GPU, started by torchrun; FlexGen's own initializer is
given torchrun's rank and world size, on the port after torchrun's. FlexGen asks the model hub for an OPT
tokenizer even with dummy weights, so a stand-in that returns fixed-length token ids takes its place (the
content of the prompts does not change the timing); everything else is FlexGen's code. The last rank prints
FlexGen's own figures ("decode throughput: ... token/s"). Note FlexGen's block: gpu_batch_size x
num_gpu_batches x world_size prompts (16 for 8 x 1 on two GPUs).

    torchrun --nproc-per-node 2 bench/peer_flexgen_dist.py --model facebook/opt-175b --percent 80 20 100 0 100 0 \\
        --compress-weight --gpu-batch-size 8 --num-gpu-batches 1 --prompt-len 512 --gen-len 8
"""
from __future__ import annotations

import argparse
import os
import tempfile

import flexgen.dist_flex_opt as dist_opt
from flexgen.dist_utils import initialize_distributed
from flexgen.flex_opt import DUMMY_WEIGHT


class _FixedPrompts:
    """Stands in for the OPT tokenizer: every prompt becomes BOS plus `max_length - 1` ordinary token ids."""

    class _Encoded:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, prompts, max_length=None, **_):
        length = max_length or 8
        return self._Encoded([[2] + [200 + j % 500 for j in range(length - 1)] for _ in prompts])

    def batch_decode(self, ids, **_):
        return ["" for _ in ids]

    @classmethod
    def from_pretrained(cls, *_, **__):
        return cls()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dist_opt.add_parser_arguments(parser)
    dist_opt.add_distributed_parser_arguments(parser)
    parser.set_defaults(path=DUMMY_WEIGHT, no_log=True,
                        offload_dir=os.path.join(tempfile.gettempdir(), "flexgen_dist_offload"))
    args = parser.parse_args()
    args.rank, args.local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    os.makedirs(args.offload_dir, exist_ok=True)
    initialize_distributed(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]) + 1,
                           args.world_size, args.rank, args.local_rank, args.comm_device)
    dist_opt.AutoTokenizer = _FixedPrompts
    dist_opt.run_flexgen_dist(args)


if __name__ == "__main__":
    main()
