"""Per-input-channel scales that move quantisation difficulty between activations and weights.

Both methods find s [K] and rewrite y = x W^T as y = (x / s) (W * s)^T, which is the same product in exact
arithmetic; where `x / s` can be folded into the op that produced x (a norm's weight, the rows of a previous
projection), the rewrite costs nothing at run time.

- SmoothQuant (int8 W8A8): s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha). Activation outlier channels are
  divided down so per-token int8 keeps their neighbours' resolution; alpha = 0.5 splits the range evenly.
- AWQ (4-bit weight-only): s_j = mean|x_j|^alpha, normalised, with alpha chosen from a grid in [0, 1] to
  minimise || x W^T - (x / s) Q(W * s)^T || on calibration activations: input channels that carry large
  activations get their weights scaled up before rounding, so their relative rounding error shrinks.
  Then AWQ's clipping search: per output channel and group, the range [-r max|w|, r max|w|] with r from a grid
  in [0.5, 1] that minimises that group's contribution to the output error (a narrower range rounds the bulk
  of the weights more finely at the cost of the few largest).
"""
from __future__ import annotations

import torch

from .schemes import fake_quantize

MIN_SCALE = 1e-5
AWQ_MAX_ROWS = 512  # calibration rows the AWQ search scores each candidate on
CLIP_MAX_ROWS = 256  # rows the clipping search scores on (its error tensor is rows x N x groups)
CLIP_GRID = 20


def smoothquant_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's factors s [K] from the activation's per-channel abs-max [K] and the weight [N, K]."""
    w_max = weight.detach().abs().amax(dim=0).float().clamp_min(MIN_SCALE)  # [K]
    a_max = act_absmax.float().to(w_max.device).clamp_min(MIN_SCALE)
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(MIN_SCALE)


def awq_scales(x: torch.Tensor, weight: torch.Tensor, group_size: int, grid: int = 20) -> torch.Tensor:
    """AWQ's search: the per-channel scale s [K] (float32) that minimises the 4-bit layer's output error on
    the calibration activations x [T, K], over s = x_mean^a and s = x_mean^a / w_mean^(1 - a) for a on a
    grid in [0, 1]. a = 0 of the first (s = 1, plain round-to-nearest) is always a candidate, so the result is
    never worse than RTN on these activations."""
    x = _subsample(x.reshape(-1, x.shape[-1])).to(weight.dtype)  # [T', K]
    reference = x @ weight.t()  # [T', N]
    x_mean = x.abs().float().mean(dim=0).clamp_min(MIN_SCALE)  # [K]
    # how large each input channel's weights are, relative to their rows' largest: the "duo" candidates
    # x_mean^a / w_mean^(1 - a) also shrink channels whose weights are already large
    w_abs = weight.abs().float()
    w_mean = (w_abs / w_abs.amax(dim=1, keepdim=True).clamp_min(MIN_SCALE)).mean(dim=0).clamp_min(MIN_SCALE)
    best_err, best = None, torch.ones_like(x_mean)
    candidates = [x_mean.pow(i / grid) for i in range(grid + 1)]
    candidates += [x_mean.pow(i / grid) / w_mean.pow(1 - i / grid) for i in range(1, grid)]
    for s in candidates:
        s = (s / (s.max() * s.min()).sqrt()).clamp_min(MIN_SCALE)  # centred on 1, so scaled weights stay tame
        w_hat = fake_quantize("rtn4", weight * s.to(weight.dtype), group_size) / s.to(weight.dtype)
        err = float((x @ w_hat.t() - reference).float().pow(2).mean())
        if best_err is None or err < best_err:
            best_err, best = err, s
    return best


def awq_clip(x: torch.Tensor, weight: torch.Tensor, group_size: int, grid: int = CLIP_GRID) -> torch.Tensor:
    """The weight [N, K] with each (output channel, group) clipped to the range that minimises
    sum_t (x_t,group . (w - Q(w))_group)^2 over calibration rows x [T, K]. When K is not a multiple of
    `group_size`, the last, shorter group is searched like the others: it is padded as the quantiser pads it
    (copies of its last weight, which clip alike) and the padding meets zero activations."""
    n, k = weight.shape
    groups = -(-k // group_size)
    pad = groups * group_size - k
    x = _subsample(x.reshape(-1, k), CLIP_MAX_ROWS).to(weight.dtype)
    padded = weight
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        padded = torch.cat([weight, weight[:, -1:].expand(n, pad)], dim=1)
    x = x.view(-1, groups, group_size)
    wg = padded.view(n, groups, group_size)  # [N, G, gs]
    max_abs = wg.abs().amax(dim=-1, keepdim=True)  # [N, G, 1]
    best_err = torch.full(max_abs.shape, float("inf"), device=weight.device)
    best = max_abs.clone()
    for i in range(grid // 2 + 1):  # r = 1, 1 - 1/grid, ..., 0.5
        limit = max_abs * (1 - i / grid)
        clipped = torch.maximum(torch.minimum(wg, limit), -limit).view(n, -1)
        err = fake_quantize("rtn4", clipped[:, :k], group_size) - weight  # the quantiser pads as above
        err = torch.nn.functional.pad(err, (0, pad)).view(n, groups, group_size)
        err = torch.einsum("tgj,ngj->ngt", x, err).float().pow(2).sum(-1, keepdim=True)  # [N, G, 1]
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, limit, best)
    return torch.maximum(torch.minimum(wg, best), -best).view(n, -1)[:, :k].contiguous()


def _subsample(x: torch.Tensor, rows: int = AWQ_MAX_ROWS) -> torch.Tensor:
    """At most `rows` rows, evenly spread over the calibration tokens."""
    if x.shape[0] <= rows:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, rows, device=x.device).long()
    return x[idx]
