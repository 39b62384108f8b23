"""Codec stages: each one elementary transform of a tensor's values.

A pipeline is an optional sparsifier (`TopK`, `RandomK` or `Threshold`), one
value coder (`Float32Values`, `Quantize`, `QSGD`, `ScaledSign`, `Ternary`,
`Float16Values` or `BFloat16Values`) and an optional lossless stage (`Zstd`).
The sparsifier picks which entries to send, the value coder codes the picked
values (or the whole flattened tensor when no sparsifier runs), and the
lossless stage compresses the resulting body. Each stage declares as class
attributes:

- ``unbiased``: whether the decoded value equals the input in expectation over
  the encoder's randomness (up to float32 rounding).
- ``error_feedback_advised``: whether the stage drops so much that clients
  should carry the residual into the next round.
- ``decode_commutes_with_sum``: whether summing the coded values of several
  clients and then decoding would give the sum of the decoded values, so that
  a server could aggregate before decoding. True only for elementwise casts
  with no per-client parameters.
- ``decode_needs_shape``: whether decoding needs the element count from the
  expected shape because the body does not store it.

`TopK` also declares ``scope`` per instance. ``"tensor"`` selects within each
tensor and ``"model"`` across all tensors that the pipeline governs, so the
codec calls `select_update` of the sparsifier for every tensor's indices
before encoding any tensor.

`LowRank` takes the sparsifier's place for PowerSGD-style factors, and
`Pipeline` binds one pipeline's stages together with the rule that decides,
from the shape alone, whether low-rank applies to a tensor.
"""

import math
import struct
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import zstandard

from .bitpack import pack_codes, packed_size, padding_bits_are_zero, unpack_codes
from .errors import DecodeError
from .index_coding import bitmap_size, decode_selection, encode_indices
from .spec import DEFAULT_ROUNDING, DEFAULT_TOPK_SCOPE, ROUNDINGS, TOPK_SCOPES, CompressionSpec

_LE_FLOAT32 = np.dtype("<f4")
_LE_FLOAT16 = np.dtype("<f2")
_LE_UINT16 = np.dtype("<u2")
_LE_UINT32 = np.dtype("<u4")

# Scales below the smallest normal float32 would make 1 / scale overflow, so a
# block whose range is that small is sent as constant: its error is then at most
# the range, below 3e-36.
_MIN_SCALE = float(np.finfo(np.float32).tiny)


