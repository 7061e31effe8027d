"""The layer math of `flexserve.models.layers` against transformers' own modules, float32, the same weights.

The references are transformers' classes themselves (`LlamaRMSNorm`, `LlamaRotaryEmbedding`, the decoder
layers in eager attention with an explicit causal mask); our side gets its configuration through
`from_hf_dict`, as a checkpoint's config.json would give it, and its weights from the reference modules under
our canonical names."""
import math

import pytest
import torch
from transformers import LlamaConfig, OPTConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.opt.modeling_opt import OPTDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from flexserve.config import from_hf_dict
from flexserve.models.attention import AttnMeta, dense_attend
from flexserve.models.layers import apply_norm, decoder_layer, lm_head, rope_cos_sin, rope_inv_freq

from ..conftest import TINY, randomize_

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def llama_config(cls=LlamaConfig, **kw):
    base = dict(TINY, intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5)
    return cls(**{**base, **kw}, attn_implementation="eager")


def ours(hf_config):
    return from_hf_dict({**hf_config.to_dict(), "architectures": hf_config.architectures})


# --- norms ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_equals_llama_rmsnorm(dtype):
    torch.manual_seed(0)
    hf_cfg = llama_config()
    cfg = ours(hf_cfg)
    ref = LlamaRMSNorm(64, eps=hf_cfg.rms_norm_eps).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 5, 64) * 4).to(dtype)
    got = apply_norm(cfg, x, {"n.weight": ref.weight.detach()}, "n")
    assert got.dtype == dtype
    # the same operations in the same order (fp32 statistics, cast back, then the weight): identical bits
    assert torch.equal(got, ref(x).detach())


def test_layernorm_uses_weight_bias_and_eps():
    torch.manual_seed(0)
    cfg = ours(OPTConfig(**TINY, ffn_dim=96))
    assert cfg.norm == "layernorm"
    ref = torch.nn.LayerNorm(64, eps=cfg.norm_eps)
    randomize_(ref, norms=True)
    x = torch.randn(2, 3, 64) * 3 + 1
    got = apply_norm(cfg, x, {"n.weight": ref.weight.detach(), "n.bias": ref.bias.detach()}, "n")
    torch.testing.assert_close(got, ref(x).detach(), atol=1e-6, rtol=1e-6)


