"""Quantised weights in the offloading executor: quantising layers as they are placed, and their handles.

`LayerQuantizer` turns each decoder layer's float weights into quantised ones while `place_weights` reads the
checkpoint layer by layer (the calibrated schemes advance the calibration text's hidden states through the
float layer at the same time, so no float copy of the model is ever held). `QuantHandle` is a quantised
weight stored off the compute device: each tensor of the `QuantWeight` is one `Handle` on the weight's tier,
and loading copies those parts, the quantised bytes, into a slot of the same shapes on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compression.awq_checkpoint import awq_checkpoint_weight
from ..compression.ggml import ggml_weight
from ..compression.layer_quant import quantize_layer
from ..compression.qweight import QuantWeight
from ..compression.schemes import QuantConfig
from ..config import ModelConfig
from ..errors import PolicyError
from ..memory.tiers import Handle, Tier, Tiers
from ..models.calibrate import Calibrator, calibration_ids
from ..weights import AWQBlocks, GGUFBlocks, default_scheme, keep_quantized


@dataclass
class QuantHandle:
    """A `QuantWeight` whose tensors live on a tier other than the compute device's."""

    parts: dict[str, Handle]  # field name -> its stored tensor
    template: QuantWeight  # the weight's static fields and shapes, its tensors on the meta device

    @property
    def tier(self) -> Tier:
        return next(iter(self.parts.values())).tier

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.parts.values())

    @property
    def shape(self) -> torch.Size:
        return self.template.shape

    def empty_on(self, device: torch.device) -> QuantWeight:
        """A slot on `device` for this weight's parts to be read into."""
        return self.template.with_tensors({k: torch.empty(h.shape, dtype=h.dtype, device=device)
                                           for k, h in self.parts.items()})


def store_quantized(tiers: Tiers, tier: Tier, weight: QuantWeight, label: str) -> QuantWeight | QuantHandle:
    """Put a quantised weight on `tier`: the object itself on the compute device, else a `QuantHandle`."""
    if tier is Tier.GPU:
        return weight.to(tiers.device)
    parts = {k: tiers.store(tier, t.contiguous(), name=f"{label}.{k}") for k, t in weight.tensor_fields().items()}
    meta = weight.to("meta")  # shapes and dtypes, no bytes
    return QuantHandle(parts, meta)


class LayerQuantizer:
    """Quantises each decoder layer's weights by a `QuantConfig` as placement reads them (module docstring)."""

    def __init__(self, qcfg: QuantConfig, cfg: ModelConfig, model_path: str | None, device: torch.device,
                 dtype: torch.dtype):
        self.qcfg, self.cfg, self.device, self.dtype = qcfg, cfg, device, dtype
        self.model_path = model_path
        self.calibrator: Calibrator | None = None

    def start(self, global_weights: dict[str, torch.Tensor]) -> None:
        """Embed the calibration text (calibrated schemes only), before the first decoder layer."""
        if self.qcfg.is_calibrated and "embed.weight" in global_weights:
            ids = calibration_ids(self.model_path, self.cfg, self.qcfg.calibration_tokens)
            self.calibrator = Calibrator(self.cfg, global_weights, ids, self.device, self.dtype)

    def layer(self, w: dict[str, torch.Tensor]) -> dict:
        """The next decoder layer's weights, quantised (on the compute device; placement moves them on)."""
        if self.qcfg.is_stored:  # the file's own blocks become weights as they are; nothing is rounded
            return {k: _stored_weight(v) for k, v in w.items()}
        w = {k: v.to(device=self.device, dtype=self.dtype) for k, v in w.items()}
        inputs = None
        if self.qcfg.is_calibrated:
            if self.calibrator is None:
                raise PolicyError(f"{self.qcfg.scheme} calibrates on the model's embedding, which this "
                                 f"part of the model does not hold")
            inputs = self.calibrator.layer_inputs(w)
        with torch.no_grad():
            return quantize_layer(self.cfg, w, self.qcfg, inputs)


def _stored_weight(value):
    """A stored checkpoint's quantised matrix as the weight holding it; anything else as it is."""
    if isinstance(value, GGUFBlocks):
        return ggml_weight(value.type_name, value.blocks, value.in_features)
    if isinstance(value, AWQBlocks):
        return awq_checkpoint_weight(*value.unpacked())
    return value


def layer_quantizer(policy, source, device: torch.device, dtype: torch.dtype) -> LayerQuantizer | None:
    """The quantiser `policy.quantization` asks for over `source`, or None. The tokenizer of the calibration
    text is found where the checkpoint is (a GGUF file or a Hugging Face folder)."""
    stored = default_scheme(source)  # an AWQ folder keeps its 4-bit weights unless asked otherwise
    scheme = policy.quantization or stored
    if scheme is None:
        return None
    qcfg = QuantConfig(scheme, policy.quant_group_size)
    if qcfg.is_stored:
        keep_quantized(source, scheme)  # its stored projections are read as such from now on
    elif stored is not None:
        raise PolicyError(f"--quantization {scheme} rounds float weights, and this checkpoint's are already "
                          f"quantized ({stored}); load it without --quantization to keep them")
    model_path = getattr(source, "path", None) or getattr(source, "folder", None)
    return LayerQuantizer(qcfg, source.config, model_path, device, dtype)
