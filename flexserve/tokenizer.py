"""A thin wrapper over transformers' tokenizers (GGUF-embedded ones too) and chat templates.

Models with random weights have no tokenizer; they get a byte-level stand-in so that the CLI and the server
still run on them (benchmarks pass token ids and never look at the text).
"""
from __future__ import annotations

import os
from typing import Any

from .errors import ModelLoadError


class ByteTokenizer:
    """One token per UTF-8 byte (ids 3..258), for dummy-weight models; decoding ignores out-of-range ids."""

    eos_token_id = 2
    bos_token_id = 1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [(b + 3) % self.vocab_size for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def tokenizer_cache_dir(gguf_path: str) -> str:
    """Where the tokenizer converted from a GGUF file is kept: one folder per file version (path, size and
    modification time) and transformers version, under $FLEXSERVE_CACHE or ~/.cache/flexserve."""
    import hashlib

    import transformers

    st = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    root = os.environ.get("FLEXSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "flexserve")
    return os.path.join(root, "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:24])


def gguf_tokenizer(path: str):
    """The tokenizer embedded in a GGUF file. transformers builds it by parsing the whole file's metadata
    (seconds for a large vocabulary), so the result is saved once in `tokenizer_cache_dir` and read from there
    afterwards (a tokenizer.json loads in a fraction of that). A cache that cannot be written is skipped."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    cache = tokenizer_cache_dir(path)
    if os.path.isfile(os.path.join(cache, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:  # a cache from elsewhere or damaged: rebuild it below
            shutil.rmtree(cache, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(cache))
        tok.save_pretrained(staging)
        os.replace(staging, cache)  # atomic: a concurrent reader sees the whole folder or none
    except OSError:
        shutil.rmtree(locals().get("staging", ""), ignore_errors=True)
    return tok


class Tokenizer:
    """Text <-> ids for one model; loaded lazily because tests and benchmarks often pass token ids."""

    def __init__(self, model_path: str | None, vocab_size: int):
        self.model_path = model_path
        self.vocab_size = vocab_size
        self._tok = None
        self._error: ModelLoadError | None = None

    @property
    def hf(self):
        if self._error is not None:
            raise self._error
        if self._tok is None:
            try:
                self._tok = self._load()
            except ModelLoadError as e:
                self._error = e
                raise
        return self._tok

    def _load(self):
        path = self.model_path
        if path is None or path.startswith("dummy:"):
            return ByteTokenizer(self.vocab_size)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network for a local model
        from transformers import AutoTokenizer

        try:
            if path.endswith(".gguf"):
                return gguf_tokenizer(path)
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many kinds; the user needs to know which model and why
            raise ModelLoadError(f"cannot load a tokenizer for {path}: {e}; pass prompt token ids instead") from None

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    @property
    def available(self) -> bool:
        """Whether text can be produced (a folder with weights but no tokenizer files gives ids only)."""
        try:
            self.hf
            return True
        except ModelLoadError:
            return False

    def decode(self, ids: list[int]) -> str:
        """Text of ids; empty when the model has no tokenizer (callers then work with ids alone)."""
        return self.hf.decode(ids, skip_special_tokens=True) if self.available else ""

    def token_str(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """The model's chat template applied to OpenAI-style messages, with the generation prompt."""
        tok = self.hf
        if isinstance(tok, ByteTokenizer):
            return tok.encode(tok.apply_chat_template(messages))
        if not getattr(tok, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return self.encode(text)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.hf, "eos_token_id", None)