class Float32Values:
    """Raw little-endian float32 values, 4 bytes each: the uncompressed baseline."""

    name = "none"
    unbiased = True
    error_feedback_advised = False
    decode_commutes_with_sum = True
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
    """Uniform ``bits``-bit quantization with stochastic or nearest rounding.

    Each block of `block_size` values (or the whole input when `block_size` is
    None) is mapped onto ``2**bits - 1`` equal steps between its min and max.
    With stochastic rounding (default) a value at fraction ``f`` between two
    levels rounds up with probability ``f``, so decoding is unbiased, and the
    error per element is below one step, ``scale = (max - min) / (2**bits - 1)``,
    plus float32 rounding. With nearest rounding it rounds up when ``f >= 0.5``:
    deterministic, at most half a step off, but biased. Constant blocks store
    scale 0 and decode exactly. The body is the same for both roundings.

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
    rounding : {"stochastic", "nearest"}
        Nearest rounding halves the worst-case error, but its error does not
        average out over rounds or clients, so use it with error feedback.
    """

    name = "q"
    unbiased = True
    error_feedback_advised = False
    decode_commutes_with_sum = False
    decode_needs_shape = True

    def __init__(self, bits: int, block_size: int | None = None, rounding: str = DEFAULT_ROUNDING) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding {rounding!r} is invalid; expected one of {ROUNDINGS}")
        self.bits = bits
        self.block_size = block_size
        self.rounding = rounding
        self.levels = (1 << bits) - 1

        # Instance attributes shadow the class defaults for the biased variant.
        if rounding == "nearest":
            self.unbiased = False
            self.error_feedback_advised = True

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

    def encode(self, values: np.ndarray, rng: np.random.Generator | None, where: str) -> bytes:
        """Quantize finite float32 values. `rng` is unused under nearest rounding.

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
        # expectation. Nearest rounding is floor(x + 0.5), halves rounding up.
        # The clip only catches float32 rounding at the ends.
        steps = blocks - mins[:, None]
        steps *= inverse[:, None]
        if self.rounding == "nearest":
            steps += np.float32(0.5)
        else:
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


class QSGD:
    """QSGD quantization (Alistarh et al. 2017): stochastic levels of the L2 norm.

    Each block of `block_size` values (or the whole input) stores its L2 norm.
    A value ``x`` is sent as its sign and a level ``l`` in ``0..s``, where
    ``s`` is `levels`: with ``r = |x| / (norm / s)``, the level is ``floor(r)``
    or ``floor(r) + 1``, rounding up with probability ``r - floor(r)``, so the
    decoded ``sign * l * norm / s`` is unbiased. The error per element is below
    one step ``norm / s``. Unlike `Quantize`, QSGD decodes most small entries
    of a block with a large norm as 0. Its variance is at most
    ``min(n / s**2, sqrt(n) / s) * norm**2`` for a block of n values (Lemma 3.1
    of the paper).

    Body layout: one float32 norm per block, then the codes bit-packed at
    ``1 + bit_length(s)`` bits each. A code stores the level in its low
    ``bit_length(s)`` bits and the sign (1 = negative) in its top bit.

    Parameters
    ----------
    levels : int
        ``s``, 1 to 127. ``s = 1`` is ternary (-norm, 0, +norm) at 2 bits per
        value; ``s = 127`` is 8 bits per value. Each doubling of ``s`` costs
        one bit per value and roughly halves the standard deviation.
    block_size : int or None
        Values per norm. Smaller blocks lower the variance, at 4 bytes per block.
    """

    name = "qsgd"
    unbiased = True
    error_feedback_advised = False
    decode_commutes_with_sum = False
    decode_needs_shape = True

    def __init__(self, levels: int, block_size: int | None = None) -> None:
        self.levels = levels
        self.block_size = block_size
        self.level_bits = levels.bit_length()
        self.bits = self.level_bits + 1

    def num_blocks(self, count: int) -> int:
        """Return the number of blocks, each with its own norm."""
        if count == 0:
            return 0
        if self.block_size is None:
            return 1
        return -(-count // self.block_size)

    def body_size(self, count: int) -> int:
        """Return the exact body length in bytes for `count` values."""
        return 4 * self.num_blocks(count) + packed_size(count, self.bits)

    def encode(self, values: np.ndarray, rng: np.random.Generator, where: str) -> bytes:
        """Code finite float32 values as QSGD levels and signs.

        Raises
        ------
        ValueError
            If a block's norm does not fit float32.
        """
        count = values.size
        if count == 0:
            return b""

        # Zero padding leaves every norm unchanged; the padded codes are cut off.
        blocks = self.num_blocks(count)
        width = count if self.block_size is None else self.block_size
        padded = np.zeros(blocks * width, dtype=np.float32)
        padded[:count] = values
        grid = padded.reshape(blocks, width)

        norms64 = np.sqrt(np.einsum("ij,ij->i", grid, grid, dtype=np.float64))
        with np.errstate(over="ignore"):
            norms = norms64.astype(np.float32)
            steps = norms / np.float32(self.levels)
            tops = steps * np.float32(self.levels)
        if not np.isfinite(tops).all():
            block = int(np.argmin(np.isfinite(tops)))
            raise ValueError(
                f"{where}: block {block} has L2 norm {norms64[block]:.3e}, beyond what "
                "float32 QSGD can represent; scale the update down"
            )
        tiny = steps < _MIN_SCALE
        norms[tiny] = 0.0
        steps[tiny] = 0.0

        inverse = np.zeros_like(steps)
        inverse[~tiny] = 1.0 / steps[~tiny]
        negative = grid < 0
        ratio = np.abs(grid)
        ratio *= inverse[:, None]
        ratio += rng.random(ratio.shape, dtype=np.float32)
        np.floor(ratio, out=ratio)
        np.clip(ratio, 0, self.levels, out=ratio)
        codes = ratio.astype(np.uint8)
        del ratio

        # The sign bit is set only on non-zero levels, so zero has one code.
        codes |= (negative & (codes > 0)).astype(np.uint8) << np.uint8(self.level_bits)
        return norms.astype(_LE_FLOAT32).tobytes() + pack_codes(codes.reshape(-1)[:count], self.bits)

    def decode(self, body: memoryview, count: int, where: str) -> np.ndarray:
        """Decode `count` values, checking norms and codes."""
        _check_size(body, self.body_size(count), f"{where}: qsgd:{self.levels} body for {count} values")
        if count == 0:
            return np.empty(0, dtype=np.float32)

        # Memory: the float32 result, uint8 codes and sign flags, and one
        # float32 step per block. On little-endian hosts the norms are read in place.
        blocks = self.num_blocks(count)
        norms = np.frombuffer(body, dtype=_LE_FLOAT32, count=blocks).astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            steps = norms / np.float32(self.levels)
            tops = steps * np.float32(self.levels)
        valid = np.isfinite(tops) & (norms >= 0)
        del tops
        if not valid.all():
            block = int(np.argmin(valid))
            raise DecodeError(
                f"{where}: block {block} has norm {norms[block]}; expected a finite norm >= 0 "
                f"whose step norm / {self.levels} times {self.levels} is finite"
            )
        del valid

        packed = np.frombuffer(body, dtype=np.uint8, offset=4 * blocks)
        if not padding_bits_are_zero(packed, count, self.bits):
            raise DecodeError(f"{where}: padding bits after the last {self.bits}-bit code are not zero")
        codes = unpack_codes(packed, count, self.bits)

        negative = codes >= np.uint8(1 << self.level_bits)
        codes &= np.uint8((1 << self.level_bits) - 1)
        if codes.max() > self.levels:
            position = int(np.argmax(codes > self.levels))
            raise DecodeError(
                f"{where}: level {codes[position]} at position {position} exceeds qsgd levels {self.levels}"
            )
        negative_zero = negative & (codes == 0)
        if negative_zero.any():
            position = int(np.argmax(negative_zero))
            raise DecodeError(
                f"{where}: code at position {position} is level 0 with the sign bit set; "
                "zero must be written with the sign bit clear"
            )
        del negative_zero

        values = codes.astype(np.float32)
        del codes
        _scale_blocks(values, steps, self.block_size)
        np.negative(values, out=values, where=negative)
        return values


class ScaledSign:
    """Scaled sign (EF-signSGD, Karimireddy et al. 2019): one bit per value.

    Every value decodes as ``+mu`` or ``-mu``, where ``mu`` is the mean
    magnitude of the coded values, so the decoded tensor has the input's L1
    norm. Zero and positive values get ``+mu``. The error is as large as the
    input's spread around ``mu``, and the code is biased, so clients must use
    error feedback: with it, signSGD converges like SGD (Karimireddy et al.).

    Body layout: nothing for 0 values; otherwise a float32 ``mu``, then one bit
    per value (1 = negative), least significant bit first, zero padding bits.
    """

    name = "sign"
    unbiased = False
    error_feedback_advised = True
    decode_commutes_with_sum = False
    decode_needs_shape = True

    def body_size(self, count: int) -> int:
        """Return the exact body length in bytes for `count` values."""
        return 0 if count == 0 else 4 + packed_size(count, 1)

    def encode(self, values: np.ndarray, rng: np.random.Generator | None, where: str) -> bytes:
        """Write the mean magnitude and the sign bits. `rng` is unused."""
        if values.size == 0:
            return b""

        # A mean is at most the largest magnitude, and the codec rejects
        # non-finite inputs, so the float32 cast of the float64 mean is finite.
        mean = np.float32(np.abs(values).mean(dtype=np.float64))
        signs = np.packbits(values < 0, bitorder="little")
        return mean.astype(_LE_FLOAT32).tobytes() + signs.tobytes()

    def decode(self, body: memoryview, count: int, where: str) -> np.ndarray:
        """Decode `count` values of ``±mu``, checking ``mu`` and the padding bits."""
        _check_size(body, self.body_size(count), f"{where}: {self.name} body for {count} values")
        if count == 0:
            return np.empty(0, dtype=np.float32)

        mean = np.frombuffer(body, dtype=_LE_FLOAT32, count=1).astype(np.float32)[0]
        if not (np.isfinite(mean) and mean >= 0):
            raise DecodeError(f"{where}: {self.name} magnitude is {mean}, expected a finite value >= 0")

        packed = np.frombuffer(body, dtype=np.uint8, offset=4)
        if not padding_bits_are_zero(packed, count, 1):
            raise DecodeError(f"{where}: padding bits after the last sign bit are not zero")

        # Setting the IEEE 754 sign bit of mu directly is about 14 times faster
        # than a masked negation (10M values, numpy 2.4).
        bits = np.unpackbits(packed, count=count, bitorder="little").astype(np.uint32)
        bits <<= np.uint32(31)
        bits |= np.float32(mean).view(np.uint32)
        return bits.view(np.float32)


class Ternary(ScaledSign):
    """Sparse ternary compression (Sattler et al. 2019) of the values a sparsifier kept.

    Each kept value becomes ``+mu`` or ``-mu``, with ``mu`` the mean magnitude
    of the kept values. The entries not kept are 0, so the update is ternary.
    Together with top-k this is STC. The body is the `ScaledSign` body over the
    ``k`` kept values: a float32 ``mu`` and one bit per kept value. It is
    biased, so clients should use error feedback.
    """

    name = "ternary"


class Float16Values:
    """IEEE 754 binary16 values, 2 bytes each, rounded to nearest even.

    The relative error is at most ``2**-11`` for magnitudes from ``6.1e-5`` to
    ``65504``. Below that range the absolute error is at most ``2**-25``, half
    the subnormal spacing, so very small updates lose their digits. Larger
    magnitudes do not fit, and encoding rejects them rather than send infinity.
    """

    name = "fp16"
    unbiased = False
    error_feedback_advised = False
    decode_commutes_with_sum = True
    decode_needs_shape = True

    def body_size(self, count: int) -> int:
        """Return the exact body length in bytes for `count` values."""
        return 2 * count

    def encode(self, values: np.ndarray, rng: np.random.Generator | None, where: str) -> bytes:
        """Cast to float16. `rng` is unused.

        Raises
        ------
        ValueError
            Naming the tensor and the first value beyond the float16 range (±65504).
        """
        with np.errstate(over="ignore"):
            halves = values.astype(_LE_FLOAT16)
        finite = np.isfinite(halves)
        if not finite.all():
            position = int(np.argmin(finite))
            raise ValueError(
                f"{where}: value {values[position]} at position {position} is beyond the float16 "
                "range of ±65504; scale the update down or use bf16"
            )
        return halves.tobytes()

    def decode(self, body: memoryview, count: int, where: str) -> np.ndarray:
        """Read `count` float16 values as float32, rejecting NaN and infinity."""
        _check_size(body, self.body_size(count), f"{where}: fp16 body for {count} values")

        raw = np.frombuffer(body, dtype=_LE_UINT16, count=count)
        _check_finite_16(raw, np.uint16(0x7C00), "float16", where)
        return raw.view(_LE_FLOAT16).astype(np.float32)


class BFloat16Values:
    """bfloat16 values: the top 16 bits of float32, rounded to nearest even.

    bfloat16 keeps float32's exponent range and 8 significant bits, so the
    relative error is at most ``2**-8`` (and the absolute error at most
    ``2**-134`` for subnormal magnitudes, below 1.2e-38). Rounding adds ``0x7FFF`` plus bit 16
    to the float32 bits and keeps the top half, which rounds ties to the even
    result. Values within half a bfloat16 step of the float32 maximum would
    round to infinity and are rejected.
    """

    name = "bf16"
    unbiased = False
    error_feedback_advised = False
    decode_commutes_with_sum = True
    decode_needs_shape = True

    def body_size(self, count: int) -> int:
        """Return the exact body length in bytes for `count` values."""
        return 2 * count

    def encode(self, values: np.ndarray, rng: np.random.Generator | None, where: str) -> bytes:
        """Round to bfloat16. `rng` is unused.

        Raises
        ------
        ValueError
            If a value rounds beyond the bfloat16 range (about ±3.39e38).
        """
        halves = to_bfloat16_bits(values)
        overflow = (halves & np.uint16(0x7F80)) == np.uint16(0x7F80)
        if overflow.any():
            position = int(np.argmax(overflow))
            raise ValueError(
                f"{where}: value {values[position]} at position {position} rounds beyond the "
                "bfloat16 range of about ±3.39e38; scale the update down"
            )
        return halves.astype(_LE_UINT16, copy=False).tobytes()

    def decode(self, body: memoryview, count: int, where: str) -> np.ndarray:
        """Read `count` bfloat16 values as float32, rejecting NaN and infinity."""
        _check_size(body, self.body_size(count), f"{where}: bf16 body for {count} values")

        raw = np.frombuffer(body, dtype=_LE_UINT16, count=count)
        _check_finite_16(raw, np.uint16(0x7F80), "bfloat16", where)
        wide = raw.astype(np.uint32)
        wide <<= np.uint32(16)
        return wide.view(np.float32)


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Return the bfloat16 bits of float32 values, rounded to nearest, ties to even.

    Finite inputs only: a NaN could round to infinity. The sum stays below
    ``2**32`` because the largest finite float32 bit pattern is ``0xFF7FFFFF``.
    """
    bits = np.ascontiguousarray(values, dtype=_LE_FLOAT32).view(_LE_UINT32).astype(np.uint32)
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    bits += np.uint32(0x7FFF)
    bits += odd
    bits >>= np.uint32(16)
    return bits.astype(np.uint16)


