"""Codecs for model updates: sparsifiers, quantizers, casts, zstd, error feedback, wire format.

Imports only numpy, pydantic, zstandard and the standard library, so the wire format in
docs/wire-format.md is the whole contract for clients in other languages.
"""

from .codec import UpdateCodec, decode_update, payload_float32_bytes
from .error_feedback import encode_with_error_feedback
from .errors import DecodeError
from .spec import DEFAULT_DOWNLINK, DEFAULT_UPLINK, CompressionSpec, parse_compression_spec
from .stages import (
    QSGD,
    BFloat16Values,
    Float16Values,
    Float32Values,
    Quantize,
    RandomK,
    ScaledSign,
    Ternary,
    Threshold,
    TopK,
    Zstd,
)
from .wire import FORMAT_VERSION, MAGIC

__all__ = [
    "DEFAULT_DOWNLINK",
    "DEFAULT_UPLINK",
    "FORMAT_VERSION",
    "MAGIC",
    "QSGD",
    "BFloat16Values",
    "CompressionSpec",
    "DecodeError",
    "Float16Values",
    "Float32Values",
    "Quantize",
    "RandomK",
    "ScaledSign",
    "Ternary",
    "Threshold",
    "TopK",
    "UpdateCodec",
    "Zstd",
    "decode_update",
    "encode_with_error_feedback",
    "parse_compression_spec",
    "payload_float32_bytes",
]
