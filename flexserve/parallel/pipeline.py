"""Pipeline parallelism (with tensor parallelism inside each stage): one rank's share of a model and its loop.

The decoder layers are cut into `pp` contiguous stages; stage 0 also embeds, the last stage also runs the LM
head. The prompts are split into micro-batches, each with its own dense, left-padded KV cache on every stage.
Hidden states [b, S, D] go stage to stage with point-to-point sends (non-blocking, so a stage starts its next
micro-batch while the last one is still on the wire): while stage 1 runs micro-batch 0, stage 0 runs
micro-batch 1. The last stage picks greedy tokens and broadcasts them to every rank, so every stage knows the
next step's shapes and when a micro-batch has finished, and stage 0 can embed the new tokens. With at least
`pp` micro-batches the pipeline stays full in decode too: stage 0 waits for a micro-batch's token only when it
comes round to that micro-batch again.

Each rank reads only its own stage's layers from the weight source (`StageSource`), cut to its tensor shard,
so a stage is a complete `WeightSource` of its own: the piece that the offloading placement can take over.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..engine.generation import Block, Sequence, generate
from ..engine.sampling import SamplingParams
from ..errors import RequestError
from ..models.attention import AttnMeta, dense_attend
from ..models.forward import Batch, EachBatch, Ends, forward
from ..offload.executor import OffloadExecutor
from ..offload.placement import EMBED_KEYS
from ..offload.policy import Policy
from ..weights import WeightSource, layer_weights
from .groups import Groups, Layout, stage_bounds
from .tensor import all_reduce_fn, shard_config, shard_layer


class StageSource:
    """The weights one rank owns: its stage's decoder layers, cut to its tensor shard, plus the globals the
    stage needs (the embedding on the first stage, final norm and LM head on the last). Layers are read lazily
    from the full source, one at a time; `config` is the shard's config with the stage's layer count."""

    is_fused = True  # layer_parts returns canonical (fused) weights

    def __init__(self, source: WeightSource, layout: Layout):
        full = source.config
        self.source, self.layout, self.full_config = source, layout, full
        self.lo, self.hi = stage_bounds(full.num_layers, layout.pp, layout.stage)
        self.config: ModelConfig = shard_config(full, layout.tp).replace(num_layers=self.hi - self.lo)

    def layer_parts(self, index: int) -> dict[str, torch.Tensor]:
        w = layer_weights(self.source, self.lo + index)
        return shard_layer(self.full_config, w, self.layout.tp_rank, self.layout.tp)

    def global_parts(self) -> dict[str, torch.Tensor]:
        glob = self.source.global_parts()
        keep = set()
        if self.layout.is_first:
            keep.update(EMBED_KEYS)
        if self.layout.is_last:
            keep.update(k for k in glob if k not in EMBED_KEYS)
            if self.full_config.tie_word_embeddings:
                keep.add("embed.weight")
        return {k: v for k, v in glob.items() if k in keep}


@dataclass
class StageCache:
    """One micro-batch's dense KV cache on this stage."""

    k: list[torch.Tensor] = field(default_factory=list)  # per local layer [S_max, b, Hkv/tp, hd]
    v: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # tokens in the cache


