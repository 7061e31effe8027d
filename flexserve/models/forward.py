"""One forward pass over the layer stream (embed -> decoder layers -> LM head), shared by every runner.

The offloading executor, the serving engine's model runner and the pipeline stages all walk the sequence of
pseudo-layers that `OffloadExecutor.stream_layers` yields, with the next layers' weights loading while one
computes. What differs between them is supplied by the caller, as two small objects:

- `Ends`: where each batch's hidden states come from (embedded here, or received from the previous pipeline
  stage) and which of them the LM head scores (every position, each row's last, the rows to sample) or none
  (this stage sent them on).
- `Decoders`: how one decoder layer runs over the batches and where hidden states wait between layers.
  `EachBatch` runs `decoder_layer` on each batch in turn with the caller's attention (a dense cache, the paged
  pools). The offloading executor keeps FlexGen's block schedule: one layer's weights serve every GPU batch of
  the block, cache slots are loaded ahead and stored behind each batch, attention may run on the CPU, and
  activations may wait on another tier.

Nothing here synchronises with the device, so the serving engine can capture this forward in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from ..config import ModelConfig
from .layers import AttendFn, Weights, decoder_layer, lm_head, rope_cos_sin

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
AttendFor = Callable[[int, int], AttendFn]  # (decoder layer index, batch index) -> attend(q, k, v) of that cache


class StreamedLayer(Protocol):
    kind: str  # "embed" | "decoder" | "head"
    index: int  # decoder index, -1 for embed and head


class LayerStream(Protocol):
    """A model's pseudo-layers with their weights on the compute device, in order (`OffloadExecutor`)."""

    cfg: ModelConfig
    dtype: torch.dtype
    inv_freq: torch.Tensor | None

    def stream_layers(self) -> Iterator[tuple[StreamedLayer, Weights]]: ...

    def embed_batch(self, layer: StreamedLayer, w: Weights, ids: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Batch:
    """The new tokens of one batch."""

    ids: torch.Tensor  # [B, S] token ids
    positions: torch.Tensor  # [B, S] their positions, on the compute device
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [B, S, 1, hd]: set by `forward`


class Ends:
    """The two ends of the layers this process runs. This base class is a whole model in one process that
    embeds every batch and scores each row's last position (the next token of every sequence)."""

    def enter(self, k: int, batch: Batch) -> torch.Tensor | None:
        """Batch k's hidden states [B, S, D] from a previous pipeline stage, or None to embed it here."""
        return None

    def leave(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        """After the last decoder layer, x [B, S, D]: the hidden states the LM head scores ([..., D]), or None
        when nothing is scored here (they went on to another stage)."""
        return x[:, -1]


class AllPositions(Ends):
    """Score every position of every row (prompt log-probabilities, perplexity)."""

    def leave(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        return x


LAST_POSITION = Ends()
ALL_POSITIONS = AllPositions()


class Decoders:
    """How decoder layers run over the batches; hidden states wait between layers where `hold` puts them
    (this base class: on the compute device, as they are)."""

    def hold(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        """Keep batch k's hidden states until the next layer; returns what `fetch` gets back."""
        return x

    def fetch(self, k: int, held: torch.Tensor | None) -> torch.Tensor:
        """Batch k's hidden states on the compute device again."""
        return held

    def run(self, index: int, w: Weights, hidden: list, batches: Sequence[Batch]) -> None:
        """Decoder layer `index` over every batch; `hidden[k]` (as `hold` left it) is replaced in place."""
        raise NotImplementedError


class EachBatch(Decoders):
    """Each batch through the layer in turn, attending through its own cache (`attend(layer, batch)`);
    `reduce` sums tensor-parallel partial outputs (see `attention_out`)."""

    def __init__(self, cfg: ModelConfig, attend: AttendFor, reduce: ReduceFn | None = None):
        self.cfg, self.attend, self.reduce = cfg, attend, reduce

    def run(self, index: int, w: Weights, hidden: list, batches: Sequence[Batch]) -> None:
        for k, b in enumerate(batches):
            hidden[k] = decoder_layer(self.cfg, w, hidden[k], b.rope, self.attend(index, k), self.reduce)


def forward(stream: LayerStream, batches: Sequence[Batch], decoders: Decoders,
            ends: Ends = LAST_POSITION) -> list[torch.Tensor | None]:
    """Run every batch through the stream's layers; returns, per batch, the logits of the rows `ends` scores
    ([..., V]), or None where this process scores nothing."""
    cfg = stream.cfg
    for b in batches:
        b.rope = rope_cos_sin(stream.inv_freq, b.positions, stream.dtype) if stream.inv_freq is not None else None
    hidden: list = [None] * len(batches)
    logits: list[torch.Tensor | None] = [None] * len(batches)
    for layer, w in stream.stream_layers():
        if layer.kind == "embed":
            for k, b in enumerate(batches):
                x = ends.enter(k, b)
                hidden[k] = decoders.hold(k, stream.embed_batch(layer, w, b.ids, b.positions) if x is None else x)
        elif layer.kind == "head":
            for k in range(len(batches)):
                h = ends.leave(k, decoders.fetch(k, hidden[k]))
                if h is not None:
                    logits[k] = lm_head(cfg, w, h)
        else:
            decoders.run(layer.index, w, hidden, batches)
    return logits