def _check_finite_16(raw: np.ndarray, exponent_mask: np.uint16, kind: str, where: str) -> None:
    # All exponent bits set means infinity or NaN in both 16-bit formats.
    special = (raw & exponent_mask) == exponent_mask
    if special.any():
        position = int(np.argmax(special))
        raise DecodeError(
            f"{where}: {kind} value {int(raw[position]):#06x} at position {position} is not finite"
        )


def _scale_blocks(values: np.ndarray, scales: np.ndarray, block_size: int | None) -> None:
    """Multiply each block of `values` in place by its scale; the last block may be short."""
    blocks = scales.size
    if blocks == 1:
        values *= scales[0]
        return

    full = values.size // block_size
    if full:
        grid = values[: full * block_size].reshape(full, block_size)
        grid *= scales[:full, None]
    if full < blocks:
        values[full * block_size :] *= scales[full]


class _IndexedSparsifier:
    """Body coding shared by the sparsifiers that send their kept indices (top-k, threshold).

    Body layout: k (u32), index coding (u8), index byte length (u32), the index
    bytes, then the value stage's body for the k kept values in index order.
    """

    HEADER = struct.Struct("<IBI")
    label = "sparsifier"

    def encode(
        self,
        flat: np.ndarray,
        indices: np.ndarray,
        value_stage: "ValueStage",
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
        self, body: memoryview, numel: int, value_stage: "ValueStage", where: str
    ) -> np.ndarray:
        """Decode the body into a dense flat float32 array of `numel` elements.

        Any ``k <= numel`` is accepted, 0 included, because under model-scope
        top-k and under a threshold the writer chooses k per tensor.
        """
        if len(body) < self.HEADER.size:
            raise DecodeError(
                f"{where}: {self.label} body is {len(body)} bytes, shorter than its "
                f"{self.HEADER.size}-byte header"
            )

        k, coding, index_size = self.HEADER.unpack_from(body, 0)
        if k > numel:
            raise DecodeError(f"{where}: {self.label} k = {k} exceeds the tensor's {numel} elements")

        index_end = self.HEADER.size + index_size
        if index_end > len(body):
            raise DecodeError(
                f"{where}: {self.label} index length {index_size} exceeds the "
                f"{len(body) - self.HEADER.size} bytes left in the body"
            )

        index_bytes = np.frombuffer(body, dtype=np.uint8, count=index_size, offset=self.HEADER.size)
        selection = decode_selection(coding, index_bytes, k, numel, where)
        values = value_stage.decode(body[index_end:], k, f"{where} ({self.label} values)")

        # A bitmap selects through a boolean mask (1 byte per element) and a
        # varint section through int64 indices, at most numel / 8 of them.
        dense = np.zeros(numel, dtype=np.float32)
        dense[selection] = values
        return dense


    def max_body_size(self, numel: int, value_stage: "ValueStage") -> int:
        """Return the longest valid body for `numel` elements: k = numel and a full bitmap.

        A varint section is never longer than the bitmap, so this bounds both codings.
        """
        return self.HEADER.size + bitmap_size(numel) + value_stage.body_size(numel)


