"""Tiny random Hugging Face models made on the fly, one per family switch we support."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)


def _make(kind: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                              OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    if kind == "llama-gqa":
        return LlamaForCausalLM(LlamaConfig(**TINY, intermediate_size=96, num_key_value_heads=2,
                                            tie_word_embeddings=False, rope_theta=500000.0))
    if kind == "llama-tied":
        return LlamaForCausalLM(LlamaConfig(**TINY, intermediate_size=96, num_key_value_heads=4,
                                            tie_word_embeddings=True))
    if kind == "llama3-scaled":
        return LlamaForCausalLM(LlamaConfig(**TINY, intermediate_size=96, num_key_value_heads=2, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**TINY, intermediate_size=96, num_key_value_heads=2,
                                            tie_word_embeddings=False))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**TINY, intermediate_size=96, num_key_value_heads=1))
    if kind == "opt":
        return OPTForCausalLM(OPTConfig(**{k: v for k, v in TINY.items()}, ffn_dim=96, word_embed_proj_dim=64))
    if kind == "opt-350m-like":  # post-norm, projected embeddings, untied
        return OPTForCausalLM(OPTConfig(**TINY, ffn_dim=96, word_embed_proj_dim=32, do_layer_norm_before=False,
                                        tie_word_embeddings=False))
    if kind in MOE_FAMILIES:
        return _make_moe(kind)
    raise KeyError(kind)


MOE_FAMILIES = ["mixtral", "qwen2-moe", "qwen3-moe"]


def _make_moe(kind: str):
    """Tiny mixtures of experts: Mixtral (4 experts, top 2, renormalised), Qwen2-MoE (8 experts, top 2, not
    renormalised, a gated shared expert, q/k/v biases), Qwen3-MoE (8 experts, top 3, renormalised, q/k norms,
    drawn away from ones so that a missing norm shows). The stacked expert tensors are drawn like matrices."""
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    base = dict(TINY, num_key_value_heads=2, tie_word_embeddings=False)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**base, intermediate_size=32, num_local_experts=4,
                                                 num_experts_per_tok=2))
    elif kind == "qwen2-moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**base, intermediate_size=96, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=48, num_experts=8,
                                                   num_experts_per_tok=2, norm_topk_prob=False))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**base, intermediate_size=96, moe_intermediate_size=32,
                                                   num_experts=8, num_experts_per_tok=3, norm_topk_prob=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.15)
    return randomize_(model, norms=kind == "qwen3-moe")


def randomize_(module: torch.nn.Module, norms: bool = False) -> torch.nn.Module:
    """Larger weights than HF's init (std 0.02) so that logits are well separated and greedy choices are not
    near-ties decided by rounding; non-zero biases so that a missing bias would show. Norm weights stay ones
    unless `norms`, which draws them from [0.5, 1.5] so that a norm applied without its weight would show."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            elif p.dim() == 2:
                p.normal_(0, 0.15)
            elif norms:
                p.uniform_(0.5, 1.5)
    return module


FAMILIES = ["llama-gqa", "llama-tied", "llama3-scaled", "qwen2", "mistral", "opt", "opt-350m-like"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(kind) -> (folder, HF model in float32 eval mode)."""
    cache: dict[str, tuple[str, torch.nn.Module]] = {}

    def get(kind: str):
        if kind not in cache:
            torch.manual_seed(zlib.crc32(kind.encode()))
            model = randomize_(_make(kind).float().eval())
            folder = str(tmp_path_factory.mktemp(kind))
            model.save_pretrained(folder)
            cache[kind] = (folder, model)
        return cache[kind]

    return get


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit status, stdout, stderr) of `flexserve ARGV`, run in this process."""
    from flexserve.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main(list(argv))
        cap = capsys.readouterr()
        return rc, cap.out, cap.err
    return run


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42, 43]]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: q [S, H, hd] over k, v [L, Hkv, hd] (each KV head serves H / Hkv
    consecutive query heads), `allowed` [S, L] bool -> [S, H * hd], in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("shd,lhd->hsl", q.double(), k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hsl,lhd->shd", scores.softmax(-1), v).reshape(q.shape[0], -1)
