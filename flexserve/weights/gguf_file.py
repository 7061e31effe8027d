"""A GGUF file's metadata and tensor table, parsed in one pass over its header.

The `gguf` package's reader builds a numpy view for every part of every metadata value: for a model with a
49k-token vocabulary and as many merges that takes seconds. The weights need only the scalar metadata and the
tensor table, so this reader walks the header with `struct`, steps over array items without keeping the
strings, and maps the tensor data lazily from the file (dequantised by `gguf.quants`, as before).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

# GGUF metadata value types -> struct format (scalars), per the format's specification.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_STRING, _ARRAY = 8, 9
# Tensor types whose data the `gguf` package reads as typed numbers rather than as bytes.
_TYPED = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class StringArray:
    """A metadata array of strings, kept as its length only (the tokenizer reads the strings itself)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as GGUF lists it: fastest-varying dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    offset: int  # in the file
    nbytes: int
    _file: "GGUFFile"

    @property
    def data(self) -> np.ndarray:
        """The raw data as the `gguf` package's reader gives it (typed, or bytes for quantised types), in the
        shape `gguf.quants.dequantize` expects."""
        kind = int(self.tensor_type)
        dims = tuple(reversed(self.shape))
        if kind in _TYPED:
            count = int(np.prod(self.shape))
            return np.frombuffer(self._file.buffer, _TYPED[kind], count, self.offset).reshape(dims)
        block, size = self._file.quant_sizes[self.tensor_type]
        byte_dims = dims[:-1] + (dims[-1] // block * size,)
        return np.frombuffer(self._file.buffer, np.uint8, self.nbytes, self.offset).reshape(byte_dims)


class GGUFFile:
    """`fields` (metadata key -> value; string arrays as `StringArray`) and `tensors` of a GGUF file.
    Raises ValueError or struct.error on a file that is not GGUF or is cut short."""

    def __init__(self, path: str):
        import gguf

        self.quant_sizes = gguf.GGML_QUANT_SIZES
        with open(path, "rb") as f:
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf, self._pos = self.buffer, 0
        if self._take("<4s") != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        version = self._take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        if n_tensors > len(buf) or n_kv > len(buf):
            raise ValueError("header counts exceed the file size")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._take("<I")
            shape = tuple(self._take("<Q") for _ in range(n_dims))
            infos.append((name, shape, self._take("<I"), self._take("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, shape, kind, offset in infos:
            qtype = gguf.GGMLQuantizationType(kind)
            block, size = self.quant_sizes[qtype]
            nbytes = int(np.prod(shape)) * size // block
            if start + offset + nbytes > len(buf):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            self.tensors.append(TensorInfo(name, shape, qtype, start + offset, nbytes, self))

    def _take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buffer, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > len(self.buffer):
            raise ValueError("a string runs past the end of the file")
        text = self.buffer[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, kind: int):
        if kind in _SCALARS:
            return self._take(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._take("<I"), self._take("<Q")
            if item == _STRING:  # step over the strings: only their number is kept
                buf, pos = self.buffer, self._pos
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                if pos > len(buf):
                    raise ValueError("a string array runs past the end of the file")
                self._pos = pos
                return StringArray(count)
            if item in _SCALARS:
                fmt = _SCALARS[item]
                size = struct.calcsize(fmt)
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buffer, self._pos))
                self._pos += size * count
                return values
            return [self._value(item) for _ in range(count)]
        raise ValueError(f"unknown GGUF metadata type {kind}")
