"""Incremental detokenization: the text of a growing token sequence at O(window) cost per token.

Decoding the whole output after every token costs O(n^2) over a request (a 1,000-token answer means half a
million token decodes). Instead each step decodes a short window twice, with and without the new token, and
keeps the difference; the window starts a few tokens back so that tokenizers that drop or merge leading
spaces (SentencePiece) still produce the right characters. An incomplete UTF-8 sequence ("\\ufffd") waits
for the next token.
"""
from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens already turned into text

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completed (possibly empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""


def find_stop(text: str, delta_len: int, stops: list[str]) -> int | None:
    """Index in `text` of the earliest stop string that the last `delta_len` characters completed, or None.
    Only the tail is searched: earlier text was checked when it arrived."""
    if not stops or not delta_len:
        return None
    start = max(0, len(text) - delta_len - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
