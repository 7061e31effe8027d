"""A model that cannot be loaded is one clear `ModelLoadError` from the API, and from the CLI one line on stderr
and exit status 1, never a traceback."""
import json
import os
import shutil

import pytest

from flexserve import LLM, ModelLoadError
from flexserve.weights import default_model_path


def test_missing_model_path(cli, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    rc, out, err = cli("generate", "--model", str(tmp_path / "nope"), "hi")
    assert rc == 1 and "does not exist" in err and "Traceback" not in err and not out


def test_unknown_architecture(tmp_path, cli):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))
    rc, out, err = cli("generate", "--model", str(tmp_path), "hi")
    assert rc == 1 and "GPT2LMHeadModel" in err and not out


def test_folder_without_weights(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(str(tmp_path))


def test_truncated_safetensors(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    for f in os.listdir(folder):
        shutil.copy(os.path.join(folder, f), tmp_path / f)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated|cannot read"):
        LLM(str(tmp_path), dtype="float32", device="cpu")


def test_garbage_safetensors_header(tiny_model, tmp_path):
    folder, _ = tiny_model("llama-gqa")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        LLM(str(tmp_path))


def test_truncated_gguf(tmp_path, cli):
    data = open(default_model_path(), "rb").read()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="GGUF"):
        LLM(str(bad))
    rc, out, err = cli("generate", "--model", str(bad), "hi")
    assert rc == 1 and "GGUF" in err and "Traceback" not in err and not out


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"123")
    with pytest.raises(ModelLoadError, match="neither"):
        LLM(str(f))


def test_unknown_preset():
    with pytest.raises(ModelLoadError, match="unknown preset"):
        LLM("dummy:opt-7t")
