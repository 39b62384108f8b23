"""Encoding and decoding of a whole model update under one spec.

A spec is a default pipeline plus optional per-layer rules. Each tensor is
encoded with the pipeline of the first rule that matches its name and shape,
and the reader resolves the same rule from the expected name and shape, so a
record carries no pipeline tag. Model-scope top-k ranks together only the
tensors that one pipeline governs.
"""

import logging
import math
import struct
from collections.abc import Mapping

import numpy as np

from .errors import DecodeError
from .spec import CompressionSpec, parse_compression_spec
from .stages import Pipeline, Sparsifier, ValueStage, Zstd
from .wire import DTYPE_FLOAT32, MAX_NDIM, MAX_U16, MAX_U32, PayloadReader, TensorRecord, write_payload

logger = logging.getLogger(__name__)

# Errors that a missing check could let through from numpy, struct or slicing.
_UNEXPECTED_ERRORS = (
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
    struct.error,
    MemoryError,
)


class UpdateCodec:
    """Encoder for model updates under one compression pipeline.

    Parameters
    ----------
    spec : CompressionSpec or str
        The pipeline, for example ``"topk:0.01,q:8"`` (top-k over the whole
        update), ``"topk:0.01:tensor,q:8"`` (top-k per tensor),
        ``"randk:0.1,qsgd:15,zstd"``, ``"lowrank:2,q:8"`` (PowerSGD-style
        factors of the weight matrices) or ``"topk:0.01,q:8;bias=none"``
        (biases sent exactly). A string is parsed with `parse_compression_spec`.

    Attributes
    ----------
    spec : CompressionSpec
        The parsed pipeline, written in canonical form into every payload.
    unbiased : bool
        Whether every stage of every pipeline (default and rules) is unbiased, so decoded updates equal the input in
        expectation over the seed.
    error_feedback_advised : bool
        Whether any stage drops enough that clients should keep a residual
        (see `encode_with_error_feedback`).
    decode_commutes_with_sum : bool
        Whether every stage's decoding commutes with a sum of coded values.
    """

    def __init__(self, spec: CompressionSpec | str) -> None:
        self.spec = spec if isinstance(spec, CompressionSpec) else parse_compression_spec(spec)
        spec_size = len(self.spec.canonical().encode("utf-8"))
        if spec_size > MAX_U16:
            raise ValueError(
                f"canonical spec is {spec_size} UTF-8 bytes, the payload header allows at most "
                f"{MAX_U16}; use fewer or shorter rules"
            )

        # Position 0 is the default pipeline, position i the i-th rule's.
        self._pipelines = [Pipeline(self.spec.default_pipeline)]
        self._pipelines += [Pipeline(rule.pipeline) for rule in self.spec.rules]

        stages = [stage for pipeline in self._pipelines for stage in pipeline.stages]
        self.unbiased = all(stage.unbiased for stage in stages)
        self.error_feedback_advised = any(stage.error_feedback_advised for stage in stages)
        self.decode_commutes_with_sum = all(stage.decode_commutes_with_sum for stage in stages)

    @property
    def stages(self) -> tuple["Sparsifier | ValueStage | Zstd", ...]:
        """The default pipeline's stage objects in pipeline order (rules' stages not included)."""
        return self._pipelines[0].stages

    def encode(self, update: Mapping[str, np.ndarray], seed: int) -> bytes:
        """Encode an update into one wire-format payload.

        Parameters
        ----------
        update : Mapping[str, np.ndarray]
            Tensor name to floating-point array of any shape, 0-d included.
            Arrays are converted to float32. The payload keeps the mapping's order.
        seed : int
            Non-negative seed of the stochastic rounding, the random-k
            subsets and the low-rank sketches. The same update and seed
            always give the same bytes. Tensor ``i`` draws from
            ``SeedSequence([seed, i])``.

        Raises
        ------
        ValueError
            If a tensor contains NaN or infinity, is not a floating-point array,
            does not fit the wire format's length fields, or has values that
            the value coder cannot represent (such as beyond ±65504 for fp16).
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(update, Mapping):
            raise ValueError(f"update must be a mapping of name to array, got {type(update).__name__}")

        tensors = []
        for name, array in update.items():
            tensors.append((name, _as_float32(name, array, f"tensor {name!r}")))
        flats = [values.reshape(-1) for _, values in tensors]
        governing = [self.spec.pipeline_for(name, values.shape)[0] for name, values in tensors]

        # Model-scope top-k ranks all tensors of its pipeline together, so
        # every tensor's kept indices are known before the first body is written.
        selections: list = [None] * len(tensors)
        for index, pipeline in enumerate(self._pipelines):
            positions = [position for position, chosen in enumerate(governing) if chosen == index]
            chosen = pipeline.select_update([flats[position] for position in positions], int(seed))
            if chosen is not None:
                for position, selection in zip(positions, chosen):
                    selections[position] = selection

        records = []
        for position, ((name, values), flat) in enumerate(zip(tensors, flats)):
            where = f"tensor {name!r}"
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), position])))
            pipeline = self._pipelines[governing[position]]
            body = pipeline.encode(flat, values.shape, selections[position], rng, where)

            if len(body) > MAX_U32:
                raise ValueError(
                    f"{where}: encoded body of {len(body)} bytes exceeds the format's "
                    f"limit of {MAX_U32} bytes; split the tensor"
                )
            records.append(TensorRecord(name, values.shape, DTYPE_FLOAT32, body))

        return write_payload(self.spec.canonical(), records)


def decode_update(
    payload: bytes | bytearray | memoryview,
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    expected_spec: CompressionSpec | str | None = None,
) -> dict[str, np.ndarray]:
    """Decode one client's payload into float32 arrays.

    The spec is read from the payload header, and each tensor's pipeline is
    resolved from its expected name and shape. Every declared length and
    count is checked against the bytes present and against `expected_shapes`
    before anything is allocated, so memory use is bounded by the expected
    model size.

    Parameters
    ----------
    payload : bytes-like
        One payload as written by `UpdateCodec.encode`.
    expected_shapes : Mapping[str, tuple[int, ...]]
        The model's tensor names and shapes. The payload must contain exactly
        these names, in any order, each with exactly this shape.
    expected_spec : CompressionSpec or str, optional
        When given, a payload written under any other pipeline is rejected.

    Returns
    -------
    dict[str, np.ndarray]
        Name to float32 array, in the order of `expected_shapes`. All values
        are finite.

    Raises
    ------
    DecodeError
        For any payload that is malformed, corrupted or does not match the
        expected names, shapes or spec, and for no other payload.
    ValueError
        If `expected_shapes` or `expected_spec` themselves are invalid.
    """
    shapes = _check_expected_shapes(expected_shapes)
    if isinstance(expected_spec, str):
        expected_spec = parse_compression_spec(expected_spec)

    try:
        return _decode_checked(payload, shapes, expected_spec)
    except DecodeError:
        raise
    except _UNEXPECTED_ERRORS as error:
        # Every malformed payload should already fail a named check above, so
        # this line means a missing check. The server still gets a DecodeError.
        logger.warning("payload failed an unnamed check: %r", error)
        raise DecodeError(
            f"payload could not be decoded, unexpected {type(error).__name__}: {error}"
        ) from error


def _decode_checked(
    payload: bytes | bytearray | memoryview,
    shapes: dict[str, tuple[int, ...]],
    expected_spec: CompressionSpec | None,
) -> dict[str, np.ndarray]:
    reader = PayloadReader(payload)
    spec_text = reader.read_header()

    # Writers put the canonical text in the header, so a text comparison
    # rejects another pipeline before any parsing work, which a header with
    # thousands of rules would otherwise cost on every reply.
    if expected_spec is not None and spec_text != expected_spec.canonical():
        raise DecodeError(
            f"payload was encoded with {_shorten(spec_text)}, expected {expected_spec.canonical()}"
        )

    try:
        spec = parse_compression_spec(spec_text)
    except ValueError as error:
        raise DecodeError(
            f"pipeline spec in the payload header is invalid: {_shorten(str(error), 600)}"
        ) from error
    if expected_spec is not None and spec != expected_spec:
        raise DecodeError(f"payload was encoded with {spec}, expected {expected_spec}")

    pipelines = [Pipeline(spec.default_pipeline)] + [Pipeline(rule.pipeline) for rule in spec.rules]
    decoded: dict[str, np.ndarray] = {}
    for record in reader.read_records(shapes):
        where = f"tensor {record.name!r}"
        position, _ = spec.pipeline_for(record.name, record.shape)
        flat = pipelines[position].decode(record.body, record.shape, where)
        decoded[record.name] = flat.reshape(record.shape)

    return {name: decoded[name] for name in shapes}


def payload_float32_bytes(expected_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Return what the update costs uncompressed: 4 bytes per parameter.

    This is the size of the raw tensors only, without the wire-format header.
    """
    return 4 * sum(math.prod(shape) for shape in expected_shapes.values())


