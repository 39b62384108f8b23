"""Codecs for model updates: top-k, stochastic quantization, error feedback, wire format.

Imports only numpy, pydantic and the standard library, so the wire format in
docs/wire-format.md is the whole contract for clients in other languages.
"""

from .codec import UpdateCodec, decode_update, payload_float32_bytes
from .error_feedback import encode_with_error_feedback
from .errors import DecodeError
from .spec import CompressionSpec, parse_compression_spec
from .stages import Float32Values, Quantize, TopK
from .wire import FORMAT_VERSION, MAGIC

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CompressionSpec",
    "DecodeError",
    "Float32Values",
    "Quantize",
    "TopK",
    "UpdateCodec",
    "decode_update",
    "encode_with_error_feedback",
    "parse_compression_spec",
    "payload_float32_bytes",
]