class TopK(_IndexedSparsifier):
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
    label = "top-k"
    unbiased = False
    error_feedback_advised = True
    decode_commutes_with_sum = False
    decode_needs_shape = True

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

    def select(self, flat: np.ndarray, seed: int = 0) -> np.ndarray:
        """Return the sorted flat indices of one tensor's k largest magnitudes (tensor scope)."""
        return _largest_magnitudes(np.abs(flat), self.k_for(flat.size), seed)

    def select_update(self, flats: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
        """Return each tensor's sorted kept flat indices, under the stage's scope.

        Parameters
        ----------
        flats : Sequence[np.ndarray]
            The tensors this pipeline governs, as flat float32 arrays in
            payload order. Under model scope they are ranked together.
        seed : int
            Seed of the magnitude sample that speeds up selection over
            `SAMPLED_SELECTION_MIN` or more entries. The kept indices do not
            depend on it.
        """
        if self.scope == "tensor":
            return [self.select(flat, seed) for flat in flats]

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
        kept_positions = _largest_magnitudes(magnitudes, k, seed)

        bounds = np.searchsorted(kept_positions, offsets)
        return [
            kept_positions[bounds[position] : bounds[position + 1]] - offsets[position]
            for position in range(len(flats))
        ]


class Threshold(_IndexedSparsifier):
    """Magnitude threshold: keep the entries with ``|x| >= TAU``.

    The comparison is exact, between the float32 magnitude and the double
    ``TAU`` read from the spec text. The number kept follows the update: a
    tensor whose entries are all small keeps none (k = 0), and one whose
    entries are all large keeps all of them, so the payload size is not fixed
    in advance. Entries not kept decode as 0, which biases the update toward
    zero, so clients should use error feedback. The residual then grows until
    it crosses TAU.

    The body is the top-k body, with the same canonical index coding.

    Parameters
    ----------
    threshold : float
        TAU > 0, in the update's units. A few times the typical magnitude of
        an entry sends a few percent of them.
    """

    name = "thresh"
    label = "threshold"
    unbiased = False
    error_feedback_advised = True
    decode_commutes_with_sum = False
    decode_needs_shape = True

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def select_update(self, flats: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
        """Return each tensor's sorted flat indices with ``|x| >= TAU``. `seed` is unused."""
        # A float64 scalar makes numpy compare in float64, so TAU is not rounded to float32.
        tau = np.float64(self.threshold)
        return [np.flatnonzero(np.abs(flat) >= tau) for flat in flats]


class RandomK:
    """Random-k sparsification: keep k entries of each tensor drawn from a seed.

    Each tensor keeps ``k = max(1, ceil(fraction * numel))`` entries (0 for an
    empty tensor), a uniformly random subset chosen by `random_k_mask` from a
    64-bit seed. The body carries the seed and k instead of the indices, so the
    reader regenerates the subset. Kept values are multiplied by
    ``float32(numel / k)`` before the value coder, which makes the decoded
    update unbiased: every entry is kept with probability ``k / numel``.

    The price is variance: the error's squared norm is ``(numel / k - 1)`` times
    the input's in expectation. That is larger than the input for ``k <
    numel / 2``, so error feedback with random-k does not stay bounded. Rely on
    averaging over clients instead, or use top-k with error feedback.

    Body layout: seed (u64), k (u32), then the value stage's body for the k
    kept values in increasing index order.

    Parameters
    ----------
    fraction : float
        Share of each tensor's entries to keep, in (0, 1].
    """

    name = "randk"
    unbiased = True
    error_feedback_advised = False
    decode_commutes_with_sum = False
    decode_needs_shape = True

    HEADER = struct.Struct("<QI")

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self._exact_fraction = Fraction(repr(fraction))

    def k_for(self, numel: int) -> int:
        """Return how many of a tensor's `numel` entries random-k keeps."""
        if numel == 0:
            return 0
        return min(numel, max(1, math.ceil(self._exact_fraction * numel)))

    def select_update(self, flats: Sequence[np.ndarray], seed: int = 0) -> list[None]:
        """Return one placeholder per tensor: the subset is drawn in `encode` from the tensor's seed."""
        return [None] * len(flats)

    def encode(
        self,
        flat: np.ndarray,
        selection: None,
        value_stage: "ValueStage",
        rng: np.random.Generator,
        where: str,
    ) -> bytes:
        """Draw a seed from `rng`, keep its k entries, scale them and pass them on.

        Raises
        ------
        ValueError
            If scaling by ``numel / k`` takes a value beyond the float32 range.
        """
        numel = flat.size
        k = self.k_for(numel)
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))

        values = flat[random_k_mask(seed, numel, k)]
        if k:
            with np.errstate(over="ignore"):
                values *= np.float32(numel / k)
            if not np.isfinite(values).all():
                raise ValueError(
                    f"{where}: scaling the kept values by numel / k = {numel / k:.6g} "
                    "overflows float32; scale the update down"
                )
        return self.HEADER.pack(seed, k) + value_stage.encode(values, rng, where)

    def decode(self, body: memoryview, numel: int, value_stage: "ValueStage", where: str) -> np.ndarray:
        """Decode a random-k body into a dense flat float32 array of `numel` elements.

        The reader accepts any ``k <= numel``; the work to regenerate the
        subset is then bounded by the expected tensor's size.
        """
        if len(body) < self.HEADER.size:
            raise DecodeError(
                f"{where}: random-k body is {len(body)} bytes, shorter than its "
                f"{self.HEADER.size}-byte header"
            )

        seed, k = self.HEADER.unpack_from(body, 0)
        if k > numel:
            raise DecodeError(f"{where}: random-k k = {k} exceeds the tensor's {numel} elements")

        # The value body's length is checked before the subset is drawn, so a
        # short body costs no work.
        values = value_stage.decode(body[self.HEADER.size :], k, f"{where} (random-k values)")
        try:
            mask = random_k_mask(seed, numel, k)
        except RuntimeError as error:
            raise DecodeError(f"{where}: {error}") from error

        dense = np.zeros(numel, dtype=np.float32)
        dense[mask] = values
        return dense

    def max_body_size(self, numel: int, value_stage: "ValueStage") -> int:
        """Return the longest valid body for `numel` elements, with k = numel."""
        return self.HEADER.size + value_stage.body_size(numel)


