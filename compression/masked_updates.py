"""Updates of a pruned model on the wire: which masked tensors travel as their kept entries.

A masked tensor usually travels compacted to its kept entries (`compact`),
because both sides know the mask. A tensor that a low-rank pipeline factors
travels at its full shape instead, with pruned entries zero. Its factors need
the matrix shape that compacting loses, and its kept entries alone would go
densely, at the value coder's cost. The factors' product is not zero at pruned
entries, so the reader zeroes them after decoding.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from .codec import decode_update
from .errors import DecodeError
from .pruning import Mask, apply_mask, compact, compact_shapes, expand
from .spec import CompressionSpec, parse_compression_spec
from .stages import LowRank, build_stages
from .wire import PayloadReader


def compacted_mask(mask: Mask, spec: CompressionSpec, shapes: Mapping[str, Sequence[int]]) -> Mask:
    """Return the part of `mask` whose tensors travel compacted: all but those `spec` factors."""
    return {name: kept for name, kept in mask.items() if not _factored(spec, name, tuple(shapes[name]))}


def compact_for_uplink(
    tensors: Mapping[str, np.ndarray], mask: Mask, spec: CompressionSpec
) -> dict[str, np.ndarray]:
    """Return `tensors` as `spec` sends them under `mask`: compacted, or full shape with pruned entries zero."""
    shapes = {name: values.shape for name, values in tensors.items()}
    return compact(apply_mask(tensors, mask), compacted_mask(mask, spec, shapes))


def expand_from_uplink(
    tensors: Mapping[str, np.ndarray], mask: Mask, spec: CompressionSpec, shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Invert `compact_for_uplink`: full-shape tensors of `shapes` with pruned entries zero."""
    return apply_mask(expand(tensors, compacted_mask(mask, spec, shapes), shapes), mask)


def decode_masked_update(
    payload: bytes | bytearray | memoryview,
    shapes: Mapping[str, tuple[int, ...]],
    mask: Mask,
    expected_spec: CompressionSpec | None = None,
) -> dict[str, np.ndarray]:
    """Decode a payload encoded under `mask` into full-shape tensors with pruned entries zero.

    Without `expected_spec` the payload's own spec decides which tensors came
    compacted. Raises `DecodeError` for any malformed payload, as
    `decode_update` does.
    """
    if not mask:
        return decode_update(payload, shapes, expected_spec=expected_spec)

    spec = expected_spec if expected_spec is not None else _payload_spec(payload)
    compacted = compacted_mask(mask, spec, shapes)
    decoded = decode_update(payload, compact_shapes(shapes, compacted), expected_spec=expected_spec)
    return apply_mask(expand(decoded, compacted, shapes), mask)


def _factored(spec: CompressionSpec, name: str, shape: tuple[int, ...]) -> bool:
    _, pipeline = spec.pipeline_for(name, shape)
    sparsifier, _, _ = build_stages(pipeline)
    return isinstance(sparsifier, LowRank) and sparsifier.factor_shape(shape) is not None


def _payload_spec(payload: bytes | bytearray | memoryview) -> CompressionSpec:
    text = PayloadReader(payload).read_header()
    try:
        return parse_compression_spec(text)
    except ValueError as error:
        raise DecodeError(
            f"pipeline spec {text[:200]!r} in the payload header is invalid: {error}; "
            "encode with a spec that parse_compression_spec accepts"
        ) from error
