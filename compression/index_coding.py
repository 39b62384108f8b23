"""Coding of the sorted flat indices that top-k keeps.

Two codings exist, and the writer sends whichever is shorter (delta varint on a tie):

- delta varint: the first index, then each difference to the previous index,
  as unsigned LEB128 varints (7 bits per byte, low group first, high bit set on
  every byte but the last). Short when few indices are kept.
- bitmap: one bit per element of the tensor, little-endian bit order, set where
  the element is kept. Short when more than about one in eight is kept.

Readers hold the writer to its choice in one direction: a delta varint section
longer than the bitmap for the same tensor is rejected (a tie is accepted). This
caps the varint section at numel / 8 bytes, and so the decoder's memory for it.
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

    Returns the indices as a sorted int64 array. `decode_selection` returns the
    same selection with less memory for a bitmap.

    Raises
    ------
    DecodeError
        If the coding id is unknown, the byte length is wrong for the coding, or
        the indices are out of range or not strictly increasing.
    """
    selection = decode_selection(coding, data, count, numel, where)
    if selection.dtype == bool:
        return np.flatnonzero(selection)
    return selection


def decode_selection(
    coding: int, data: np.ndarray, count: int, numel: int, where: str
) -> np.ndarray:
    """Decode the kept elements as an array that indexes a flat tensor of `numel` elements.

    A bitmap decodes to a boolean mask of `numel` entries (1 byte per element,
    where int64 indices would take up to 8). A delta varint section decodes to
    sorted int64 indices. Either one, used as ``dense[selection] = values``,
    assigns the values in increasing index order.

    Raises
    ------
    DecodeError
        As `decode_indices`.
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

    mask = bits[:numel].view(bool)
    marked = int(np.count_nonzero(mask))
    if marked != count:
        raise DecodeError(f"{where}: bitmap marks {marked} elements, expected k = {count}")
    return mask


def _decode_delta_varint(data: np.ndarray, count: int, numel: int, where: str) -> np.ndarray:
    # The writer sends a varint section only when it is no longer than the
    # bitmap, so a longer one is not canonical. Rejecting it first bounds every
    # array below by the bitmap size, numel / 8 bytes, whatever k claims.
    limit = bitmap_size(numel)
    if data.size > limit:
        raise DecodeError(
            f"{where}: delta varint index length is {data.size} bytes, longer than the "
            f"{limit}-byte bitmap for {numel} elements; a writer must send the bitmap"
        )

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

    # Byte positions are below 2**32 because the index length is a u32, so
    # uint32 halves the k-sized arrays. The first varint starts at byte 0.
    ends = ends.astype(np.uint32)
    lengths = np.empty(count, dtype=np.uint32)
    lengths[0] = ends[0] + 1
    np.subtract(ends[1:], ends[:-1], out=lengths[1:])
    if lengths.max() > MAX_VARINT_BYTES:
        position = int(np.argmax(lengths))
        raise DecodeError(
            f"{where}: varint {position} is {lengths[position]} bytes long, "
            f"the maximum is {MAX_VARINT_BYTES}"
        )
    lengths = lengths.astype(np.uint8)

    # A multi-byte varint ending in 0x00 is an over-long form, and rejecting it
    # keeps one byte sequence per index list.
    last_bytes = data[ends]
    overlong = (lengths > 1) & (last_bytes == 0)
    if overlong.any():
        position = int(np.argmax(overlong))
        raise DecodeError(f"{where}: varint {position} uses an over-long encoding")

    # The fifth byte carries bits 28 and up, so a value of 16 or more there
    # means a difference of at least 2**32, beyond any numel. Checking it first
    # lets the differences be summed in uint32 without overflow.
    too_wide = (lengths == MAX_VARINT_BYTES) & (last_bytes >= 16)
    if too_wide.any():
        position = int(np.argmax(too_wide))
        raise DecodeError(
            f"{where}: index difference at position {position} is at least 2**32, "
            f"out of range for {numel} elements"
        )

    # Horner's rule from the last (most significant) byte of each varint down
    # to its first, one byte position at a time: a handful of k-sized uint32
    # arrays instead of several uint64 arrays per index byte.
    deltas = last_bytes.astype(np.uint32)
    del last_bytes, overlong, too_wide
    for back in range(1, MAX_VARINT_BYTES):
        longer = np.flatnonzero(lengths > back)
        if longer.size == 0:
            break
        low = data[ends[longer] - back] & np.uint8(0x7F)
        deltas[longer] = (deltas[longer] << np.uint32(7)) | low

    # Bounding each difference first keeps the running sum far from uint64
    # overflow: k and numel are both below 2**32.
    if deltas.max() >= numel:
        position = int(np.argmax(deltas))
        raise DecodeError(
            f"{where}: index difference {int(deltas[position])} at position {position} "
            f"is out of range for {numel} elements"
        )

    repeated = np.flatnonzero(deltas[1:] == 0)
    if repeated.size:
        position = int(repeated[0]) + 1
        index = int(deltas[: position + 1].sum(dtype=np.uint64))
        raise DecodeError(
            f"{where}: index {index} at position {position} is not greater "
            "than the previous index; indices must be strictly increasing"
        )

    # Every sum stays below k * numel < 2**64, and below 2**63 once the last
    # index is checked, so the uint64 result is reinterpreted as int64 without a copy.
    indices = np.cumsum(deltas, dtype=np.uint64)
    del deltas
    if indices[-1] >= numel:
        raise DecodeError(
            f"{where}: index {int(indices[-1])} at position {count - 1} is out of range "
            f"for {numel} elements"
        )
    return indices.view(np.int64)