# SplitMix64 (Steele, Lea and Flood 2014) constants; the same as java.util.SplittableRandom.
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)

# Draws per numpy step: the result does not depend on it, only memory and speed
# do (about 40 bytes of temporaries per draw).
_DRAW_CHUNK = 1 << 16


def splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """Return SplitMix64 outputs ``start`` to ``start + count - 1`` of the stream for `seed`.

    Output ``j`` mixes ``seed + (j + 1) * 0x9E3779B97F4A7C15`` modulo ``2**64``,
    so any stretch of the stream is computed without the ones before it.
    """
    state = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    state *= _GOLDEN_GAMMA
    state += np.uint64(seed)
    state ^= state >> np.uint64(30)
    state *= _MIX_1
    state ^= state >> np.uint64(27)
    state *= _MIX_2
    state ^= state >> np.uint64(31)
    return state


def random_k_mask(seed: int, numel: int, k: int) -> np.ndarray:
    """Return a boolean mask of `numel` entries with exactly `k` set, drawn from `seed`.

    The algorithm, which docs/wire-format.md specifies for other languages:

    1. ``k = numel`` keeps all entries and ``k = 0`` none. Otherwise draw
       ``d = k`` entries when ``2k <= numel``, else ``d = numel - k`` entries
       to drop.
    2. Candidate ``j`` comes from SplitMix64 output ``z_j`` (`splitmix64`):
       ``r = z_j >> 32`` and ``m = r * numel`` (below ``2**64``). If
       ``m mod 2**32 < 2**32 mod numel`` the candidate is skipped (Lemire's
       rejection, which makes the result exactly uniform); otherwise it is the
       index ``m >> 32``.
    3. The drawn set is the first ``d`` distinct indices of the candidate
       stream, in stream order. A candidate already drawn is skipped.

    Drawing at most half the entries needs about ``numel * ln 2`` candidates at
    worst, so the work is O(numel), and O(k) for small k.

    Raises
    ------
    RuntimeError
        If the stream fails to give `d` distinct indices in ``64 * numel +
        2**16`` candidates, which a valid seed never does.
    """
    if k >= numel:
        return np.ones(numel, dtype=bool)
    if k == 0:
        return np.zeros(numel, dtype=bool)

    drop = 2 * k > numel
    target = numel - k if drop else k
    size = np.uint64(numel)
    reject_below = np.uint64((1 << 32) % numel)
    low_mask = np.uint64(0xFFFFFFFF)
    budget = 64 * numel + _DRAW_CHUNK

    drawn = np.zeros(numel, dtype=bool)
    found = 0
    position = 0
    while found < target:
        if position >= budget:
            raise RuntimeError(
                f"random-k stream gave {found} of {target} distinct indices in {position} draws"
            )
        chunk = min(_DRAW_CHUNK, max(256, 2 * (target - found)))
        products = splitmix64(seed, position, chunk)
        position += chunk

        products >>= np.uint64(32)
        products *= size
        candidates = products[(products & low_mask) >= reject_below] >> np.uint64(32)
        candidates = candidates.astype(np.int64)

        # Keep first occurrences in stream order, then only as many as target.
        fresh = candidates[~drawn[candidates]]
        _, first = np.unique(fresh, return_index=True)
        first.sort()
        fresh = fresh[first[: target - found]]
        drawn[fresh] = True
        found += fresh.size

    if drop:
        np.logical_not(drawn, out=drawn)
    return drawn