# --- rotary embedding ----------------------------------------------------------------------------------------
ROPES = {
    "default": dict(),
    "theta-500k": dict(rope_theta=500000.0),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3": dict(rope_scaling=LLAMA3),
    "llama3-hd32": dict(rope_scaling=LLAMA3, num_attention_heads=2, num_key_value_heads=1),
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_frequencies_and_tables_equal_transformers(name):
    hf_cfg = llama_config(**ROPES[name])
    cfg = ours(hf_cfg)
    ref = LlamaRotaryEmbedding(hf_cfg)
    assert ref.attention_scaling == 1.0  # none of these rope types rescales cos/sin
    inv = rope_inv_freq(cfg)
    assert inv.shape == (cfg.head_dim // 2,)
    torch.testing.assert_close(inv, ref.inv_freq, atol=0, rtol=1e-6)
    positions = torch.tensor([[0, 1, 2, 31, 32, 127], [5, 6, 7, 1000, 4095, 65535]])
    cos, sin = rope_cos_sin(inv, positions, torch.float32)
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=torch.float32), positions)
    assert cos.shape == (2, 6, 1, cfg.head_dim)
    torch.testing.assert_close(cos[:, :, 0], ref_cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin[:, :, 0], ref_sin, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama3", "llama3-hd32"])
def test_llama3_case_covers_all_three_frequency_bands(name):
    """The llama3 cases above only prove the blend if some frequencies are kept, some divided by the factor
    and some blended; and those three bands must come out as the rule says."""
    hf_cfg = llama_config(**ROPES[name])
    cfg = ours(hf_cfg)
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    wavelen = 2 * math.pi / plain
    high, low = wavelen < 32 / 4, wavelen > 32 / 1
    medium = ~high & ~low
    assert high.any() and low.any() and medium.any()
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    assert ((scaled[medium] < plain[medium]) & (scaled[medium] > plain[medium] / 8)).all()


# --- whole decoder layers ------------------------------------------------------------------------------------
def _llama_weights(layer) -> dict[str, torch.Tensor]:
    a, m = layer.self_attn, layer.mlp
    w = {"attn_norm.weight": layer.input_layernorm.weight,
         "qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
         "o.weight": a.o_proj.weight, "mlp_norm.weight": layer.post_attention_layernorm.weight,
         "up.weight": torch.cat([m.gate_proj.weight, m.up_proj.weight]), "down.weight": m.down_proj.weight}
    if a.q_proj.bias is not None:
        w["qkv.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
    return {k: v.detach() for k, v in w.items()}


def _opt_weights(layer) -> dict[str, torch.Tensor]:
    a = layer.self_attn
    w = {"attn_norm.weight": layer.self_attn_layer_norm.weight, "attn_norm.bias": layer.self_attn_layer_norm.bias,
         "qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
         "qkv.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
         "o.weight": a.out_proj.weight, "o.bias": a.out_proj.bias,
         "mlp_norm.weight": layer.final_layer_norm.weight, "mlp_norm.bias": layer.final_layer_norm.bias,
         "up.weight": layer.fc1.weight, "up.bias": layer.fc1.bias,
         "down.weight": layer.fc2.weight, "down.bias": layer.fc2.bias}
    return {k: v.detach() for k, v in w.items()}


LAYERS = {  # name: (transformers config, layer class, our weight names)
    "llama-gqa": (lambda: llama_config(), LlamaDecoderLayer, _llama_weights),
    "llama-mha": (lambda: llama_config(num_key_value_heads=4), LlamaDecoderLayer, _llama_weights),
    "llama3-scaled": (lambda: llama_config(rope_scaling=LLAMA3), LlamaDecoderLayer, _llama_weights),
    "qwen2-qkv-bias": (lambda: llama_config(Qwen2Config), Qwen2DecoderLayer, _llama_weights),
    "opt-pre-norm": (lambda: OPTConfig(**TINY, ffn_dim=96, attn_implementation="eager"), OPTDecoderLayer,
                     _opt_weights),
    "opt-post-norm": (lambda: OPTConfig(**TINY, ffn_dim=96, do_layer_norm_before=False, attn_implementation="eager"),
                      OPTDecoderLayer, _opt_weights),
}
SEQ = 9


@pytest.fixture(scope="module", params=list(LAYERS))
def layer_pair(request):
    make_config, cls, weights = LAYERS[request.param]
    hf_cfg = make_config()
    torch.manual_seed(len(request.param))
    layer = randomize_(cls(hf_cfg, layer_idx=0).float().eval(), norms=True)
    cfg = ours(hf_cfg)
    with torch.no_grad():
        x = torch.randn(2, SEQ, cfg.hidden_size)
        positions = torch.arange(SEQ)[None].expand(2, SEQ)
        causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None].expand(2, 1, SEQ, SEQ)
        kw = {}
        if cfg.positional == "rope":
            kw["position_embeddings"] = LlamaRotaryEmbedding(hf_cfg)(x, positions)
        else:
            kw["position_ids"] = positions
        ref = layer(x, attention_mask=causal, **kw)
    return cfg, weights(layer), x, ref


def _rope(cfg, positions):
    return rope_cos_sin(rope_inv_freq(cfg), positions, torch.float32) if cfg.positional == "rope" else None


def test_decoder_layer_equals_transformers_over_a_prompt(layer_pair):
    cfg, w, x, ref = layer_pair
    positions = torch.arange(SEQ)[None].expand(2, SEQ)
    cache = torch.zeros(2, SEQ, 2, cfg.num_kv_heads, cfg.head_dim)
    got = decoder_layer(cfg, w, x, _rope(cfg, positions), dense_attend(cache[0], cache[1], AttnMeta(0, SEQ, None)))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_decoder_layer_prefill_then_decode_through_the_cache_equals_one_pass(layer_pair):
    """A 5-token prefill, then one token at a time at positions 5..8 reading the cache: the same outputs as
    transformers' single pass over all nine tokens."""
    cfg, w, x, ref = layer_pair
    cache = torch.zeros(2, SEQ, 2, cfg.num_kv_heads, cfg.head_dim)
    outs = []
    for start, n in [(0, 5), (5, 1), (6, 1), (7, 1), (8, 1)]:
        positions = torch.arange(start, start + n)[None].expand(2, n)
        attend = dense_attend(cache[0], cache[1], AttnMeta(start, n, None))
        outs.append(decoder_layer(cfg, w, x[:, start:start + n], _rope(cfg, positions), attend))
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=2e-5, rtol=2e-5)


# --- LM head -------------------------------------------------------------------------------------------------
def _global_weights(kind, hf):
    """Our global weight names from the Hugging Face model: tied models have no `lm_head.weight`."""
    if kind.startswith("llama"):
        w = {"embed.weight": hf.model.embed_tokens.weight, "final_norm.weight": hf.model.norm.weight}
    else:
        dec = hf.model.decoder
        w = {"embed.weight": dec.embed_tokens.weight}
        if dec.final_layer_norm is not None:
            w |= {"final_norm.weight": dec.final_layer_norm.weight, "final_norm.bias": dec.final_layer_norm.bias}
        if dec.project_out is not None:
            w["project_out.weight"] = dec.project_out.weight
    if not hf.config.tie_word_embeddings:
        w["lm_head.weight"] = hf.lm_head.weight
    return {k: v.detach() for k, v in w.items()}


def _hf_head(kind, hf, x):
    if kind.startswith("llama"):
        return hf.lm_head(hf.model.norm(x))
    dec = hf.model.decoder
    if dec.final_layer_norm is not None:
        x = dec.final_layer_norm(x)
    if dec.project_out is not None:
        x = dec.project_out(x)
    return hf.lm_head(x)


@pytest.mark.parametrize("kind, tied", [("llama-tied", True), ("llama-gqa", False), ("opt", True),
                                        ("opt-350m-like", False)])
def test_lm_head_tied_and_untied_equal_transformers(tiny_model, kind, tied):
    _, hf = tiny_model(kind)
    cfg = ours(hf.config)
    assert cfg.tie_word_embeddings is tied
    w = _global_weights(kind, hf)
    torch.manual_seed(0)
    x = torch.randn(2, 3, cfg.hidden_size)
    with torch.no_grad():
        ref = _hf_head(kind, hf, x)
        got = lm_head(cfg, w, x)
    assert got.shape == (2, 3, cfg.vocab_size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if not tied:  # the separate head is really what is used: the embedding table gives other logits
        as_tied = lm_head(cfg, {**w, "lm_head.weight": w["embed.weight"]}, x)
        assert not torch.allclose(as_tied, got, atol=1e-2)
