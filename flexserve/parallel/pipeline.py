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
from ..engine.block import left_pad
from ..errors import RequestError
from ..models.attention import AttnMeta, dense_attention
from ..models.layers import attention_in, attention_out, lm_head, rope_cos_sin
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
class MicroBatch:
    """Sequences that travel the pipeline together, with their caches on this stage."""

    rows: list[int]  # indices into the caller's prompt list
    ids: torch.Tensor  # [b, S] the tokens to feed next (the padded prompts, then the last tokens)
    positions: torch.Tensor  # [b, S]
    valid: torch.Tensor  # [b, L] key validity so far, including `ids`
    is_padded: bool
    k: list[torch.Tensor] = field(default_factory=list)  # per local layer [S_max, b, Hkv/tp, hd]
    v: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # tokens in the cache
    out: list[list[int]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)
    done: bool = False

    @property
    def size(self) -> int:
        return len(self.rows)


class PipelineRunner:
    """One rank's part of a tensor x pipeline parallel model; `generate` is collective over all ranks."""

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

    # --- one micro-batch through this stage ------------------------------------------------------------------
    def _stage_forward(self, mb: MicroBatch, x: torch.Tensor | None) -> torch.Tensor:
        """Embed (first stage) or take the received hidden x [b, S, D]; run the stage's layers. The last stage
        returns the logits of each row's last position [b, V] instead of hidden states."""
        ex = self.executor
        s = mb.ids.shape[1]
        pos = mb.positions.to(self.device)
        meta = AttnMeta(mb.length, s, mb.valid.to(self.device) if mb.is_padded else None)
        rope = rope_cos_sin(ex.inv_freq, pos, self.dtype) if ex.inv_freq is not None else None
        for layer, w in ex.stream_layers():
            if layer.kind == "embed":
                if x is None:
                    x = ex.embed_batch(layer, w, mb.ids, pos)
            elif layer.kind == "head":
                if self.layout.is_last:
                    x = lm_head(self.cfg, w, x[:, -1])
            else:
                i = layer.index
                q, k, v = attention_in(self.cfg, w, x, rope)
                x = attention_out(self.cfg, w, x, dense_attention(q, k, v, mb.k[i], mb.v[i], meta),
                                  reduce=self.reduce)
        mb.length += s
        return x

    def _new_micro_batch(self, rows: list[int], prompts: list[list[int]], max_tokens: int) -> MicroBatch:
        plen = max(len(prompts[r]) for r in rows)
        ids, positions, valid = left_pad([prompts[r] for r in rows], plen)
        mb = MicroBatch(rows, ids, positions, valid, not bool(valid.all()),
                        out=[[] for _ in rows], stopped=[False] * len(rows))
        shape = (plen + max_tokens, len(rows), self.cfg.num_kv_heads, self.cfg.head_dim)
        for _ in range(self.cfg.num_layers):
            mb.k.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            mb.v.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        return mb

    def _accept(self, mb: MicroBatch, tokens: torch.Tensor, max_tokens: int, stop_ids: set[int]) -> None:
        """Append one greedy token per row (the same on every rank) and prepare the next step's inputs."""
        toks = tokens.tolist()
        for i, t in enumerate(toks):
            if not mb.stopped[i]:
                mb.out[i].append(t)
                mb.stopped[i] = t in stop_ids or len(mb.out[i]) >= max_tokens
        mb.done = all(mb.stopped)
        mb.ids = tokens.view(-1, 1).cpu()
        mb.positions = mb.positions[:, -1:] + 1
        mb.valid = torch.cat([mb.valid, torch.ones(mb.size, 1, dtype=torch.bool)], dim=1)

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

        Prompts are sorted by length and cut into `num_micro_batches` (default: the number of stages)."""
        self.check_prompts(prompts, max_tokens)
        lay = self.layout
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        m = max(1, min(num_micro_batches or lay.pp, len(prompts)))
        chunks = [order[i * len(order) // m:(i + 1) * len(order) // m] for i in range(m)]
        mbs = [self._new_micro_batch(rows, prompts, max_tokens) for rows in chunks]
        prev, nxt = lay.rank_of(lay.stage - 1, lay.tp_rank), lay.rank_of(lay.stage + 1, lay.tp_rank)
        sends: dict[int, tuple[object, torch.Tensor]] = {}  # micro-batch -> its pending send and buffer
        # Step t computes every unfinished micro-batch once; the extra step lets the stages that are not last
        # receive the final broadcast. The order of broadcasts is the same on every rank: (step, micro-batch).
        for step in range(max_tokens + 1):
            for j, mb in enumerate(mbs):
                if step > 0 and not lay.is_last and not mb.done:
                    self._accept(mb, self._broadcast_tokens(mb.size), max_tokens, stop_token_ids)
                if mb.done or step == max_tokens:
                    continue
                x = None
                if not lay.is_first:
                    x = torch.empty(mb.size, mb.ids.shape[1], self.cfg.hidden_size, dtype=self.dtype,
                                    device=self.device)
                    dist.recv(x, src=prev)
                x = self._stage_forward(mb, x)
                if not lay.is_last:
                    if j in sends:
                        sends.pop(j)[0].wait()
                    x = x.contiguous()
                    sends[j] = (dist.isend(x, dst=nxt), x)
                    continue
                tokens = x.float().argmax(-1)  # x: the last stage's logits [b, V]
                self._accept(mb, self._broadcast_tokens(mb.size, tokens), max_tokens, stop_token_ids)
        for work, _ in sends.values():
            work.wait()
        out: list[list[int]] = [[] for _ in prompts]
        for mb in mbs:
            for r, toks in zip(mb.rows, mb.out):
                out[r] = toks
        return out

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