class Zstd:
    """zstandard compression of each tensor's body: lossless, last in the pipeline.

    Each record's body is one zstandard frame holding the body that the
    stages before would have written. Compressing per tensor, not the whole
    record section, keeps the names and shapes readable before any
    decompression, lets the reader bound each frame by that tensor's largest
    valid body, and keeps one decompressed body in memory at a time. The cost
    is a frame header (about 10 bytes) per tensor and no matches across tensors.

    Quantized codes with skewed levels (QSGD, top-k index bitmaps, few-bit
    ``q``) compress further; float32 and dense random codes hardly do.

    The frame must declare its content size, use no dictionary, and carry
    nothing after it. The reader rejects a declared size above the tensor's
    largest valid body before decompressing, and a frame whose content exceeds
    its declared size fails while decompressing, so a small frame cannot
    expand into a large allocation.

    Parameters
    ----------
    level : int
        1 to 19. 3 (default) is fast; higher levels gain a few percent on
        quantized bodies at several times the encode time.
    """

    name = "zstd"
    unbiased = True
    error_feedback_advised = False
    decode_commutes_with_sum = False
    decode_needs_shape = True

    def __init__(self, level: int) -> None:
        self.level = level
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def encode(self, body: bytes) -> bytes:
        """Compress one body into a zstandard frame that declares its content size."""
        return self._compressor.compress(body)

    def decode(self, frame: memoryview, limit: int, where: str) -> memoryview:
        """Decompress one frame whose content may be at most `limit` bytes."""
        try:
            parameters = zstandard.get_frame_parameters(frame)
        except zstandard.ZstdError as error:
            raise DecodeError(f"{where}: body is not a zstandard frame: {error}") from error

        size = parameters.content_size
        if size == zstandard.CONTENTSIZE_UNKNOWN:
            raise DecodeError(f"{where}: zstandard frame does not declare its content size")
        if size > limit:
            raise DecodeError(
                f"{where}: zstandard frame declares {size} bytes of content, more than the "
                f"{limit}-byte largest valid body for this tensor"
            )
        if parameters.dict_id != 0:
            raise DecodeError(f"{where}: zstandard frame needs dictionary {parameters.dict_id}; none is defined")

        # A window above the content size gains nothing, and would let a frame
        # make the decoder allocate more than the body's size.
        window_limit = 1 << max(10, (size - 1).bit_length())
        if parameters.window_size > window_limit:
            raise DecodeError(
                f"{where}: zstandard window of {parameters.window_size} bytes exceeds "
                f"{window_limit} for {size} bytes of content"
            )

        decompressor = zstandard.ZstdDecompressor(max_window_size=window_limit)
        try:
            content = decompressor.decompress(frame, max_output_size=limit, allow_extra_data=False)
        except zstandard.ZstdError as error:
            raise DecodeError(f"{where}: zstandard frame is corrupt: {error}") from error
        if len(content) != size:
            raise DecodeError(
                f"{where}: zstandard frame decompressed to {len(content)} bytes, "
                f"expected the declared {size}"
            )
        return memoryview(content)


# Subspace iterations of the low-rank encoder (Halko, Martinsson and Tropp,
# "Finding structure with randomness", SIAM Review 2011, section 4.5). On
# HAR client updates at rank 2, the relative error ||M - P @ Q.T|| / ||M|| of
# the largest layer is 0.43 from one sketch, 0.20 after one iteration and
# 0.17 after two, as low as the truncated SVD, the best possible
# (benchmarks/lowrank_error.py).
SUBSPACE_ITERATIONS = 2