def _as_float32(name: object, array: object, where: str) -> np.ndarray:
    if not isinstance(name, str):
        raise ValueError(f"tensor names must be str, got {type(name).__name__} {name!r}")
    try:
        encoded_name = name.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where}: name is not encodable as UTF-8: {error.reason}") from error
    if len(encoded_name) > MAX_U16:
        raise ValueError(f"{where}: name is {len(encoded_name)} UTF-8 bytes, the maximum is {MAX_U16}")

    values = np.asarray(array)
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"{where}: dtype {values.dtype} is not a floating-point type; pass float32")
    values = np.asarray(values, dtype=np.float32, order="C")

    if values.ndim > MAX_NDIM or any(dim > MAX_U32 for dim in values.shape) or values.size > MAX_U32:
        raise ValueError(
            f"{where}: shape {values.shape} exceeds the format's limits of {MAX_NDIM} dimensions "
            f"and {MAX_U32} elements"
        )

    # A float64 value beyond the float32 range becomes infinity here, and is
    # rejected with the rest.
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        raise ValueError(
            f"{where} contains {bad} non-finite values (NaN or infinity); "
            "only finite updates can be encoded"
        )
    return values


def _check_expected_shapes(expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, shape in expected_shapes.items():
        dims = tuple(int(dim) for dim in shape)
        if any(dim < 0 for dim in dims):
            raise ValueError(f"expected shape {dims} of tensor {name!r} has a negative dimension")
        shapes[name] = dims
    return shapes


def _shorten(text: str, limit: int = 200) -> str:
    # Header text comes from the sender, so messages quote a bounded part of it.
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
