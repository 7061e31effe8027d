"""A Hugging Face model id (`owner/name`) is found in the local hub cache; offline and not cached, it is one clear
line. The cache here is a folder laid out as the hub lays it out; nothing reaches the network (HF_HUB_OFFLINE)."""
import os
import shutil

import pytest

from flexserve.engine import LLM, SamplingParams
from flexserve.errors import ModelLoadError
from flexserve.models.loading import model_config
from flexserve.weights import is_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def cache_model(hub: os.PathLike, repo_id: str, folder: str) -> str:
    """Lay `folder` out in the hub cache as `repo_id` at COMMIT (refs/main naming it)."""
    repo = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    shutil.copytree(folder, snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    return snapshot


def test_hub_id_resolves_from_the_cache(hub_cache, tiny_model):
    folder, _ = tiny_model("llama-gqa")
    snapshot = cache_model(hub_cache, "someone/tiny-llama", folder)
    assert os.path.samefile(resolve_model("someone/tiny-llama"), snapshot)
    assert model_config("someone/tiny-llama").num_layers == model_config(folder).num_layers
    llm = LLM("someone/tiny-llama", device="cpu", dtype="float32")
    try:
        by_id = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    finally:
        llm.close()
    llm = LLM(folder, device="cpu", dtype="float32")
    try:
        by_folder = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    finally:
        llm.close()
    assert by_id == by_folder and len(by_id) == 4


def test_uncached_hub_id_offline_is_one_line(hub_cache, cli):
    rc, out, err = cli("generate", "--model", "someone/not-here", "hi")
    assert rc == 1 and not out and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "'someone/not-here'" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        resolve_model("someone/not-here")


def test_paths_are_not_hub_ids(tmp_path):
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id("./a/b") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    assert not is_hub_id("dir/model.gguf") and not is_hub_id("name")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
