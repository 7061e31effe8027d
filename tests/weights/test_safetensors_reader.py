"""The safetensors reader on a sharded Hugging Face folder (index json + shards): the same tensors as the
single-file checkpoint, read lazily shard by shard, and every broken folder is one clear `ModelLoadError`."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexserve.errors import ModelLoadError
from flexserve.weights import layer_weights
from flexserve.weights.safetensors_reader import SafetensorsSource

INDEX = "model.safetensors.index.json"


def shard_folder(src: str, dst, extra: dict[str, torch.Tensor] | None = None) -> tuple[str, dict[str, str]]:
    """Rewrite a single-file checkpoint as two shards: the global tensors and layer 0 in the first, the other
    layers in the second (and any `extra` tensors in the first). Returns the folder and the weight map."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors |= extra or {}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {k: names[1 if ".layers." in k and ".layers.0." not in k else 0] for k in tensors}
    for shard in names:
        save_file({k: v.contiguous() for k, v in tensors.items() if weight_map[k] == shard}, os.path.join(dst, shard))
    with open(os.path.join(dst, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return str(dst), weight_map


def edit_index(folder: str, change) -> None:
    path = os.path.join(folder, INDEX)
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied", "opt-350m-like"])
def test_sharded_folder_gives_the_tensors_of_the_single_file(tiny_model, tmp_path, kind):
    folder, hf = tiny_model(kind)
    sharded, weight_map = shard_folder(folder, tmp_path / "sharded")
    assert len(set(weight_map.values())) == 2
    single, split = SafetensorsSource(folder), SafetensorsSource(sharded)
    assert split.config == single.config.replace(name="sharded")  # the name is the folder's
    for i in range(split.config.num_layers):
        a, b = layer_weights(single, i), layer_weights(split, i)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = single.global_parts(), split.global_parts()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("lm_head.weight" in b) == (not split.config.tie_word_embeddings)
    # and they are the model's own tensors under our names
    params = dict(hf.named_parameters())
    prefix = "model.decoder." if kind.startswith("opt") else "model."
    q_name = "self_attn.q_proj.weight"
    assert torch.equal(split.layer_parts(1)["q.weight"], params[f"{prefix}layers.1.{q_name}"])
    assert torch.equal(b["embed.weight"], params[f"{prefix}embed_tokens.weight"])
    if kind.startswith("opt"):
        assert torch.equal(split.layer_parts(1)["up.bias"], params["model.decoder.layers.1.fc1.bias"])
        assert torch.equal(b["project_out.weight"], params["model.decoder.project_out.weight"])
        assert torch.equal(b["pos_embed.weight"], params["model.decoder.embed_positions.weight"])
    else:
        assert torch.equal(split.layer_parts(1)["gate.weight"], params["model.layers.1.mlp.gate_proj.weight"])


def test_tensors_outside_the_model_are_ignored(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8), "optimizer.step": torch.zeros(1)}
    src = SafetensorsSource(shard_folder(folder, tmp_path / "s", extra)[0])
    assert "rotary_emb.inv_freq" not in " ".join(src.layer_parts(0))
    assert layer_weights(src, 0).keys() == layer_weights(SafetensorsSource(folder), 0).keys()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_shards_are_opened_only_when_their_tensors_are_read(tiny_model, tmp_path, damage):
    """Damage the second shard after opening the folder: the globals and layer 0 (first shard) still read;
    layer 1 is a clear error naming the shard."""
    folder, _ = tiny_model("llama-gqa")
    sharded, _ = shard_folder(folder, tmp_path / "s")
    src = SafetensorsSource(sharded)
    second = os.path.join(sharded, "model-00002-of-00002.safetensors")
    data = open(second, "rb").read()
    with open(second, "wb") as f:
        f.write(b"\x07" * 64 if damage == "garbage" else data[: len(data) - 100])
    assert layer_weights(src, 0)["qkv.weight"].shape == (64 + 2 * 32, 64)
    assert src.global_parts()["embed.weight"].shape == (96, 64)
    with pytest.raises(ModelLoadError, match=f"{second}.*(corrupt or truncated|cannot read)"):
        src.layer_parts(1)


def test_a_missing_shard_is_named(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    sharded, _ = shard_folder(folder, tmp_path / "s")
    os.remove(os.path.join(sharded, "model-00002-of-00002.safetensors"))
    with pytest.raises(ModelLoadError, match="shard model-00002-of-00002.safetensors named in the index is missing"):
        SafetensorsSource(sharded)


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}'], ids=["bad-json", "no-weight-map"])
def test_an_unreadable_index_is_named(tiny_model, tmp_path, text):
    folder, _ = tiny_model("llama-gqa")
    sharded, _ = shard_folder(folder, tmp_path / "s")
    with open(os.path.join(sharded, INDEX), "w") as f:
        f.write(text)
    with pytest.raises(ModelLoadError, match="is not a valid safetensors index"):
        SafetensorsSource(sharded)


def test_a_checkpoint_without_a_layer_is_refused_when_opened(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    sharded, _ = shard_folder(folder, tmp_path / "s")
    edit_index(sharded, lambda d: d.update(weight_map={k: v for k, v in d["weight_map"].items()
                                                       if ".layers.1." not in k}))
    with pytest.raises(ModelLoadError, match=r"lacks decoder layers \[1\]"):
        SafetensorsSource(sharded)


def test_a_missing_or_misshapen_tensor_is_named_with_its_layer(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    sharded, _ = shard_folder(folder, tmp_path / "s")
    edit_index(sharded, lambda d: d["weight_map"].pop("model.layers.1.self_attn.k_proj.weight"))
    src = SafetensorsSource(sharded)
    layer_weights(src, 0)
    with pytest.raises(ModelLoadError, match="layer 1: tensor 'k.weight' is missing"):
        layer_weights(src, 1)
    small = tmp_path / "small"
    shutil.copytree(folder, small)
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ModelLoadError, match=r"layer 0: tensor 'up.weight' has shape \(192, 64\), "
                                             r"the config implies \(160, 64\)"):
        layer_weights(SafetensorsSource(str(small)), 0)


def test_an_untied_model_without_its_head_is_refused(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    sharded, _ = shard_folder(folder, tmp_path / "s")
    edit_index(sharded, lambda d: d["weight_map"].pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match="no LM head and the config does not tie embeddings"):
        SafetensorsSource(sharded).global_parts()