class PipelineRunner:
    """One rank's part of a tensor x pipeline parallel model; `generate` is collective over all ranks.

    It is the generation loop's model (`engine.generation.generate`): a step runs this stage's micro-batches
    one after another. The sampler rank (last stage, first tensor rank) samples each micro-batch as soon as its
    logits exist and broadcasts the tokens; the other last-stage ranks take them at once, earlier stages only
    when that micro-batch comes round again, so the first stage starts micro-batch 1 while the last one still
    computes micro-batch 0."""

    def __init__(self, source: WeightSource, groups: Groups, device: torch.device, dtype: torch.dtype,
                 policy: Policy | None = None, offload_dir: str | None = None):
        self.layout: Layout = groups.layout
        self.full_config = source.config
        stage = StageSource(source, self.layout)
        self.cfg = stage.config  # the shard's shape: what the layer math sees
        self.device, self.dtype = device, dtype
        policy = policy or Policy()
        policy.require_weights_only("pipeline stages keep their KV cache and activations on their device",
                                    offload_dir)
        # Each stage places its own layers under the policy and streams the offloaded ones layer by layer,
        # exactly as a single-GPU offloaded model does (resident when the policy is all-GPU).
        self.executor = OffloadExecutor(stage, policy, device, dtype, offload_dir)
        self.reduce = all_reduce_fn(groups.tp_group) if self.layout.tp > 1 else None
        self._caches: list[StageCache] = []
        self._awaiting: list[bool] = []  # micro-batch -> its last tokens are still to come by broadcast
        self._sends: dict[int, tuple[object, torch.Tensor]] = {}  # micro-batch -> its pending send and buffer

    # --- one micro-batch through this stage ------------------------------------------------------------------
    def _stage_forward(self, j: int, ids: torch.Tensor, positions: torch.Tensor,
                       key_valid: torch.Tensor | None) -> torch.Tensor | None:
        """Micro-batch j's next tokens (ids, positions [b, S]) through this stage's layers. Returns, on the last
        stage, the logits of each row's last position [b, V]; elsewhere None (the hidden states went on)."""
        cache = self._caches[j]
        s = ids.shape[1]
        meta = AttnMeta(cache.length, s, key_valid.to(self.device) if key_valid is not None else None)
        decoders = EachBatch(self.cfg, lambda li, _: dense_attend(cache.k[li], cache.v[li], meta), self.reduce)
        logits = forward(self.executor, [Batch(ids, positions.to(self.device))], decoders, _StageEnds(self, j))[0]
        cache.length += s
        return logits

    def _new_cache(self, size: int, max_len: int) -> StageCache:
        cache = StageCache()
        shape = (max_len, size, self.cfg.num_kv_heads, self.cfg.head_dim)
        for _ in range(self.cfg.num_layers):
            cache.k.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            cache.v.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        return cache

    def step(self, block: Block) -> None:
        """One generation step: every unfinished micro-batch once through this stage (see the class docstring).
        The order of broadcasts, (step, micro-batch), is the same on every rank."""
        lay = self.layout
        for j, feed in enumerate(block.feeds):
            size = len(block.batches[j])
            if self._awaiting[j]:
                block.accept(j, self._broadcast_tokens(size).tolist())
                self._awaiting[j] = False
            if block.batch_done(j):
                continue
            logits = self._stage_forward(j, feed.ids, feed.positions, feed.key_valid)
            if lay.rank == lay.sampler_rank:
                result = block.sample(j, logits)
                self._broadcast_tokens(size, result.chosen)
                block.accept(j, result.token_ids, result)
            elif lay.is_last:
                block.accept(j, self._broadcast_tokens(size).tolist())
            else:
                self._awaiting[j] = True

    # --- generation --------------------------------------------------------------------------------------------
    def check_prompts(self, prompts: list[list[int]], max_tokens: int) -> None:
        cfg = self.full_config
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}")
        for p in prompts:
            if not p:
                raise RequestError("a prompt is empty")
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise RequestError(f"prompt token ids must be in 0..{cfg.vocab_size - 1}")
            if len(p) + max_tokens > cfg.max_position:
                raise RequestError(f"a prompt of {len(p)} tokens plus {max_tokens} new ones exceeds the context "
                                   f"window of {cfg.max_position}")

    def generate(self, prompts: list[list[int]], max_tokens: int, num_micro_batches: int | None = None,
                 stop_token_ids: set[int] | frozenset[int] = frozenset()) -> list[list[int]]:
        """Greedy generation; every rank must call it with the same arguments and gets the same token ids.

        Prompts are sorted by length and cut into `num_micro_batches` (default: the number of stages), each
        left-padded to its own longest prompt."""
        self.check_prompts(prompts, max_tokens)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        m = max(1, min(num_micro_batches or self.layout.pp, len(prompts)))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        unused = torch.Generator()  # greedy: no draws
        seqs = [Sequence(list(p), params, unused, set(stop_token_ids)) for p in prompts]
        block = Block([[seqs[i] for i in order[c * len(order) // m:(c + 1) * len(order) // m]] for c in range(m)])
        self._caches = [self._new_cache(len(b), f.ids.shape[1] + max_tokens)
                        for b, f in zip(block.batches, block.feeds)]
        self._awaiting, self._sends = [False] * m, {}
        generate(self, block)
        for work, _ in self._sends.values():
            work.wait()
        self._caches, self._sends = [], {}
        return [s.out_ids for s in seqs]

    def close(self) -> None:
        """Stop the stage's I/O threads and remove its offload files."""
        self.executor.close()

    def _broadcast_tokens(self, size: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The sampler rank's tokens [b] on every rank (a no-op on a single process)."""
        if self.layout.world_size == 1:
            return tokens
        buf = tokens.to(torch.long).contiguous() if self.layout.rank == self.layout.sampler_rank else \
            torch.empty(size, dtype=torch.long, device=self.device)
        dist.broadcast(buf, src=self.layout.sampler_rank)
        return buf


class _StageEnds(Ends):
    """Micro-batch j's hidden states [b, S, D] between stages: received from the previous stage (all but the
    first), sent to the next without waiting (the stage goes on with its next micro-batch while this one is on
    the wire), or scored on the last stage."""

    def __init__(self, runner: PipelineRunner, j: int):
        self.runner, self.j = runner, j
        lay = runner.layout
        self.prev, self.next = lay.rank_of(lay.stage - 1, lay.tp_rank), lay.rank_of(lay.stage + 1, lay.tp_rank)

    def enter(self, k: int, batch: Batch) -> torch.Tensor | None:
        r = self.runner
        if r.layout.is_first:
            return None
        x = torch.empty(*batch.ids.shape, r.cfg.hidden_size, dtype=r.dtype, device=r.device)
        dist.recv(x, src=self.prev)
        return x

    def leave(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        r = self.runner
        if r.layout.is_last:
            return x[:, -1]
        if self.j in r._sends:  # the last send of this micro-batch's buffer must be done before a new one
            r._sends.pop(self.j)[0].wait()
        x = x.contiguous()
        r._sends[self.j] = (dist.isend(x, dst=self.next), x)
        return None
