"""Framing of one client's update: header, tensor records and CRC32.

Layout (all integers little-endian, see docs/wire-format.md for the tables):

    magic "PFLU" | version u8 | spec length u16 | spec utf-8 | tensor count u32
    per tensor: name length u16 | name utf-8 | ndim u8 | ndim x dim u32
                | dtype u8 | body length u32 | body
    CRC32 u32 of every byte before it

This module checks the frame against the expected names and shapes. The
stage bodies are checked by the stages.
"""

import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .errors import DecodeError

MAGIC = b"PFLU"
FORMAT_VERSION = 1

DTYPE_FLOAT32 = 1
DTYPE_NAMES = {DTYPE_FLOAT32: "float32"}

MAX_U16 = 2**16 - 1
MAX_U32 = 2**32 - 1
MAX_NDIM = 255

_PREFIX = struct.Struct("<4sBH")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CRC_SIZE = 4

# Magic, version, spec length, tensor count and CRC of an empty update.
MIN_PAYLOAD_SIZE = _PREFIX.size + _U32.size + _CRC_SIZE


@dataclass(frozen=True)
class TensorRecord:
    """One tensor's entry in the payload: identity plus its stage-encoded body."""

    name: str
    shape: tuple[int, ...]
    dtype: int
    body: bytes | memoryview


def write_payload(spec_text: str, records: list[TensorRecord]) -> bytes:
    """Frame the records under the spec text and append the CRC32.

    The caller has checked that names, shapes and bodies fit their length fields.
    """
    spec_bytes = spec_text.encode("utf-8")
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(spec_bytes)), spec_bytes]
    parts.append(_U32.pack(len(records)))

    for record in records:
        name_bytes = record.name.encode("utf-8")
        parts.append(_U16.pack(len(name_bytes)))
        parts.append(name_bytes)
        parts.append(_U8.pack(len(record.shape)))
        parts.append(struct.pack(f"<{len(record.shape)}I", *record.shape))
        parts.append(_U8.pack(record.dtype))
        parts.append(_U32.pack(len(record.body)))
        parts.append(record.body)

    framed = b"".join(parts)
    return framed + _U32.pack(zlib.crc32(framed))


class PayloadReader:
    """Bounds-checked reads over one payload.

    `read_header` checks size, magic, version and CRC and returns the spec text.
    `read_records` then yields each tensor record after checking its name, shape,
    dtype and body length against the expected shapes and the bytes present.
    Nothing is allocated beyond the sizes that the expected shapes allow.
    """

    def __init__(self, payload: bytes | bytearray | memoryview) -> None:
        try:
            self._view = memoryview(payload).cast("B")
        except TypeError as error:
            raise DecodeError(
                f"payload must be bytes, bytearray or a contiguous memoryview, "
                f"got {type(payload).__name__}"
            ) from error

        # Records end where the CRC starts.
        self._end = max(len(self._view) - _CRC_SIZE, 0)
        self._offset = 0

    def read_header(self) -> str:
        """Check size, magic, version and CRC, and return the pipeline spec text."""
        size = len(self._view)
        if size < MIN_PAYLOAD_SIZE:
            raise DecodeError(
                f"payload is truncated: {size} bytes, the smallest valid payload has "
                f"{MIN_PAYLOAD_SIZE}"
            )

        magic, version, spec_size = _PREFIX.unpack_from(self._view, 0)
        if magic != MAGIC:
            raise DecodeError(
                f"bad magic {bytes(magic)!r}, expected {MAGIC!r}; this is not a pocketfl update"
            )
        if version != FORMAT_VERSION:
            raise DecodeError(
                f"unsupported format version {version}, this reader supports version {FORMAT_VERSION}"
            )

        (stored_crc,) = _U32.unpack_from(self._view, self._end)
        computed_crc = zlib.crc32(self._view[: self._end])
        if stored_crc != computed_crc:
            raise DecodeError(
                f"CRC32 mismatch: payload stores {stored_crc:#010x}, its bytes give "
                f"{computed_crc:#010x}; the payload is corrupted"
            )

        self._offset = _PREFIX.size
        spec_bytes = self._take(spec_size, "pipeline spec")
        return _decode_utf8(spec_bytes, "pipeline spec")

    def read_records(self, expected_shapes: Mapping[str, tuple[int, ...]]) -> Iterator[TensorRecord]:
        """Yield each tensor record, checked against `expected_shapes`.

        Raises
        ------
        DecodeError
            On a wrong tensor count, an unexpected or repeated name, a shape or
            dtype mismatch, a length past the end, or bytes after the last record.
        """
        count = self._unpack(_U32, "tensor count")
        if count != len(expected_shapes):
            raise DecodeError(f"tensor count is {count}, expected {len(expected_shapes)}")

        seen: set[str] = set()
        for position in range(count):
            yield self._read_record(position, expected_shapes, seen)

        trailing = self._end - self._offset
        if trailing:
            raise DecodeError(f"{trailing} trailing bytes after the last tensor record")

    def _read_record(
        self, position: int, expected_shapes: Mapping[str, tuple[int, ...]], seen: set[str]
    ) -> TensorRecord:
        where = f"tensor record {position}"
        name_size = self._unpack(_U16, f"{where} name length")
        name = _decode_utf8(self._take(name_size, f"{where} name"), f"{where} name")

        if name not in expected_shapes:
            expected = ", ".join(repr(key) for key in expected_shapes)
            raise DecodeError(f"{where}: unexpected tensor name {name!r}; expected one of {expected}")
        if name in seen:
            raise DecodeError(f"{where}: tensor {name!r} appears more than once")
        seen.add(name)

        where = f"tensor {name!r}"
        expected_shape = tuple(expected_shapes[name])
        ndim = self._unpack(_U8, f"{where} ndim")
        if ndim != len(expected_shape):
            raise DecodeError(
                f"{where}: ndim is {ndim}, expected {len(expected_shape)} for shape {expected_shape}"
            )

        dims = self._take(4 * ndim, f"{where} shape")
        shape = struct.unpack(f"<{ndim}I", dims)
        if shape != expected_shape:
            raise DecodeError(f"{where}: shape is {shape}, expected {expected_shape}")

        dtype = self._unpack(_U8, f"{where} dtype code")
        if dtype not in DTYPE_NAMES:
            known = ", ".join(f"{code} ({label})" for code, label in DTYPE_NAMES.items())
            raise DecodeError(f"{where}: unknown dtype code {dtype}; known codes: {known}")

        body_size = self._unpack(_U32, f"{where} body length")
        body = self._take(body_size, f"{where} body")
        return TensorRecord(name, shape, dtype, body)

    def _unpack(self, field_struct: struct.Struct, field: str) -> int:
        raw = self._take(field_struct.size, field)
        return field_struct.unpack(raw)[0]

    def _take(self, size: int, field: str) -> memoryview:
        left = self._end - self._offset
        if size > left:
            raise DecodeError(
                f"payload is truncated: {field} needs {size} bytes at offset {self._offset}, "
                f"only {left} bytes are left before the CRC"
            )

        start = self._offset
        self._offset += size
        return self._view[start : self._offset]


def _decode_utf8(raw: memoryview, field: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise DecodeError(f"{field} is not valid UTF-8: {error.reason} at byte {error.start}") from error
