"""Bit packing of sub-byte quantization codes.

Codes form one little-endian bit stream: code ``i`` occupies stream bits
``i * bits`` to ``(i + 1) * bits - 1``, least significant bit first, and stream
bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Bits after the last code in the
final byte are zero.
"""

import numpy as np

# Eight codes of `bits` bits fill exactly `bits` bytes, so packing works on
# groups of eight codes held in one little-endian uint64.
_GROUP = 8
_LE_UINT64 = np.dtype("<u8")


def packed_size(count: int, bits: int) -> int:
    """Return the number of bytes that `count` codes of `bits` bits occupy."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack uint8 codes, each below ``2**bits``, into the bit stream.

    Parameters
    ----------
    codes : np.ndarray
        1-D uint8 array. Values at or above ``2**bits`` corrupt their neighbours,
        so the caller must clip first.
    bits : int
        Code width, 1 to 8.
    """
    if bits == 8:
        return codes.tobytes()

    count = codes.size
    groups = -(-count // _GROUP)
    padded = np.zeros(groups * _GROUP, dtype=np.uint64)
    padded[:count] = codes
    padded = padded.reshape(groups, _GROUP)

    words = np.zeros(groups, dtype=_LE_UINT64)
    for position in range(_GROUP):
        words |= padded[:, position] << np.uint64(position * bits)

    # The low `bits` bytes of each word hold its eight codes. Padding codes are
    # zero, so cutting the stream at packed_size drops only zero bytes.
    stream = words.view(np.uint8).reshape(groups, _GROUP)[:, :bits]
    return stream.tobytes()[: packed_size(count, bits)]


def unpack_codes(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Unpack `count` codes of `bits` bits from a uint8 array.

    The caller must pass exactly ``packed_size(count, bits)`` bytes.
    """
    if bits == 8:
        return packed[:count].copy()

    groups = -(-count // _GROUP)
    words_bytes = np.zeros((groups, _GROUP), dtype=np.uint8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[: packed.size] = packed
    words_bytes[:, :bits] = flat.reshape(groups, bits)
    words = words_bytes.view(_LE_UINT64).reshape(groups)

    mask = np.uint64((1 << bits) - 1)
    codes = np.empty((groups, _GROUP), dtype=np.uint8)
    for position in range(_GROUP):
        codes[:, position] = (words >> np.uint64(position * bits)) & mask
    return codes.reshape(-1)[:count]


def padding_bits_are_zero(packed: np.ndarray, count: int, bits: int) -> bool:
    """Return whether the unused high bits of the final byte are all zero."""
    used = (count * bits) % 8
    if used == 0 or packed.size == 0:
        return True
    return int(packed[-1]) >> used == 0
