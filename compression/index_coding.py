"""Coding of the sorted flat indices that top-k keeps.

Two codings exist, and the writer sends whichever is shorter (delta varint on a tie):

- delta varint: the first index, then each difference to the previous index,
  as unsigned LEB128 varints (7 bits per byte, low group first, high bit set on
  every byte but the last). Short when few indices are kept.
- bitmap: one bit per element of the tensor, little-endian bit order, set where
  the element is kept. Short when more than about one in eight is kept.
"""

import numpy as np

from .errors import DecodeError

DELTA_VARINT = 0
BITMAP = 1
INDEX_CODING_NAMES = {DELTA_VARINT: "delta varint", BITMAP: "bitmap"}

# Indices are below 2**32, so a varint of a difference never needs more than
# five 7-bit groups.
MAX_VARINT_BYTES = 5
_VARINT_LIMITS = np.array([1 << 7, 1 << 14, 1 << 21, 1 << 28], dtype=np.uint64)


def bitmap_size(numel: int) -> int:
    """Return the bitmap length in bytes for a tensor of `numel` elements."""
    return (numel + 7) // 8


def encode_indices(indices: np.ndarray, numel: int) -> tuple[int, bytes]:
    """Code strictly increasing flat indices in the shorter of the two codings.

    Returns
    -------
    tuple[int, bytes]
        The coding id (`DELTA_VARINT` or `BITMAP`) and the coded bytes.
    """
    varint = encode_delta_varint(indices)
    if len(varint) <= bitmap_size(numel):
        return DELTA_VARINT, varint

    mask = np.zeros(numel, dtype=bool)
    mask[indices] = True
    return BITMAP, np.packbits(mask, bitorder="little").tobytes()


def encode_delta_varint(indices: np.ndarray) -> bytes:
    """Code strictly increasing indices as LEB128 varints of their differences."""
    if indices.size == 0:
        return b""

    deltas = np.diff(indices.astype(np.uint64), prepend=np.uint64(0))

    # Byte count per varint: one, plus one for each 7-bit boundary passed.
    lengths = 1 + (deltas[:, None] >= _VARINT_LIMITS).sum(axis=1)
    starts = np.cumsum(lengths) - lengths
    total = int(lengths.sum())

    # Byte b of a varint carries bits 7b..7b+6 of its value.
    owner = np.repeat(np.arange(deltas.size), lengths)
    group = np.arange(total) - starts[owner]
    payload = (deltas[owner] >> (np.uint64(7) * group.astype(np.uint64))) & np.uint64(0x7F)

    continues = group < (lengths[owner] - 1)
    coded = payload.astype(np.uint8) | (continues.astype(np.uint8) << 7)
    return coded.tobytes()


def decode_indices(
    coding: int, data: np.ndarray, count: int, numel: int, where: str
) -> np.ndarray:
    """Decode `count` kept indices and check them against a tensor of `numel` elements.

    Raises
    ------
    DecodeError
        If the coding id is unknown, the byte length is wrong for the coding, or
        the indices are out of range or not strictly increasing.
    """
    if coding == BITMAP:
        return _decode_bitmap(data, count, numel, where)
    if coding == DELTA_VARINT:
        return _decode_delta_varint(data, count, numel, where)

    known = ", ".join(f"{code} ({name})" for code, name in INDEX_CODING_NAMES.items())
    raise DecodeError(f"{where}: unknown index coding {coding}; expected one of {known}")


def _decode_bitmap(data: np.ndarray, count: int, numel: int, where: str) -> np.ndarray:
    expected_size = bitmap_size(numel)
    if data.size != expected_size:
        raise DecodeError(
            f"{where}: bitmap index length is {data.size} bytes, expected {expected_size} "
            f"for {numel} elements"
        )

    bits = np.unpackbits(data, bitorder="little")
    if bits[numel:].any():
        raise DecodeError(f"{where}: bitmap has bits set past element {numel - 1}")

    indices = np.flatnonzero(bits[:numel])
    if indices.size != count:
        raise DecodeError(f"{where}: bitmap marks {indices.size} elements, expected k = {count}")
    return indices


def _decode_delta_varint(data: np.ndarray, count: int, numel: int, where: str) -> np.ndarray:
    if count == 0:
        if data.size != 0:
            raise DecodeError(
                f"{where}: delta varint index length is {data.size} bytes, expected 0 for k = 0"
            )
        return np.empty(0, dtype=np.int64)

    if not count <= data.size <= MAX_VARINT_BYTES * count:
        raise DecodeError(
            f"{where}: delta varint index length is {data.size} bytes, expected "
            f"{count} to {MAX_VARINT_BYTES * count} for k = {count}"
        )

    # A byte below 0x80 ends a varint, so there must be exactly k of them and
    # the last byte must be one.
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count or ends[-1] != data.size - 1:
        raise DecodeError(
            f"{where}: delta varint index bytes hold {ends.size} complete varints "
            f"(last ends at byte {ends[-1] if ends.size else -1} of {data.size}), expected k = {count}"
        )

    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        position = int(np.argmax(lengths))
        raise DecodeError(
            f"{where}: varint {position} is {lengths[position]} bytes long, "
            f"the maximum is {MAX_VARINT_BYTES}"
        )

    # A multi-byte varint ending in 0x00 is an over-long form, and rejecting it
    # keeps one byte sequence per index list.
    overlong = (lengths > 1) & (data[ends] == 0)
    if overlong.any():
        position = int(np.argmax(overlong))
        raise DecodeError(f"{where}: varint {position} uses an over-long encoding")

    group = np.arange(data.size) - np.repeat(starts, lengths)
    parts = (data & 0x7F).astype(np.uint64) << (np.uint64(7) * group.astype(np.uint64))
    deltas = np.add.reduceat(parts, starts)

    # Bounding each difference first keeps the running sum far from uint64
    # overflow: k and numel are both below 2**32.
    if deltas.max() >= numel:
        position = int(np.argmax(deltas))
        raise DecodeError(
            f"{where}: index difference {int(deltas[position])} at position {position} "
            f"is out of range for {numel} elements"
        )

    indices = np.cumsum(deltas)

    repeated = np.flatnonzero(deltas[1:] == 0)
    if repeated.size:
        position = int(repeated[0]) + 1
        raise DecodeError(
            f"{where}: index {int(indices[position])} at position {position} is not greater "
            "than the previous index; indices must be strictly increasing"
        )

    if indices[-1] >= numel:
        raise DecodeError(
            f"{where}: index {int(indices[-1])} at position {count - 1} is out of range "
            f"for {numel} elements"
        )
    return indices.astype(np.int64)
