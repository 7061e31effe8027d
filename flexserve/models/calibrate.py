"""Calibration for the weight quantisation schemes: the inputs every projection of a layer sees.

The calibrated schemes (SmoothQuant int8, AWQ) need, per decoder layer, the activations that enter each
projection on real text. `Calibrator` carries the calibration tokens' hidden states through the float model
one layer at a time, in step with weight placement (which reads the checkpoint one layer at a time too), so
no layer's float weights are kept after it is quantised. Each projection's input is caught by wrapping its
weight in an `_Observed`, which the dispatching `linear` multiplies through while recording what it saw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compression.layer_quant import PROJECTIONS, Stats
from ..compression.schemes import calibration_text
from ..config import ModelConfig
from ..errors import ModelLoadError
from ..tokenizer import Tokenizer
from .attention import attend_over
from .layers import Weights, decoder_layer, embed, rope_cos_sin, rope_inv_freq

CALIBRATION_SEQ_LEN = 512


class _Observed:
    """A float weight that records the inputs it is multiplied with (see `compression.linear.linear`)."""

    def __init__(self, weight: torch.Tensor, seen: list[torch.Tensor]):
        self.weight, self.seen = weight, seen

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.seen.append(x.detach().reshape(-1, x.shape[-1]))
        return F.linear(x, self.weight, bias)


def calibration_ids(model_path: str | None, cfg: ModelConfig, num_tokens: int) -> torch.Tensor:
    """The calibration text as token rows [B, L] of the model's tokenizer (bytes for `dummy:` models),
    at most `num_tokens` tokens in rows of up to 512 (and the model's context)."""
    text = calibration_text()
    tok = Tokenizer(None if model_path is None or model_path.startswith("dummy:") else model_path, cfg.vocab_size)
    try:
        ids = tok.encode(text)
    except ModelLoadError:
        ids = []
    if len(ids) < 2:  # no usable tokenizer beside the weights: bytes still give the layers text-like input
        ids = Tokenizer(None, cfg.vocab_size).encode(text)
    ids = [i % cfg.vocab_size for i in ids[:num_tokens]]
    seq_len = min(CALIBRATION_SEQ_LEN, cfg.max_position, len(ids))
    rows = max(len(ids) // seq_len, 1)
    return torch.tensor(ids[:rows * seq_len], dtype=torch.long).view(rows, seq_len)


class Calibrator:
    """The calibration tokens' hidden states, advanced one decoder layer at a time (see module docstring)."""

    def __init__(self, cfg: ModelConfig, global_weights: Weights, ids: torch.Tensor, device: torch.device,
                 dtype: torch.dtype):
        self.cfg = cfg
        ids = ids.to(device)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)  # [B, L]
        w = {k: v.to(device=device, dtype=dtype) for k, v in global_weights.items()}
        self.rope = (rope_cos_sin(rope_inv_freq(cfg).to(device), positions, dtype)
                     if cfg.positional == "rope" else None)
        with torch.no_grad():
            self.hidden = embed(cfg, w, ids, positions)  # [B, L, D]

    def layer_inputs(self, w: Weights) -> Stats:
        """Run the next decoder layer (float weights `w`, on the compute device) over the calibration tokens;
        returns each projection's inputs [B * L, K], and moves the hidden states on past the layer."""
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in PROJECTIONS}
        observed = dict(w)
        for name in PROJECTIONS:
            if isinstance(w.get(f"{name}.weight"), torch.Tensor):
                observed[f"{name}.weight"] = _Observed(w[f"{name}.weight"], seen[name])
        with torch.no_grad():
            self.hidden = decoder_layer(self.cfg, observed, self.hidden, self.rope, _causal_attend)
        return {name: torch.cat(xs) for name, xs in seen.items() if xs}


def _causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over the calibration rows themselves (no cache, no padding)."""
    return attend_over(q, k.transpose(1, 2), v.transpose(1, 2), None, causal=True)
