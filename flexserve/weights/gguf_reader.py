"""GGUF files (llama.cpp's format): metadata into `ModelConfig` (header parsed by `gguf_file`), tensors
dequantised on load by the `gguf` package (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K and every other type `gguf.quants` knows).

`keep_quantized()` (what `--quantization gguf` calls) makes the dense decoder projections (q, k, v, o, gate, up,
down) that the file stores as Q4_0, Q4_1 or Q8_0 come back as their blocks (`GGUFBlocks`), to become quantised
weights without any rounding (`flexserve.compression.ggml`). Everything else is still dequantised: K-quants,
IQ types, F16/F32 projections, the embedding, norms, LM head, and a mixture of experts' router and experts.

Rotary scaling comes two ways: linear scaling as metadata (`{arch}.rope.scaling.type` and `.factor`), and
Llama 3.1's frequency-dependent scaling as the tensor `rope_freqs.weight`, one divisor per rotary frequency,
which llama.cpp's converter computes from the checkpoint's `rope_scaling` and keeps in place of it. The divisors
are carried in the config as they are (`rope_scaling["freq_factors"]`), so the frequencies are llama.cpp's own."""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelLoadError, PolicyError
from .base import Tensors, finish_globals
from .gguf_blocks import KEPT_TYPES, GGUFBlocks
from .gguf_file import GGUFFile

_LAYER = {
    "attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
    "ffn_norm": "mlp_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
    "attn_q_norm": "q_norm", "attn_k_norm": "k_norm", "ffn_gate_inp": "router", "ffn_gate_inp_shexp": "shared_gate",
    "ffn_gate_shexp": "shared.gate", "ffn_up_shexp": "shared.up", "ffn_down_shexp": "shared.down",
    "ffn_gate_exps": "stacked.gate", "ffn_up_exps": "stacked.up", "ffn_down_exps": "stacked.down",
}
_GLOBAL = {"token_embd": "embed", "output_norm": "final_norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen2moe", "qwen3moe")
# llama.cpp's converter interleaves Q/K rows for these (their rotary is the interleaved kind); the Qwen ones keep
# Hugging Face's rotate-half layout ("NEOX" rotary) and are read as they are.
_PERMUTED = ("llama", "mistral")
# The raw part names `keep_quantized` may keep as blocks: a dense layer's projections (experts stay dense, as the
# expert offloader moves plain tensors).
_PROJECTIONS = ("q.weight", "k.weight", "v.weight", "o.weight", "gate.weight", "up.weight", "down.weight")


