"""Codec stages: each one elementary transform of a tensor's values.

A pipeline is an optional index stage (`TopK`) followed by one value stage
(`Float32Values` or `Quantize`). The index stage picks which entries to send,
and the value stage codes the picked values, or the whole flattened tensor when
no index stage runs. Each stage declares as class attributes:

- ``unbiased``: whether the decoded value equals the input in expectation over
  the encoder's randomness.
- ``error_feedback_advised``: whether the stage drops so much that clients
  should carry the residual into the next round.
- ``decode_needs_shape``: whether decoding needs the element count from the
  expected shape because the body does not store it.

`TopK` also declares ``scope`` per instance. ``"tensor"`` selects within each
tensor and ``"model"`` across the whole update, so the codec calls
`TopK.select_update` for every tensor's indices before encoding any tensor.
"""

import math
import struct
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from .bitpack import pack_codes, packed_size, padding_bits_are_zero, unpack_codes
from .errors import DecodeError
from .index_coding import decode_selection, encode_indices
from .spec import DEFAULT_TOPK_SCOPE, TOPK_SCOPES, CompressionSpec

_LE_FLOAT32 = np.dtype("<f4")

# Scales below the smallest normal float32 would make 1 / scale overflow, so a
# block whose range is that small is sent as constant: its error is then at most
# the range, below 3e-36.
_MIN_SCALE = float(np.finfo(np.float32).tiny)


