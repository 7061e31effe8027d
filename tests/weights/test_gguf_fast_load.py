"""A GGUF model is parsed once: flexserve's header reader gives the same tensors as the `gguf` package's, and the
tokenizer transformers builds from the file is cached, so a second start reads no GGUF metadata at all."""
import gguf
import numpy as np
import pytest

from flexserve.tokenizer import Tokenizer, tokenizer_cache_dir
from flexserve.weights import default_model_path
from flexserve.weights.gguf_file import GGUFFile


def test_header_reader_matches_the_gguf_package():
    path = default_model_path()
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == [int(x) for x in b.shape]
    for a, b in list(zip(ours.tensors, theirs.tensors))[:: 17]:
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
    for key in ("general.architecture", "llama.block_count", "llama.rope.freq_base", "tokenizer.ggml.eos_token_id"):
        assert ours.fields[key] == theirs.fields[key].contents(), key
    assert len(ours.fields["tokenizer.ggml.tokens"]) == len(theirs.fields["tokenizer.ggml.tokens"].contents())


def test_gguf_tokenizer_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXSERVE_CACHE", str(tmp_path))
    path = default_model_path()
    first = Tokenizer(path, 49152)
    messages = [{"role": "user", "content": "Hello, wörld!"}]
    ids, chat = first.encode("Hello, wörld! 中文"), first.chat_prompt(messages)
    assert tokenizer_cache_dir(path).startswith(str(tmp_path))

    def no_parse(*a, **k):
        raise AssertionError("the GGUF file was parsed again")
    monkeypatch.setattr(gguf, "GGUFReader", no_parse)
    second = Tokenizer(path, 49152)
    assert second.encode("Hello, wörld! 中文") == ids and second.chat_prompt(messages) == chat
    assert second.eos_token_id == first.eos_token_id and second.decode(ids) == first.decode(ids)


def test_truncated_file_is_refused(tmp_path):
    data = open(default_model_path(), "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="past the end"):
        GGUFFile(str(cut))
