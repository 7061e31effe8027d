"""The GGUF reader: metadata into `ModelConfig`, tensors back in Hugging Face's layout.

Small GGUF files are written here from a tiny random Llama, the way llama.cpp's converter lays a checkpoint out
(Q/K rows permuted for interleaved rotary, dimensions listed fastest-first), so what the reader returns can be
compared exactly with the checkpoint it came from; the real SmolLM2 Q4_1 file checks the same on quantised
tensors. Whole-model logits against transformers' GGUF loading are in test_gguf_smollm2.py."""
import gguf
import numpy as np
import pytest
import torch

from flexserve.errors import ModelLoadError
from flexserve.models.layers import rope_inv_freq
from flexserve.weights import default_model_path, layer_weights
from flexserve.weights.gguf_reader import GGUFSource
from flexserve.weights.safetensors_reader import SafetensorsSource


def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's Q/K row order: within each head, rows (i, i + hd/2) of the rotate-half layout become
    the neighbouring rows (2i, 2i + 1)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(hf, tied: bool) -> dict[str, torch.Tensor]:
    """llama.cpp tensor names of a Hugging Face Llama, Q/K permuted as the converter does."""
    cfg, m = hf.config, hf.model
    out = {"token_embd.weight": m.embed_tokens.weight, "output_norm.weight": m.norm.weight}
    if not tied:
        out["output.weight"] = hf.lm_head.weight
    for i, layer in enumerate(m.layers):
        a, f = layer.self_attn, layer.mlp
        out |= {f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight,
                f"blk.{i}.attn_q.weight": to_interleaved(a.q_proj.weight, cfg.num_attention_heads),
                f"blk.{i}.attn_k.weight": to_interleaved(a.k_proj.weight, cfg.num_key_value_heads),
                f"blk.{i}.attn_v.weight": a.v_proj.weight, f"blk.{i}.attn_output.weight": a.o_proj.weight,
                f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
                f"blk.{i}.ffn_gate.weight": f.gate_proj.weight, f"blk.{i}.ffn_up.weight": f.up_proj.weight,
                f"blk.{i}.ffn_down.weight": f.down_proj.weight}
    return {k: v.detach() for k, v in out.items()}