class Float32Values:
    """Raw little-endian float32 values, 4 bytes each: the uncompressed baseline."""

    name = "none"
    unbiased = True
    error_feedback_advised = False
    decode_needs_shape = True

    def body_size(self, count: int) -> int:
        """Return the exact body length in bytes for `count` values."""
        return 4 * count

    def encode(self, values: np.ndarray, rng: np.random.Generator | None, where: str) -> bytes:
        """Write the values as little-endian float32. `rng` and `where` are unused."""
        return values.astype(_LE_FLOAT32, copy=False).tobytes()

    def decode(self, body: memoryview, count: int, where: str) -> np.ndarray:
        """Read `count` float32 values, rejecting NaN and infinity."""
        _check_size(body, self.body_size(count), f"{where}: float32 body for {count} values")

        values = np.frombuffer(body, dtype=_LE_FLOAT32, count=count).astype(np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            position = int(np.argmin(finite))
            raise DecodeError(
                f"{where}: value {values[position]} at position {position} is not finite"
            )
        return values


class Quantize:
    """Uniform ``bits``-bit quantization with stochastic rounding.

    Each block of `block_size` values (or the whole input when `block_size` is
    None) is mapped onto ``2**bits - 1`` equal steps between its min and max.
    A value at fraction ``f`` between two levels rounds up with probability
    ``f``, so decoding is unbiased. The error per element is below one step,
    ``scale = (max - min) / (2**bits - 1)``, plus float32 rounding. Constant
    blocks store scale 0 and decode exactly.

    Body layout: per block a float32 min and a float32 scale, then the codes
    bit-packed at `bits` bits each. Decoding computes ``min + code * scale`` in
    float32.

    Parameters
    ----------
    bits : int
        Code width, 1 to 8. Fewer bits send fewer bytes but add rounding
        noise: the variance per element grows as ``scale**2 / 4``.
    block_size : int or None
        Values per block. Smaller blocks give tighter ranges, and so less noise
        near small values, at 8 bytes of min and scale per block.
    """

    name = "q"
    unbiased = True
    error_feedback_advised = False
    decode_needs_shape = True

    def __init__(self, bits: int, block_size: int | None = None) -> None:
        self.bits = bits
        self.block_size = block_size
        self.levels = (1 << bits) - 1

    def num_blocks(self, count: int) -> int:
        """Return the number of blocks, each with its own min and scale."""
        if count == 0:
            return 0
        if self.block_size is None:
            return 1
        return -(-count // self.block_size)

    def body_size(self, count: int) -> int:
        """Return the exact body length in bytes for `count` values."""
        return 8 * self.num_blocks(count) + packed_size(count, self.bits)

    def encode(self, values: np.ndarray, rng: np.random.Generator, where: str) -> bytes:
        """Quantize finite float32 values.

        Raises
        ------
        ValueError
            If a block's range does not fit float32 (values near ±3.4e38).
        """
        if values.size == 0:
            return b""

        blocks = self._as_blocks(values)
        mins = blocks.min(axis=1)
        scales = self._scales(mins, blocks.max(axis=1), where)

        inverse = np.zeros_like(scales)
        nonzero = scales > 0
        inverse[nonzero] = 1.0 / scales[nonzero]

        # Stochastic rounding: floor(x + u) with u uniform in [0, 1) equals x in
        # expectation. The clip only catches float32 rounding at the ends.
        steps = blocks - mins[:, None]
        steps *= inverse[:, None]
        steps += rng.random(steps.shape, dtype=np.float32)
        np.floor(steps, out=steps)
        np.clip(steps, 0, self.levels, out=steps)
        codes = steps.astype(np.uint8).reshape(-1)[: values.size]

        parameters = np.stack([mins, scales], axis=1).astype(_LE_FLOAT32)
        return parameters.tobytes() + pack_codes(codes, self.bits)

    def decode(self, body: memoryview, count: int, where: str) -> np.ndarray:
        """Dequantize `count` values, checking every block's min and scale."""
        _check_size(
            body,
            self.body_size(count),
            f"{where}: {self.bits}-bit quantized body for {count} values",
        )
        if count == 0:
            return np.empty(0, dtype=np.float32)

        # Memory: the float32 result, the uint8 codes and one float32 per block
        # for the checks. On little-endian hosts the parameters are read in place.
        blocks = self.num_blocks(count)
        parameters = np.frombuffer(body, dtype=_LE_FLOAT32, count=2 * blocks)
        parameters = parameters.astype(np.float32, copy=False).reshape(blocks, 2)
        mins = parameters[:, 0]
        scales = parameters[:, 1]
        self._check_parameters(mins, scales, where)

        packed = np.frombuffer(body, dtype=np.uint8, offset=8 * blocks)
        if not padding_bits_are_zero(packed, count, self.bits):
            raise DecodeError(f"{where}: padding bits after the last {self.bits}-bit code are not zero")
        codes = unpack_codes(packed, count, self.bits)

        values = codes.astype(np.float32)
        del codes
        if blocks == 1:
            values *= scales[0]
            values += mins[0]
            return values

        # Full blocks as a (blocks, block_size) view, then the shorter last block.
        full = count // self.block_size
        if full:
            grid = values[: full * self.block_size].reshape(full, self.block_size)
            grid *= scales[:full, None]
            grid += mins[:full, None]
        if full < blocks:
            tail = values[full * self.block_size :]
            tail *= scales[full]
            tail += mins[full]
        return values

    def _as_blocks(self, values: np.ndarray) -> np.ndarray:
        count = values.size
        if self.block_size is None or count <= self.block_size:
            return values.reshape(1, count)

        # Padding with copies of the last value leaves the last block's min and
        # max unchanged. The padded codes are cut off after rounding.
        blocks = self.num_blocks(count)
        padded = np.empty(blocks * self.block_size, dtype=np.float32)
        padded[:count] = values
        padded[count:] = values[-1]
        return padded.reshape(blocks, self.block_size)

    def _scales(self, mins: np.ndarray, maxs: np.ndarray, where: str) -> np.ndarray:
        spans = maxs.astype(np.float64) - mins.astype(np.float64)
        with np.errstate(over="ignore"):
            scales = (spans / self.levels).astype(np.float32)
        scales[scales < _MIN_SCALE] = 0.0

        # The decoder rejects a block whose top level overflows, so the encoder
        # must not write one.
        with np.errstate(over="ignore"):
            tops = mins + np.float32(self.levels) * scales
        if not np.isfinite(tops).all():
            block = int(np.argmin(np.isfinite(tops)))
            raise ValueError(
                f"{where}: block {block} spans {mins[block]} to {maxs[block]}, "
                f"which a {self.bits}-bit float32 scale cannot represent; scale the update down"
            )
        return scales

    def _check_parameters(self, mins: np.ndarray, scales: np.ndarray, where: str) -> None:
        # A finite top level implies a finite min and a finite scale, so two
        # checks cover all four rules with one float32 temporary per block.
        with np.errstate(over="ignore", invalid="ignore"):
            tops = scales * np.float32(self.levels)
            tops += mins
        if np.isfinite(tops).all() and (scales >= 0).all():
            return

        valid = np.isfinite(mins) & np.isfinite(scales) & (scales >= 0) & np.isfinite(tops)
        block = int(np.argmin(valid))
        raise DecodeError(
            f"{where}: block {block} has min {mins[block]} and scale {scales[block]}; "
            f"expected a finite min, a finite scale >= 0 and a finite top level "
            f"min + {self.levels} * scale"
        )


class TopK:
    """Top-k sparsification: keep the k largest-magnitude entries of an update.

    The scope decides what k counts over:

    - ``"model"`` (default): one ``k = max(1, ceil(fraction * total_numel))``
      over all tensors of the update together, with one magnitude threshold
      across them. Tensors with large updates get more of the byte budget, and
      a tensor whose entries all fall below the threshold keeps none.
    - ``"tensor"``: each tensor keeps ``max(1, ceil(fraction * numel))`` of its
      own entries, and 0 when it is empty.

    k is computed exactly from the decimal text of the fraction. Ties at the
    threshold go to the lower (tensor position, flat index), so the choice is
    deterministic. Entries not kept decode as zero, which biases the update
    toward zero, so clients should use error feedback.

    Body layout, the same under both scopes: k (u32), index coding (u8), index
    byte length (u32), the index bytes, then the value stage's body for the k
    kept values in index order.

    Parameters
    ----------
    fraction : float
        Share of entries to keep, in (0, 1]. With error feedback, 0.01 to 0.1
        usually converges close to the uncompressed run. Smaller fractions
        leave more of each update in the residual for later rounds.
    scope : {"model", "tensor"}
        ``"model"`` spends the budget where the update is largest, which on the
        federated HAR CNN reached higher accuracy at the same bytes (see
        `CompressionSpec.topk_scope`). ``"tensor"`` sends every non-empty
        tensor at least one entry each round. During selection model scope
        allocates two float32 arrays of the whole update's size (the magnitudes
        and the copy that ``np.partition`` sorts), tensor scope two of the
        largest tensor's size.
    """

    name = "topk"
    unbiased = False
    error_feedback_advised = True
    decode_needs_shape = True

    HEADER = struct.Struct("<IBI")

    def __init__(self, fraction: float, scope: str = DEFAULT_TOPK_SCOPE) -> None:
        if scope not in TOPK_SCOPES:
            raise ValueError(f"top-k scope {scope!r} is invalid; expected one of {TOPK_SCOPES}")
        self.fraction = fraction
        self.scope = scope
        self._exact_fraction = Fraction(repr(fraction))

    def k_for(self, numel: int) -> int:
        """Return how many of `numel` entries top-k keeps.

        `numel` is one tensor's size under tensor scope and the whole update's
        size under model scope.
        """
        if numel == 0:
            return 0
        return min(numel, max(1, math.ceil(self._exact_fraction * numel)))

    def select(self, flat: np.ndarray) -> np.ndarray:
        """Return the sorted flat indices of one tensor's k largest magnitudes (tensor scope)."""
        return _largest_magnitudes(np.abs(flat), self.k_for(flat.size))

    def select_update(self, flats: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return each tensor's sorted kept flat indices, under the stage's scope.

        Parameters
        ----------
        flats : Sequence[np.ndarray]
            The update's tensors as flat float32 arrays, in payload order.
        """
        if self.scope == "tensor":
            return [self.select(flat) for flat in flats]

        sizes = np.array([flat.size for flat in flats], dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(sizes)))
        total = int(offsets[-1])
        k = self.k_for(total)
        if k == total:
            return [np.arange(size, dtype=np.int64) for size in sizes]

        # Concatenating in payload order makes the lower global position the
        # lower (tensor position, flat index), which is the tie rule.
        magnitudes = np.concatenate(flats)
        np.abs(magnitudes, out=magnitudes)
        kept_positions = _largest_magnitudes(magnitudes, k)

        bounds = np.searchsorted(kept_positions, offsets)
        return [
            kept_positions[bounds[position] : bounds[position + 1]] - offsets[position]
            for position in range(len(flats))
        ]

    def encode(
        self,
        flat: np.ndarray,
        indices: np.ndarray,
        value_stage: "Float32Values | Quantize",
        rng: np.random.Generator | None,
        where: str,
    ) -> bytes:
        """Code the kept indices of one tensor and pass their values on.

        `indices` are the tensor's strictly increasing kept flat indices, as
        `select_update` returns them, and may be empty.
        """
        coding, index_bytes = encode_indices(indices, flat.size)

        header = self.HEADER.pack(indices.size, coding, len(index_bytes))
        return header + index_bytes + value_stage.encode(flat[indices], rng, where)

    def decode(
        self, body: memoryview, numel: int, value_stage: "Float32Values | Quantize", where: str
    ) -> np.ndarray:
        """Decode a top-k body into a dense flat float32 array of `numel` elements.

        Any ``k <= numel`` is accepted, 0 included, because under model scope
        the writer chooses k across tensors.
        """
        if len(body) < self.HEADER.size:
            raise DecodeError(
                f"{where}: top-k body is {len(body)} bytes, shorter than its "
                f"{self.HEADER.size}-byte header"
            )

        k, coding, index_size = self.HEADER.unpack_from(body, 0)
        if k > numel:
            raise DecodeError(f"{where}: top-k k = {k} exceeds the tensor's {numel} elements")

        index_end = self.HEADER.size + index_size
        if index_end > len(body):
            raise DecodeError(
                f"{where}: top-k index length {index_size} exceeds the "
                f"{len(body) - self.HEADER.size} bytes left in the body"
            )

        index_bytes = np.frombuffer(body, dtype=np.uint8, count=index_size, offset=self.HEADER.size)
        selection = decode_selection(coding, index_bytes, k, numel, where)
        values = value_stage.decode(body[index_end:], k, f"{where} (top-k values)")

        # A bitmap selects through a boolean mask (1 byte per element) and a
        # varint section through int64 indices, at most numel / 8 of them.
        dense = np.zeros(numel, dtype=np.float32)
        dense[selection] = values
        return dense


def build_stages(spec: CompressionSpec) -> tuple[TopK | None, Float32Values | Quantize]:
    """Return the pipeline of a spec as (index stage or None, value stage)."""
    index_stage = None
    if spec.topk_fraction is not None:
        index_stage = TopK(spec.topk_fraction, spec.topk_scope)
    if spec.bits is None:
        return index_stage, Float32Values()
    return index_stage, Quantize(spec.bits, spec.block_size)


def _largest_magnitudes(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Return the sorted positions of the `k` largest magnitudes, ties to the lower position."""
    size = magnitudes.size
    if k == size:
        return np.arange(size, dtype=np.int64)
    if k == 0:
        return np.empty(0, dtype=np.int64)

    threshold = np.partition(magnitudes, size - k)[size - k]
    keep = magnitudes > threshold
    missing = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(magnitudes == threshold)[:missing]] = True
    return np.flatnonzero(keep)


def _check_size(body: memoryview, expected: int, description: str) -> None:
    if len(body) != expected:
        raise DecodeError(f"{description} is {len(body)} bytes, expected exactly {expected}")