def _field(reader, key: str, default=None):
    return reader.fields.get(key, default)


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion-time row permutation of Q/K (interleaved rotary -> HF's rotate-half)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFSource:
    """Lazy reader of a GGUF file. Tokenizer and chat template are read by `flexserve.tokenizer`."""

    def __init__(self, path: str):
        import gguf  # imported here: only GGUF users pay for it

        self.path = path
        try:
            self._reader = GGUFFile(path)
        except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError ... on bad files
            raise ModelLoadError(f"{path} is not a valid GGUF file (corrupt or truncated?): {e}") from None
        self._dequantize = gguf.quants.dequantize
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.is_keeping_quantized = False
        self.stored_scheme = "gguf"  # what `weights.keep_quantized` checks the asked-for scheme against
        self.config = self._config()
        self._layers: dict[int, dict[str, str]] = {}
        self._globals: dict[str, str] = {}
        for name in self._tensors:
            m = _LAYER_RE.match(name)
            if m and m.group(2) in _LAYER:
                self._layers.setdefault(int(m.group(1)), {})[f"{_LAYER[m.group(2)]}.{m.group(3)}"] = name
            elif name.rsplit(".", 1)[0] in _GLOBAL:
                stem, kind = name.rsplit(".", 1)
                self._globals[f"{_GLOBAL[stem]}.{kind}"] = name
        if "lm_head.weight" not in self._globals:
            self.config = self.config.replace(tie_word_embeddings=True)
        missing = [i for i in range(self.config.num_layers) if i not in self._layers]
        if missing:
            raise ModelLoadError(f"{path}: GGUF lacks decoder layers {missing[:5]}")

    def _config(self) -> ModelConfig:
        r = self._reader
        arch = _field(r, "general.architecture")
        if arch not in _ARCHS:
            raise ModelLoadError(f"{self.path}: GGUF architecture {arch!r} is not supported (supported: {_ARCHS})")
        try:
            heads = int(_field(r, f"{arch}.attention.head_count"))
            hidden = int(_field(r, f"{arch}.embedding_length"))
            tokens = _field(r, "tokenizer.ggml.tokens")
            vocab = int(_field(r, f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
            eos = _field(r, "tokenizer.ggml.eos_token_id")
            rope_dim = _field(r, f"{arch}.rope.dimension_count")
            head_dim = int(_field(r, f"{arch}.attention.key_length", rope_dim or hidden // heads))
            scaling = self._rope_scaling(arch, head_dim)
            return ModelConfig(
                family="llama", name=os.path.basename(self.path), vocab_size=vocab, hidden_size=hidden,
                intermediate_size=int(_field(r, f"{arch}.feed_forward_length")),
                num_layers=int(_field(r, f"{arch}.block_count")), num_heads=heads,
                num_kv_heads=int(_field(r, f"{arch}.attention.head_count_kv", heads)),
                head_dim=head_dim,
                max_position=int(_field(r, f"{arch}.context_length", 2048)),
                norm="rmsnorm", norm_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                qkv_bias=arch in ("qwen2", "qwen2moe"), qk_norm=arch in ("qwen3", "qwen3moe"),
                **self._moe_fields(arch), rope_theta=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
                rope_scaling=scaling, bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
                eos_token_id=None if eos is None else int(eos),
            )
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{self.path}: GGUF metadata is incomplete: {e}") from None

    def _moe_fields(self, arch: str) -> dict:
        """Mixture-of-experts switches from `{arch}.expert_*` metadata (none for a dense model). Mixtral is the
        `llama` architecture with experts of `feed_forward_length`; whether the top-k probabilities are
        renormalised is llama.cpp's per-architecture choice unless the file says."""
        r = self._reader
        experts = int(_field(r, f"{arch}.expert_count", 0) or 0)
        if not experts:
            return {}
        width = _field(r, f"{arch}.expert_feed_forward_length") or _field(r, f"{arch}.feed_forward_length")
        norm = _field(r, f"{arch}.expert_weights_norm", arch != "qwen2moe")
        return dict(num_experts=experts, experts_per_token=int(_field(r, f"{arch}.expert_used_count")),
                    moe_intermediate_size=int(width), norm_topk_prob=bool(norm),
                    shared_expert_intermediate_size=int(
                        _field(r, f"{arch}.expert_shared_feed_forward_length", 0) or 0))

    def _rope_scaling(self, arch: str, head_dim: int) -> dict | None:
        """`ModelConfig.rope_scaling` from the metadata and the `rope_freqs` tensor (see the module docstring);
        llama.cpp applies both when both are there, and so does `rope_inv_freq`."""
        kind = _field(self._reader, f"{arch}.rope.scaling.type", "none")
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(_field(self._reader, f"{arch}.rope.scaling.factor"))}
        elif kind == "none":
            scaling = {"rope_type": "default"}
        else:
            raise ModelLoadError(f"{self.path}: GGUF rope scaling {kind!r} is not supported (none and linear are, "
                                 "and Llama 3.1's as the rope_freqs tensor)")
        if "rope_freqs.weight" in self._tensors:
            factors = self._get("rope_freqs.weight").reshape(-1)
            if factors.numel() != head_dim // 2:
                raise ModelLoadError(f"{self.path}: rope_freqs has {factors.numel()} factors, the rotary embedding "
                                     f"has {head_dim // 2} frequencies (head dimension {head_dim})")
            if not bool((factors > 0).all()):
                raise ModelLoadError(f"{self.path}: rope_freqs holds a factor that is not positive")
            scaling["freq_factors"] = tuple(factors.tolist())
        return None if scaling == {"rope_type": "default"} else scaling

    def keep_quantized(self) -> int:
        """From now on hand over the projections stored as Q4_0/Q4_1/Q8_0 as their blocks (module docstring);
        returns how many tensors that keeps. A file with none of them is refused: the option would do nothing."""
        kept = [n for i in self._layers.values() for part, n in i.items()
                if part in _PROJECTIONS and self._tensors[n].tensor_type.name in KEPT_TYPES]
        if not kept:
            stored = sorted({self._tensors[n].tensor_type.name for i in self._layers.values()
                             for part, n in i.items() if part in _PROJECTIONS})
            raise PolicyError(f"--quantization gguf keeps projections stored as {', '.join(KEPT_TYPES)}; "
                              f"{os.path.basename(self.path)} stores them as {', '.join(stored) or 'experts only'}, "
                              f"which are read dequantized: load it without --quantization gguf")
        self.is_keeping_quantized = True
        return len(kept)

    def _blocks(self, name: str) -> GGUFBlocks:
        t = self._tensors[name]
        rows, cols = (int(s) for s in reversed(t.shape))  # GGUF lists dimensions fastest-first
        return GGUFBlocks(t.tensor_type.name, torch.from_numpy(np.array(t.data).reshape(rows, -1)), cols)

    def _part(self, part: str, name: str) -> torch.Tensor | GGUFBlocks:
        """A layer part, as blocks where `keep_quantized` keeps it, else dequantised."""
        if (self.is_keeping_quantized and part in _PROJECTIONS
                and self._tensors[name].tensor_type.name in KEPT_TYPES):
            return self._blocks(name)
        return self._get(name)

    def _get(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        try:
            data = np.asarray(self._dequantize(t.data, t.tensor_type))
        except NotImplementedError as e:
            raise ModelLoadError(f"{self.path}: tensor {name} has unsupported type {t.tensor_type.name}: {e}") from None
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions fastest-first
        out = torch.from_numpy(data.astype(np.float32, copy=False).reshape(shape).copy())
        return out

    def global_parts(self) -> Tensors:
        return finish_globals(self.config, {k: self._get(v) for k, v in self._globals.items()})

    def layer_parts(self, index: int) -> Tensors:
        parts = {k: self._part(k, v) for k, v in self._layers[index].items()}
        for key in [k for k in parts if k.startswith("stacked.")]:  # [E, rows, cols] -> one tensor per expert
            part = key.split(".")[1]
            for e, t in enumerate(parts.pop(key).unbind(0)):
                parts[f"experts.{e}.{part}.weight"] = t
        cfg = self.config
        if _field(self._reader, "general.architecture") not in _PERMUTED:
            return parts
        for key, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            w = parts.get(f"{key}.weight")
            if isinstance(w, GGUFBlocks):  # whole rows move, so the blocks are permuted as they are
                parts[f"{key}.weight"] = w.map_rows(lambda b: _unpermute(b, heads))
            elif w is not None:
                parts[f"{key}.weight"] = _unpermute(w, heads)
            if f"{key}.bias" in parts:
                parts[f"{key}.bias"] = _unpermute(parts[f"{key}.bias"], heads)
        return parts
