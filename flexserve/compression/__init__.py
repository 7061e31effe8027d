"""Group-wise quantisation of weights and KV cache: 4- or 8-bit, asymmetric min/max per group.

See `quantize` for the error bound and `tensor` for the packed layout.
"""
from flexserve.compression.config import CompressionConfig
from flexserve.compression.quantize import compress, compress_into, decompress
from flexserve.compression.tensor import CompressedTensor, compressed_nbytes

__all__ = ["CompressionConfig", "CompressedTensor", "compress", "compress_into", "compressed_nbytes",
           "decompress"]