def metadata(hf, arch="llama") -> dict:
    c = hf.config
    return {f"{arch}.block_count": c.num_hidden_layers, f"{arch}.context_length": c.max_position_embeddings,
            f"{arch}.embedding_length": c.hidden_size, f"{arch}.feed_forward_length": c.intermediate_size,
            f"{arch}.attention.head_count": c.num_attention_heads,
            f"{arch}.attention.head_count_kv": c.num_key_value_heads,
            f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
            f"{arch}.rope.freq_base": float(c.rope_parameters["rope_theta"]), f"{arch}.vocab_size": c.vocab_size,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.bos_token_id": 1}


def write_gguf(path, arch: str, meta: dict, tensors: dict[str, torch.Tensor], dtype=np.float32,
               encoding=None) -> str:
    """A GGUF file of `tensors`: matrices in `dtype`, vectors in float32, unless `encoding(name, tensor)` names a
    GGML type (e.g. "Q4_0", "F16"; None: the default) for a tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        add = w.add_float32 if isinstance(value, float) else w.add_string if isinstance(value, str) else w.add_uint32
        add(key, value)
    for name, t in tensors.items():
        kind = encoding(name, t) if encoding is not None else None
        if kind in ("F32", "F16"):
            w.add_tensor(name, t.numpy().astype(np.float16 if kind == "F16" else np.float32))
        elif kind is not None:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t.numpy().astype(dtype if t.dim() == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture
def tiny_llama(tiny_model):
    return tiny_model("llama-gqa")


def test_config_comes_from_the_metadata(tiny_llama, tmp_path):
    folder, hf = tiny_llama
    src = GGUFSource(write_gguf(tmp_path / "m.gguf", "llama", metadata(hf), gguf_tensors(hf, tied=False)))
    want = SafetensorsSource(folder).config
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "max_position", "norm_eps", "rope_theta", "tie_word_embeddings", "qkv_bias"):
        assert getattr(src.config, field) == pytest.approx(getattr(want, field)), field
    assert src.config.family == "llama" and src.config.eos_ids == (2,) and src.config.bos_token_id == 1


def test_float32_tensors_equal_the_checkpoint_they_were_written_from(tiny_llama, tmp_path):
    """Q/K rows come back in rotate-half order: the same fused layers, bit for bit, as the safetensors reader
    gives for the same model."""
    folder, hf = tiny_llama
    src = GGUFSource(write_gguf(tmp_path / "m.gguf", "llama", metadata(hf), gguf_tensors(hf, tied=False)))
    ref = SafetensorsSource(folder)
    q = src.layer_parts(1)["q.weight"]
    assert torch.equal(q, hf.model.layers[1].self_attn.q_proj.weight)
    for i in range(hf.config.num_hidden_layers):
        got, want = layer_weights(src, i), layer_weights(ref, i)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), (i, name)
    got, want = src.global_parts(), ref.global_parts()
    assert got.keys() == want.keys() == {"embed.weight", "final_norm.weight", "lm_head.weight"}
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_float16_tensors_are_widened_exactly(tiny_llama, tmp_path):
    _, hf = tiny_llama
    tensors = gguf_tensors(hf, tied=False)
    src = GGUFSource(write_gguf(tmp_path / "m.gguf", "llama", metadata(hf), tensors, dtype=np.float16))
    down = src.layer_parts(0)["down.weight"]
    assert down.dtype == torch.float32
    assert torch.equal(down, tensors["blk.0.ffn_down.weight"].half().float())


def test_a_file_without_an_output_tensor_ties_the_embeddings(tiny_llama, tmp_path):
    _, hf = tiny_llama
    src = GGUFSource(write_gguf(tmp_path / "m.gguf", "llama", metadata(hf), gguf_tensors(hf, tied=True)))
    assert src.config.tie_word_embeddings
    assert "lm_head.weight" not in src.global_parts()


@pytest.mark.parametrize("change, message", [
    ("arch-gpt2", "GGUF architecture 'gpt2' is not supported"),
    ("no-head-count", "GGUF metadata is incomplete"),
    ("no-layer-1", r"GGUF lacks decoder layers \[1\]"),
    ("yarn", "GGUF rope scaling 'yarn' is not supported"),
    ("short-rope-freqs", r"rope_freqs has 3 factors, the rotary embedding has 8 frequencies \(head dimension 16\)"),
    ("zero-rope-freq", "rope_freqs holds a factor that is not positive"),
])
def test_unusable_files_are_one_clear_error(tiny_llama, tmp_path, change, message):
    _, hf = tiny_llama
    assert hf.config.head_dim == 16
    arch = "gpt2" if change == "arch-gpt2" else "llama"
    meta = metadata(hf, arch)
    tensors = gguf_tensors(hf, tied=False)
    if change == "no-head-count":
        del meta["llama.attention.head_count"]
    if change == "no-layer-1":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("blk.1.")}
    if change == "yarn":  # scaling the frequencies differently: not to be run unscaled without a word
        meta |= {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    if change == "short-rope-freqs":
        tensors["rope_freqs.weight"] = torch.ones(3)
    if change == "zero-rope-freq":
        tensors["rope_freqs.weight"] = torch.tensor([1.0] * 7 + [0.0])
    path = write_gguf(tmp_path / "m.gguf", arch, meta, tensors)
    with pytest.raises(ModelLoadError, match=message):
        GGUFSource(path)


def llama3_rope_freqs(hf) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(transformers' scaled frequencies, the unscaled ones, the converter's `rope_freqs` tensor: one divisor per
    frequency, scaled = plain / factor)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaled = LlamaRotaryEmbedding(hf.config).inv_freq
    plain = LlamaRotaryEmbedding(hf.config).compute_default_rope_parameters(hf.config)[0]
    return scaled, plain, plain / scaled


def test_llama3_rope_factors_stored_as_a_tensor_are_applied(tiny_model, tmp_path):
    _, hf = tiny_model("llama3-scaled")
    scaled, plain, factors = llama3_rope_freqs(hf)
    assert not torch.allclose(scaled, plain)
    tensors = {**gguf_tensors(hf, tied=False), "rope_freqs.weight": factors}
    src = GGUFSource(write_gguf(tmp_path / "m.gguf", "llama", metadata(hf), tensors))
    assert src.config.rope_scaling == {"rope_type": "default", "freq_factors": tuple(factors.tolist())}
    torch.testing.assert_close(rope_inv_freq(src.config), scaled, atol=0, rtol=1e-6)
    assert "rope_freqs.weight" not in src.global_parts()  # a rotary setting, not a weight


def test_linear_scaling_metadata_and_rope_factors_both_apply(tiny_llama, tmp_path):
    """As in llama.cpp: the linear factor scales every frequency, the tensor's factors each their own."""
    _, hf = tiny_llama
    factors = torch.linspace(1.0, 8.0, hf.config.head_dim // 2)
    meta = metadata(hf) | {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    linear = GGUFSource(write_gguf(tmp_path / "linear.gguf", "llama", meta, gguf_tensors(hf, tied=False)))
    assert linear.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    both = GGUFSource(write_gguf(tmp_path / "both.gguf", "llama", meta,
                                 {**gguf_tensors(hf, tied=False), "rope_freqs.weight": factors}))
    plain = rope_inv_freq(both.config.replace(rope_scaling=None))
    torch.testing.assert_close(rope_inv_freq(linear.config), plain / 4, atol=0, rtol=1e-6)
    torch.testing.assert_close(rope_inv_freq(both.config), plain / 4 / factors, atol=0, rtol=1e-6)
    none = GGUFSource(write_gguf(tmp_path / "none.gguf", "llama", metadata(hf) | {"llama.rope.scaling.type": "none"},
                                 gguf_tensors(hf, tied=False)))
    assert none.config.rope_scaling is None and torch.equal(rope_inv_freq(none.config), plain)


def test_a_llama3_gguf_gives_the_logits_of_the_checkpoint_it_came_from(tiny_model, tmp_path):
    """The whole model through the executor, at positions past the original context the scaling is for."""
    from flexserve.offload.executor import OffloadExecutor
    from flexserve.offload.policy import Policy

    _, hf = tiny_model("llama3-scaled")
    _, _, factors = llama3_rope_freqs(hf)
    tensors = {**gguf_tensors(hf, tied=False), "rope_freqs.weight": factors}
    src = GGUFSource(write_gguf(tmp_path / "m.gguf", "llama", metadata(hf), tensors))
    n = 48  # the tiny model's original_max_position_embeddings is 32
    ids = torch.randint(3, hf.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    ex = OffloadExecutor(src, Policy(), "cpu", torch.float32)
    try:
        state = ex.new_block([1], n)
        got = ex.forward(state, [ids], [torch.arange(n)[None]], [None], all_logits=True)[0][0]
    finally:
        ex.close()
    with torch.no_grad():
        want = hf(ids).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --- the real SmolLM2-135M-Instruct Q4_1 file ----------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    return GGUFSource(path), {t.name: t for t in gguf.GGUFReader(path).tensors}


def _dequantized(raw, name) -> torch.Tensor:
    t = raw[name]
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape))))


def test_smollm2_layers_are_the_dequantised_tensors_with_q_and_k_rows_restored(smollm2):
    src, raw = smollm2
    cfg = src.config
    assert raw["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1  # really quantised
    parts = src.layer_parts(29)
    assert set(parts) == {"attn_norm.weight", "q.weight", "k.weight", "v.weight", "o.weight", "mlp_norm.weight",
                          "gate.weight", "up.weight", "down.weight"}
    assert torch.equal(to_interleaved(parts["q.weight"], cfg.num_heads), _dequantized(raw, "blk.29.attn_q.weight"))
    assert torch.equal(to_interleaved(parts["k.weight"], cfg.num_kv_heads), _dequantized(raw, "blk.29.attn_k.weight"))
    assert not torch.equal(parts["q.weight"], _dequantized(raw, "blk.29.attn_q.weight"))  # rows did move
    for part, name in [("v.weight", "attn_v"), ("down.weight", "ffn_down"), ("attn_norm.weight", "attn_norm")]:
        assert torch.equal(parts[part], _dequantized(raw, f"blk.29.{name}.weight")), part
    fused = layer_weights(src, 29)  # shapes checked against the config on the way
    assert fused["qkv.weight"].shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
