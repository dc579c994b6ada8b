"""Entropy coding of pruned, quantized weight tensors (see `rdonnx.codec.entropy`)."""

from __future__ import annotations

from rdonnx.codec.entropy import (
    CodecError,
    CodedStream,
    decode_integers,
    decode_kept,
    decode_positions,
    decode_values,
    encode_integers,
    encode_positions,
    encode_values,
)

__all__ = [
    "CodecError", "CodedStream", "decode_integers", "decode_kept", "decode_positions",
    "decode_values", "encode_integers", "encode_positions", "encode_values",
]