class LowRank:
    """PowerSGD-style low-rank factors (Vogels et al. 2019) of a weight tensor.

    A tensor with ``ndim >= 2`` is seen as the matrix ``M`` of shape
    ``(m, n) = (shape[0], prod(shape[1:]))``. With ``r`` the rank, the encoder
    sketches ``P = M @ G`` for a Gaussian ``G`` (n x r) drawn from the
    tensor's generator, refines it with `SUBSPACE_ITERATIONS` subspace
    iterations ``P = M @ (M.T @ orth(P))``, orthonormalizes ``P`` by a reduced
    QR decomposition, then takes ``Q = M.T @ P``. It sends ``P`` (m x r) and ``Q``
    (n x r); the reader computes ``P @ Q.T``, the projection of ``M`` onto the
    span of ``P``. A matrix of rank at most ``r`` comes back exactly, up to
    float32 rounding, for almost every ``G``.

    Sending both factors costs ``r * (m + n)`` values and needs no generator
    on the reader. A tensor with ``ndim < 2`` is sent densely, and so is one
    where ``r * (m + n) >= m * n``, because there the factors would not be
    smaller; that rule also covers ``r >= min(m, n)`` and empty tensors. A dense
    body is the value coder's body over all ``numel`` values, as if the pipeline
    had no low-rank stage. The reader applies the same rule to the expected shape
    (`factor_shape`), so the body carries no tag.

    Low-rank is biased: what lies outside the rank-r span is dropped every
    round, so clients should use error feedback, on which PowerSGD relies.
    Encoding costs ``2 + 2 * SUBSPACE_ITERATIONS`` products of ``m x n x r``
    and ``1 + SUBSPACE_ITERATIONS`` QRs of ``m x r``, in float64.

    PowerSGD reuses last round's ``Q`` as ``G`` (warm start), so that one
    iteration a round tracks the top singular space over rounds. A phone
    reports once in many rounds, so this stage is stateless: it draws a fresh
    ``G`` each round and iterates within the round instead.

    Body layout: the value coder's body over the ``m * r`` values of ``P``
    (row-major), then the value coder's body over the ``n * r`` values of
    ``Q`` (row-major). Each part's length is fixed by its count.

    Parameters
    ----------
    rank : int
        ``r``, at least 1. Rank 1 to 4 is typical; each step up adds
        ``m + n`` values per matrix and lowers the error per round.
    """

    name = "lowrank"
    unbiased = False
    error_feedback_advised = True
    decode_commutes_with_sum = False
    decode_needs_shape = True

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def factor_shape(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """Return the matrix shape ``(m, n)`` if the tensor is factored, None if it is sent densely."""
        if len(shape) < 2:
            return None
        rows = shape[0]
        columns = math.prod(shape[1:])
        if self.rank * (rows + columns) >= rows * columns:
            return None
        return rows, columns

    def select_update(self, flats: Sequence[np.ndarray], seed: int = 0) -> list[None]:
        """Return one placeholder per tensor: the factors need no selection across tensors."""
        return [None] * len(flats)

    def encode(
        self,
        flat: np.ndarray,
        shape: tuple[int, int],
        value_stage: "ValueStage",
        rng: np.random.Generator,
        where: str,
    ) -> bytes:
        """Factor one tensor, seen as an ``(m, n)`` matrix from `factor_shape`, and code P and Q.

        Raises
        ------
        ValueError
            If the factors or their product overflow float32 (updates near ±1e38).
        """
        rows, columns = shape
        matrix = flat.reshape(rows, columns).astype(np.float64)
        sketch = matrix @ rng.standard_normal((columns, self.rank))
        for _ in range(SUBSPACE_ITERATIONS):
            basis, _ = np.linalg.qr(sketch)
            sketch = matrix @ (matrix.T @ basis)
        left, _ = np.linalg.qr(sketch)
        right = matrix.T @ left
        del matrix, sketch

        with np.errstate(over="ignore", invalid="ignore"):
            left32 = left.astype(np.float32)
            right32 = right.astype(np.float32)
            product_finite = np.isfinite(left32 @ right32.T).all()
        if not (np.isfinite(right32).all() and product_finite):
            raise ValueError(
                f"{where}: low-rank factors overflow float32; scale the update down"
            )
        return value_stage.encode(left32.reshape(-1), rng, f"{where} (low-rank P)") + value_stage.encode(
            right32.reshape(-1), rng, f"{where} (low-rank Q)"
        )

    def body_sizes(self, shape: tuple[int, int], value_stage: "ValueStage") -> tuple[int, int]:
        """Return the exact lengths of the P part and the Q part of the body."""
        rows, columns = shape
        return value_stage.body_size(rows * self.rank), value_stage.body_size(columns * self.rank)

    def decode(
        self, body: memoryview, shape: tuple[int, int], value_stage: "ValueStage", where: str
    ) -> np.ndarray:
        """Decode P and Q and return ``P @ Q.T`` as a flat float32 array of ``m * n`` values.

        Memory: P and Q (fewer values than the tensor, by the factoring rule),
        the float32 product and one boolean per element for the finite check.
        """
        rows, columns = shape
        left_size, right_size = self.body_sizes(shape, value_stage)
        _check_size(
            body,
            left_size + right_size,
            f"{where}: low-rank body for P ({rows} x {self.rank}) and Q ({columns} x {self.rank})",
        )
        left = value_stage.decode(body[:left_size], rows * self.rank, f"{where} (low-rank P)")
        right = value_stage.decode(body[left_size:], columns * self.rank, f"{where} (low-rank Q)")

        # Finite factors can still give an infinite product (1e30 * 1e30).
        with np.errstate(over="ignore", invalid="ignore"):
            product = left.reshape(rows, self.rank) @ right.reshape(columns, self.rank).T
        finite = np.isfinite(product)
        if not finite.all():
            position = int(np.argmin(finite))
            raise DecodeError(
                f"{where}: low-rank product P @ Q.T is not finite at flat position {position}; "
                "the factors are too large"
            )
        return product.reshape(-1)


ValueStage = Float32Values | Quantize | QSGD | ScaledSign | Float16Values | BFloat16Values
Sparsifier = TopK | RandomK | Threshold | LowRank


class Pipeline:
    """The stages of one pipeline, encoding and decoding one tensor's body.

    A spec with per-layer rules has one `Pipeline` for its default and one per
    rule; the codec picks one per tensor with `CompressionSpec.pipeline_for`.

    Parameters
    ----------
    spec : CompressionSpec
        A pipeline without rules (`CompressionSpec.default_pipeline` or a rule's pipeline).
    """

    def __init__(self, spec: CompressionSpec) -> None:
        self.spec = spec
        self.sparsifier, self.value_stage, self.lossless = build_stages(spec)

    @property
    def stages(self) -> tuple["Sparsifier | ValueStage | Zstd", ...]:
        """The stage objects in pipeline order."""
        stages = (self.sparsifier, self.value_stage, self.lossless)
        return tuple(stage for stage in stages if stage is not None)

    def select_update(self, flats: Sequence[np.ndarray], seed: int) -> list | None:
        """Return the sparsifier's per-tensor selections, or None without a sparsifier."""
        if self.sparsifier is None:
            return None
        return self.sparsifier.select_update(flats, seed)

    def encode(
        self,
        flat: np.ndarray,
        shape: tuple[int, ...],
        selection: np.ndarray | None,
        rng: np.random.Generator,
        where: str,
    ) -> bytes:
        """Return one tensor's body, zstd frame included."""
        sparsifier = self.sparsifier
        if isinstance(sparsifier, LowRank):
            matrix_shape = sparsifier.factor_shape(shape)
            if matrix_shape is None:
                body = self.value_stage.encode(flat, rng, where)
            else:
                body = sparsifier.encode(flat, matrix_shape, self.value_stage, rng, where)
        elif sparsifier is None:
            body = self.value_stage.encode(flat, rng, where)
        else:
            body = sparsifier.encode(flat, selection, self.value_stage, rng, where)

        if self.lossless is not None:
            body = self.lossless.encode(body)
        return body

    def decode(self, body: memoryview, shape: tuple[int, ...], where: str) -> np.ndarray:
        """Decode one tensor's body into a flat float32 array of ``prod(shape)`` values."""
        numel = math.prod(shape)
        sparsifier = self.sparsifier
        matrix_shape = sparsifier.factor_shape(shape) if isinstance(sparsifier, LowRank) else None

        # The limit is the longest body the stages accept for this shape, so
        # a frame cannot decompress to more than a valid payload would carry.
        if self.lossless is not None:
            body = self.lossless.decode(body, self.max_body_size(shape), where)

        if matrix_shape is not None:
            return sparsifier.decode(body, matrix_shape, self.value_stage, where)
        if sparsifier is None or isinstance(sparsifier, LowRank):
            return self.value_stage.decode(body, numel, where)
        return sparsifier.decode(body, numel, self.value_stage, where)

    def max_body_size(self, shape: tuple[int, ...]) -> int:
        """Return the longest valid body, before zstd, of a tensor of this shape."""
        if isinstance(self.sparsifier, LowRank):
            matrix_shape = self.sparsifier.factor_shape(shape)
            if matrix_shape is not None:
                return sum(self.sparsifier.body_sizes(matrix_shape, self.value_stage))
            return self.value_stage.body_size(math.prod(shape))
        return max_body_size(self.sparsifier, self.value_stage, math.prod(shape))


def build_stages(spec: CompressionSpec) -> tuple[Sparsifier | None, ValueStage, Zstd | None]:
    """Return the pipeline of a spec as (sparsifier or None, value stage, zstd or None).

    Per-layer rules are not part of one pipeline; see `Pipeline`.
    """
    sparsifier: Sparsifier | None = None
    if spec.lowrank_rank is not None:
        sparsifier = LowRank(spec.lowrank_rank)
    elif spec.topk_fraction is not None:
        sparsifier = TopK(spec.topk_fraction, spec.topk_scope)
    elif spec.randk_fraction is not None:
        sparsifier = RandomK(spec.randk_fraction)
    elif spec.threshold is not None:
        sparsifier = Threshold(spec.threshold)

    value_stage: ValueStage
    if spec.bits is not None:
        value_stage = Quantize(spec.bits, spec.block_size, spec.rounding)
    elif spec.qsgd_levels is not None:
        value_stage = QSGD(spec.qsgd_levels, spec.block_size)
    elif spec.coder is not None:
        value_stage = _SIMPLE_CODERS[spec.coder]()
    else:
        value_stage = Float32Values()

    lossless = None if spec.zstd_level is None else Zstd(spec.zstd_level)
    return sparsifier, value_stage, lossless


def max_body_size(sparsifier: Sparsifier | None, value_stage: ValueStage, numel: int) -> int:
    """Return the longest valid body, before zstd, of a tensor of `numel` elements.

    Not for `LowRank`, whose bound depends on the shape; use `Pipeline.max_body_size`.
    """
    if sparsifier is None:
        return value_stage.body_size(numel)
    return sparsifier.max_body_size(numel, value_stage)


_SIMPLE_CODERS = {
    "sign": ScaledSign,
    "ternary": Ternary,
    "fp16": Float16Values,
    "bf16": BFloat16Values,
}


# Sampled selection (below) runs from this many ranked entries, on a sample of
# this size. Measured on 10M float32 magnitudes (2-core x86 host, numpy 2.4,
# k = 1e4 to 1e6): 8 to 20 ms against 30 to 64 ms for the full partition.
SAMPLED_SELECTION_MIN = 1 << 20
SELECTION_SAMPLE_SIZE = 1 << 16
# Margin in standard deviations above the expected sample count. By a normal
# estimate of the binomial tail, a miss is about a 1e-9 event, and it costs
# one full partition, never a different result.
_SAMPLE_MARGIN_SIGMAS = 6.0


def _largest_magnitudes(magnitudes: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Return the sorted positions of the `k` largest magnitudes, ties to the lower position.

    For `SAMPLED_SELECTION_MIN` or more magnitudes it first estimates a
    threshold below the k-th largest from a random sample drawn with `seed`
    (`_sampled_candidates`), then ranks only the entries at or above it. The
    result is exactly the full ranking's: every entry that could be among the
    k largest is a candidate, candidates keep their order, and when the sample
    misses (fewer than k candidates) the full partition runs instead.
    """
    size = magnitudes.size
    if k == size:
        return np.arange(size, dtype=np.int64)
    if k == 0:
        return np.empty(0, dtype=np.int64)

    if size >= SAMPLED_SELECTION_MIN:
        candidates = _sampled_candidates(magnitudes, k, seed)
        if candidates is not None:
            return candidates[_rank_all(magnitudes[candidates], k)]
    return _rank_all(magnitudes, k)


def _sampled_candidates(magnitudes: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    """Return the sorted positions of all magnitudes at or above a sampled threshold.

    The threshold is the ``(j + 1)``-th largest of `SELECTION_SAMPLE_SIZE`
    magnitudes drawn uniformly with replacement, where ``j`` is the expected
    number of sampled entries among the k largest plus a 6-sigma binomial
    margin. Returns None when the sample cannot separate them (the margin
    reaches the whole sample) or when fewer than k entries pass the threshold.
    """
    size = magnitudes.size
    sample_size = SELECTION_SAMPLE_SIZE
    share = k / size
    margin = _SAMPLE_MARGIN_SIGMAS * math.sqrt(share * (1.0 - share) * sample_size)
    above = max(1, int(share * sample_size + margin) + 1)
    if above >= sample_size:
        return None

    rng = np.random.default_rng([int(seed), size, k])
    sample = magnitudes[rng.integers(0, size, sample_size)]
    threshold = np.partition(sample, sample_size - above - 1)[sample_size - above - 1]
    candidates = np.flatnonzero(magnitudes >= threshold)
    return candidates if candidates.size >= k else None


def _rank_all(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Exact selection by a full partition; 0 < k < magnitudes.size."""
    size = magnitudes.size
    if k >= size:
        return np.arange(size, dtype=np.int64)
    threshold = np.partition(magnitudes, size - k)[size - k]
    keep = magnitudes > threshold
    missing = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(magnitudes == threshold)[:missing]] = True
    return np.flatnonzero(keep)


def _check_size(body: memoryview, expected: int, description: str) -> None:
    if len(body) != expected:
        raise DecodeError(f"{description} is {len(body)} bytes, expected exactly {expected}")
