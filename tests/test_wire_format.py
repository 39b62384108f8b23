"""Wire format: the documented example, and rejection of every malformed payload."""

import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketfl.compression import DecodeError, UpdateCodec, decode_update

DOCS = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"


# --- an independent writer, built from the documented layout -------------------


def frame(spec, records, *, magic=b"PFLU", version=1, count=None, trailing=b""):
    """Build a payload from (name, shape, dtype, body) records, CRC included."""
    spec_bytes = spec.encode() if isinstance(spec, str) else spec
    parts = [magic, struct.pack("<BH", version, len(spec_bytes)), spec_bytes]
    parts.append(struct.pack("<I", len(records) if count is None else count))

    for name, shape, dtype, body in records:
        name_bytes = name.encode() if isinstance(name, str) else name
        parts.append(struct.pack("<H", len(name_bytes)) + name_bytes)
        parts.append(struct.pack(f"<B{len(shape)}I", len(shape), *shape))
        parts.append(struct.pack("<BI", dtype, len(body)) + body)

    framed = b"".join(parts) + trailing
    return with_crc(framed)


def with_crc(framed):
    return framed + struct.pack("<I", zlib.crc32(framed))


def refresh_crc(payload):
    return with_crc(payload[:-4])


def float32_body(values):
    return np.asarray(values, dtype="<f4").tobytes()


def q_body(blocks, codes_bytes):
    """Build a quantized body from (min, scale) pairs and packed code bytes."""
    return b"".join(struct.pack("<ff", low, scale) for low, scale in blocks) + codes_bytes


def topk_body(k, coding, index_bytes, values_body):
    return struct.pack("<IBI", k, coding, len(index_bytes)) + index_bytes + values_body


SHAPES = {"w": (2, 3), "b": (3,)}
W = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def valid_none_payload():
    return frame("none", [("w", (2, 3), 1, float32_body(W)), ("b", (3,), 1, float32_body(B))])


# --- the documented example -----------------------------------------------------


def documented_example_bytes():
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(r"```hex\n(.*?)```", text, re.DOTALL)
    assert block, "docs/wire-format.md must contain a ```hex block"
    return bytes.fromhex(block.group(1))


def test_docs_worked_example_matches_encoder():
    update = {
        "w": np.array([[0.25, -2.0], [0.0, 1.0]], dtype=np.float32),
        "b": np.array(5.0, dtype=np.float32),
    }
    expected = documented_example_bytes()

    for seed in (0, 1, 99):
        assert UpdateCodec("topk:0.5,q:2").encode(update, seed) == expected

    decoded = decode_update(expected, {"w": (2, 2), "b": ()})
    np.testing.assert_array_equal(decoded["w"], [[0.0, -2.0], [0.0, 1.0]])
    assert decoded["b"] == np.float32(5.0)

    # Tensor scope keeps the same entries here, so only the spec text differs.
    tensor_scope = UpdateCodec("topk:0.5:tensor,q:2").encode(update, 0)
    spec_end = 7 + len("topk:0.5,q:2")
    assert tensor_scope[7 : spec_end + 7] == b"topk:0.5:tensor,q:2"
    assert tensor_scope[spec_end + 7 : -4] == expected[spec_end:-4]


def test_docs_worked_example_matches_independent_writer():
    w_body = topk_body(2, 1, bytes([0b1010]), q_body([(-2.0, 1.0)], bytes([0x0C])))
    b_body = topk_body(1, 0, bytes([0x00]), q_body([(5.0, 0.0)], bytes([0x00])))

    payload = frame("topk:0.5,q:2", [("w", (2, 2), 1, w_body), ("b", (), 1, b_body)])

    assert payload == documented_example_bytes()
    assert len(payload) == 91


def test_independent_writer_matches_encoder():
    assert UpdateCodec("none").encode({"w": W, "b": B}, 0) == valid_none_payload()
    assert decode_update(valid_none_payload(), SHAPES)["b"].tolist() == B.tolist()


# --- malformed payloads, one class per case -------------------------------------


def varint_bytes(*values):
    out = bytearray()
    for value in values:
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


W_NONE = ("w", (2, 3), 1, float32_body(W))
B_NONE = ("b", (3,), 1, float32_body(B))
Q8_CODES = bytes([0, 1, 2])
Q8_SPEC = "q:8"
B_Q8_GOOD = ("b", (3,), 1, q_body([(0.0, 1.0)], Q8_CODES))
W_Q8_GOOD = ("w", (2, 3), 1, q_body([(0.0, 1.0)], bytes(6)))
TOPK_SPEC = "topk:0.5"
B_TOPK_GOOD = ("b", (3,), 1, topk_body(1, 0, varint_bytes(2), float32_body([2.0])))

# Top-k cases use a 63-element `w`: its 8-byte bitmap leaves room for varint
# sections up to 8 bytes (a varint section longer than the bitmap is rejected
# as non-canonical), and its last bitmap byte has one padding bit.
TOPK_W_SHAPE = (7, 9)
TOPK_SHAPES = {"w": TOPK_W_SHAPE, "b": (3,)}
W_TOPK_GOOD = ("w", TOPK_W_SHAPE, 1, topk_body(3, 0, varint_bytes(0, 2, 2), float32_body([1, 2, 3])))


def topk_payload(w_body):
    return frame(TOPK_SPEC, [("w", TOPK_W_SHAPE, 1, w_body), B_TOPK_GOOD])


def q_payload(b_body, spec=Q8_SPEC, w_body=W_Q8_GOOD[3]):
    return frame(spec, [("w", (2, 3), 1, w_body), ("b", (3,), 1, b_body)])


def qsgd_body(norm, codes, padding=0):
    """A qsgd:3 or qsgd:2 body (3-bit codes) of one norm and the given codes."""
    stream = sum(code << (3 * position) for position, code in enumerate(codes))
    packed = stream.to_bytes((3 * len(codes) + 7) // 8, "little")
    packed = packed[:-1] + bytes([packed[-1] | padding])
    return struct.pack("<f", norm) + packed


def sign_body(magnitude, bits):
    return struct.pack("<fB", magnitude, bits)


def randk_body(seed, k, values_body):
    return struct.pack("<QI", seed, k) + values_body


def zstd_frame(body, content_size=True):
    return zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(body)


def lying_zstd_frame(body):
    """A frame whose header declares one byte less content than it holds."""
    frame = bytearray(zstd_frame(body))
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == len(body)
    # Single-segment frame with a 1-byte content size field right after the descriptor.
    assert frame[4] & 0xC0 == 0
    assert frame[4] & 0x20
    frame[5] -= 1
    return bytes(frame)


# Magic, a descriptor with an 8-byte content size field and the single-segment
# flag, then 2**40 as the content size: the header of a bomb, no blocks.
ZSTD_BOMB_HEADER = bytes.fromhex("28b52ffd") + bytes([0xE0]) + struct.pack("<Q", 2**40) + bytes([1, 0, 0])


def zstd_payload(b_body):
    return frame("zstd", [("w", (2, 3), 1, zstd_frame(float32_body(W))), ("b", (3,), 1, b_body)])


# Valid `w` bodies (6 values) for the stages above; each case breaks only `b`.
W_QSGD = qsgd_body(1.0, [0] * 6)
W_QSGD2 = qsgd_body(1.0, [0] * 6)
W_SIGN = sign_body(1.0, 0)
W_RANDK = randk_body(0, 3, float32_body([1, 2, 3]))
W_THRESH = topk_body(0, 0, b"", b"")
W_TERNARY = ("w", (2, 3), 1, topk_body(1, 0, varint_bytes(0), sign_body(1.0, 0)))


MALFORMED = {
    # Framing.
    "empty payload": (b"", "truncated"),
    "shorter than header": (b"PFLU\x01", "truncated"),
    "truncated without CRC": (valid_none_payload()[:-9], "CRC32"),
    "truncated with CRC": (with_crc(valid_none_payload()[:-9]), "truncated"),
    "trailing bytes before CRC": (frame("none", [W_NONE, B_NONE], trailing=b"\x00\x00"), "trailing"),
    "trailing bytes after CRC": (valid_none_payload() + b"\x00", "CRC32"),
    "bad magic": (with_crc(b"XFLU" + valid_none_payload()[4:-4]), "magic"),
    "wrong version": (frame("none", [W_NONE, B_NONE], version=2), "version 2"),
    "version zero": (frame("none", [W_NONE, B_NONE], version=0), "version 0"),
    "bad CRC": (valid_none_payload()[:-1] + bytes([valid_none_payload()[-1] ^ 1]), "CRC32"),
    "flipped body byte": (
        valid_none_payload()[:40] + bytes([valid_none_payload()[40] ^ 0x10]) + valid_none_payload()[41:],
        "CRC32",
    ),
    # Oversized declared lengths.
    "spec length past end": (with_crc(b"PFLU\x01\xff\xff" + b"none" + bytes(4)), "pipeline spec"),
    "name length past end": (
        with_crc(frame("none", [])[:-8] + struct.pack("<IH", 2, 0xFFFF) + b"w"),
        "name needs 65535 bytes",
    ),
    "body length past end": (
        with_crc(frame("none", [W_NONE, B_NONE])[:-4 - 12 - 4] + struct.pack("<I", 0xFFFFFFFF) + float32_body(B)),
        "body",
    ),
    "shape past end": (
        with_crc(frame("none", [])[:-8] + struct.pack("<IH", 2, 1) + b"w\x02" + bytes(4)),
        "'w' shape needs 8 bytes",
    ),
    # Corrupted fields.
    "invalid spec text": (frame("q:9", [W_Q8_GOOD, B_Q8_GOOD]), "bits 9"),
    "unknown stage": (frame("lz4:3", [W_NONE, B_NONE]), "unknown stage 'lz4'"),
    "spec not UTF-8": (frame(b"\xff\xfe", [W_NONE, B_NONE]), "UTF-8"),
    "name not UTF-8": (frame("none", [(b"\xc3\x28", (2, 3), 1, float32_body(W)), B_NONE]), "UTF-8"),
    "unknown dtype code": (frame("none", [("w", (2, 3), 7, float32_body(W)), B_NONE]), "dtype code 7"),
    "dtype code zero": (frame("none", [("w", (2, 3), 0, float32_body(W)), B_NONE]), "dtype code 0"),
    # Names and shapes.
    "tensor count too high": (frame("none", [W_NONE, B_NONE], count=3), "tensor count is 3, expected 2"),
    "tensor count huge": (frame("none", [W_NONE, B_NONE], count=0xFFFFFFFF), "tensor count"),
    "missing tensor": (frame("none", [W_NONE]), "tensor count is 1"),
    "unexpected name": (frame("none", [W_NONE, ("bias", (3,), 1, float32_body(B))]), "'bias'"),
    "repeated name": (frame("none", [W_NONE, W_NONE]), "more than once"),
    "wrong ndim": (frame("none", [("w", (6,), 1, float32_body(W)), B_NONE]), "ndim is 1, expected 2"),
    "wrong shape": (
        frame("none", [("w", (3, 2), 1, float32_body(W)), B_NONE]),
        "shape is (3, 2), expected (2, 3)",
    ),
    # float32 bodies.
    "float32 body too long": (
        frame("none", [("w", (2, 3), 1, float32_body(W) + b"\x00"), B_NONE]),
        "float32 body for 6 values is 25 bytes",
    ),
    "float32 body too short": (
        frame("none", [("w", (2, 3), 1, float32_body(W)[:-4]), B_NONE]),
        "expected exactly 24",
    ),
    "float32 NaN value": (
        frame("none", [W_NONE, ("b", (3,), 1, float32_body([0, np.nan, 1]))]),
        "not finite",
    ),
    "float32 infinite value": (
        frame("none", [W_NONE, ("b", (3,), 1, float32_body([np.inf, 0, 1]))]),
        "not finite",
    ),
    # Quantized bodies.
    "q body too short": (q_payload(q_body([(0.0, 1.0)], Q8_CODES[:2])), "expected exactly 11"),
    "q body too long": (q_payload(q_body([(0.0, 1.0)], Q8_CODES + b"\x00")), "expected exactly 11"),
    "q NaN min": (q_payload(q_body([(np.nan, 1.0)], Q8_CODES)), "min nan"),
    "q infinite scale": (q_payload(q_body([(0.0, np.inf)], Q8_CODES)), "scale inf"),
    "q NaN scale": (q_payload(q_body([(0.0, np.nan)], Q8_CODES)), "scale nan"),
    "q negative scale": (q_payload(q_body([(0.0, -1.0)], Q8_CODES)), "scale -1.0"),
    "q top level overflows": (q_payload(q_body([(3e38, 3e38)], Q8_CODES)), "top level"),
    "q padding bits set": (
        q_payload(q_body([(0.0, 1.0)], bytes([0b00_10_01_00 | 0xC0])), "q:2", q_body([(0.0, 1.0)], bytes(2))),
        "padding bits",
    ),
    "q block count wrong": (
        q_payload(q_body([(0.0, 1.0)], bytes([0, 1, 2])), "q:8:2", q_body([(0.0, 1.0)] * 3, bytes(6))),
        "is 11 bytes, expected exactly 19",
    ),
    # Top-k bodies.
    "topk body shorter than header": (topk_payload(b"\x01\x00"), "header"),
    "topk k above numel": (
        topk_payload(topk_body(64, 0, varint_bytes(0, *[1] * 63), float32_body(range(64)))),
        "k = 64 exceeds",
    ),
    "topk index length past end": (
        topk_payload(struct.pack("<IBI", 1, 0, 1000) + b"\x00" + float32_body([1])),
        "index length 1000",
    ),
    "topk unknown index coding": (
        topk_payload(topk_body(1, 9, b"\x00", float32_body([1]))),
        "unknown index coding 9",
    ),
    "topk index out of range": (
        topk_payload(topk_body(2, 0, varint_bytes(1, 62), float32_body([1, 2]))),
        "out of range",
    ),
    "topk first index out of range": (
        topk_payload(topk_body(1, 0, varint_bytes(63), float32_body([1]))),
        "out of range",
    ),
    "topk index not increasing": (
        topk_payload(topk_body(3, 0, varint_bytes(1, 2, 0), float32_body([1, 2, 3]))),
        "strictly increasing",
    ),
    "topk too few varints": (
        topk_payload(topk_body(3, 0, varint_bytes(1, 2) + b"\x81", float32_body([1, 2, 3]))),
        "complete varints",
    ),
    "topk varint too long": (
        topk_payload(topk_body(1, 0, b"\x80\x80\x80\x80\x80\x00", float32_body([1]))),
        "index length",
    ),
    "topk varint over five bytes": (
        topk_payload(topk_body(2, 0, b"\x80\x80\x80\x80\x80\x00\x01", float32_body([1, 2]))),
        "varint 0 is 6 bytes long",
    ),
    "topk varint overlong": (topk_payload(topk_body(1, 0, b"\x81\x00", float32_body([1]))), "over-long"),
    "topk varint fifth byte too wide": (
        topk_payload(topk_body(1, 0, b"\x80\x80\x80\x80\x10", float32_body([1]))),
        "at least 2**32",
    ),
    "topk varint longer than bitmap": (
        topk_payload(topk_body(9, 0, varint_bytes(0, *[1] * 8), float32_body(range(9)))),
        "longer than the 8-byte bitmap",
    ),
    "topk varint length below k": (
        topk_payload(topk_body(2, 0, b"\x01", float32_body([1, 2]))),
        "expected 2 to 10",
    ),
    "topk bitmap wrong length": (
        topk_payload(topk_body(1, 1, bytes([1] + [0] * 8), float32_body([1]))),
        "bitmap index length",
    ),
    "topk bitmap count mismatch": (
        topk_payload(topk_body(2, 1, bytes([1] + [0] * 7), float32_body([1, 2]))),
        "marks 1 elements",
    ),
    "topk bitmap bit past end": (
        topk_payload(topk_body(1, 1, bytes(7) + b"\x80", float32_body([1]))),
        "past element 62",
    ),
    "topk values too short": (
        topk_payload(topk_body(2, 0, varint_bytes(0, 1), float32_body([1]))),
        "expected exactly 8",
    ),
    "topk values non-finite": (
        topk_payload(topk_body(1, 0, varint_bytes(0), float32_body([np.nan]))),
        "not finite",
    ),
    # QSGD bodies (qsgd:3: 3-bit codes, level in bits 0-1, sign in bit 2).
    "qsgd body wrong length": (q_payload(qsgd_body(2.0, [1, 2, 3])[:-1], "qsgd:3", W_QSGD), "expected exactly 6"),
    "qsgd NaN norm": (q_payload(qsgd_body(np.nan, [1, 2, 3]), "qsgd:3", W_QSGD), "norm nan"),
    "qsgd negative norm": (q_payload(qsgd_body(-1.0, [1, 2, 3]), "qsgd:3", W_QSGD), "norm -1.0"),
    "qsgd level above levels": (q_payload(qsgd_body(2.0, [1, 0, 3]), "qsgd:2", W_QSGD2), "level 3 at position 2 exceeds"),
    "qsgd negative zero": (q_payload(qsgd_body(2.0, [1, 0b100, 3]), "qsgd:3", W_QSGD), "sign bit set"),
    "qsgd padding bits": (
        q_payload(qsgd_body(2.0, [1, 2, 3], padding=0x80), "qsgd:3", W_QSGD),
        "padding bits",
    ),
    # Sign and ternary bodies.
    "sign body wrong length": (q_payload(sign_body(1.0, 0b010) + b"\x00", "sign", W_SIGN), "expected exactly 5"),
    "sign NaN magnitude": (q_payload(sign_body(np.nan, 0b010), "sign", W_SIGN), "magnitude is nan"),
    "sign negative magnitude": (q_payload(sign_body(-2.0, 0b010), "sign", W_SIGN), "magnitude is -2.0"),
    "sign padding bits": (q_payload(sign_body(1.0, 0b1010), "sign", W_SIGN), "padding bits"),
    "ternary infinite magnitude": (
        frame("topk:0.5,ternary", [W_TERNARY, ("b", (3,), 1, topk_body(1, 0, varint_bytes(2), sign_body(np.inf, 0)))]),
        "ternary magnitude is inf",
    ),
    # Casts.
    "fp16 body wrong length": (q_payload(bytes(5), "fp16", bytes(12)), "fp16 body for 3 values is 5 bytes"),
    "fp16 infinity": (q_payload(struct.pack("<3H", 0, 0x7C00, 0), "fp16", bytes(12)), "0x7c00 at position 1"),
    "fp16 NaN": (q_payload(struct.pack("<3H", 0xFE01, 0, 0), "fp16", bytes(12)), "not finite"),
    "bf16 infinity": (q_payload(struct.pack("<3H", 0, 0, 0xFF80), "bf16", bytes(12)), "0xff80 at position 2"),
    "bf16 NaN": (q_payload(struct.pack("<3H", 0x7FC0, 0, 0), "bf16", bytes(12)), "not finite"),
    "bf16 body wrong length": (q_payload(bytes(8), "bf16", bytes(12)), "expected exactly 6"),
    # Random-k bodies.
    "randk shorter than header": (q_payload(b"\x00" * 11, "randk:0.5", W_RANDK), "12-byte header"),
    "randk k above numel": (q_payload(randk_body(1, 4, float32_body([1, 2, 3, 4])), "randk:0.5", W_RANDK), "k = 4 exceeds"),
    "randk values wrong length": (q_payload(randk_body(1, 2, float32_body([1])), "randk:0.5", W_RANDK), "expected exactly 8"),
    "randk values non-finite": (q_payload(randk_body(1, 1, float32_body([np.inf])), "randk:0.5", W_RANDK), "not finite"),
    # Threshold bodies share the top-k checks.
    "thresh k above numel": (
        q_payload(topk_body(4, 0, varint_bytes(0, 1, 1, 1), float32_body([1, 2, 3, 4])), "thresh:1.0", W_THRESH),
        "threshold k = 4 exceeds",
    ),
    "thresh index out of range": (
        q_payload(topk_body(1, 0, varint_bytes(3), float32_body([1])), "thresh:1.0", W_THRESH),
        "out of range",
    ),
    # zstd frames.
    "zstd not a frame": (zstd_payload(b"\x00" * 12), "not a zstandard frame"),
    "zstd content size unknown": (zstd_payload(zstd_frame(float32_body(B), content_size=False)), "does not declare"),
    "zstd declares too much": (zstd_payload(zstd_frame(float32_body(B) + bytes(1))), "largest valid body"),
    "zstd bomb declares 2**40": (zstd_payload(ZSTD_BOMB_HEADER), "1099511627776 bytes of content"),
    "zstd content beyond declared": (zstd_payload(lying_zstd_frame(float32_body(B))), "corrupt"),
    "zstd trailing bytes": (zstd_payload(zstd_frame(float32_body(B)) + b"\x00"), "corrupt"),
    "zstd truncated frame": (zstd_payload(zstd_frame(float32_body(B))[:-2]), "corrupt"),
    "zstd inner body invalid": (zstd_payload(zstd_frame(float32_body([0, np.nan, 1]))), "not finite"),
    "zstd inner body short": (zstd_payload(zstd_frame(float32_body([0, 1]))), "expected exactly 12"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_payload_raises_decode_error(case):
    payload, fragment = MALFORMED[case]
    shapes = TOPK_SHAPES if case.startswith("topk") else SHAPES

    with pytest.raises(DecodeError) as raised:
        decode_update(payload, shapes)

    message = str(raised.value)
    assert fragment in message
    assert "could not be decoded" not in message, "a named check should have caught this"


def test_malformed_cases_differ_from_valid_by_one_fault():
    # Each fixture part used above decodes when assembled correctly, so every
    # case fails for its own fault.
    assert decode_update(valid_none_payload(), SHAPES)
    assert decode_update(frame(Q8_SPEC, [W_Q8_GOOD, B_Q8_GOOD]), SHAPES)["b"].tolist() == [0.0, 1.0, 2.0]
    decoded = decode_update(frame(TOPK_SPEC, [W_TOPK_GOOD, B_TOPK_GOOD]), TOPK_SHAPES)
    assert decoded["w"].reshape(-1).tolist() == [1.0, 0.0, 2.0, 0.0, 3.0] + [0.0] * 58
    assert decoded["b"].tolist() == [0.0, 0.0, 2.0]


@pytest.mark.parametrize(
    ("spec", "w_body", "b_body", "b_expected"),
    [
        ("qsgd:3", W_QSGD, qsgd_body(2.0, [1, 0b110, 3]), [2 / 3, -4 / 3, 2.0]),
        ("qsgd:2", W_QSGD2, qsgd_body(2.0, [1, 0b110, 2]), [1.0, -2.0, 2.0]),
        ("sign", W_SIGN, sign_body(1.5, 0b010), [1.5, -1.5, 1.5]),
        ("fp16", bytes(12), struct.pack("<3H", 0x3C00, 0xC000, 0x7BFF), [1.0, -2.0, 65504.0]),
        ("bf16", bytes(12), struct.pack("<3H", 0x3F80, 0xC000, 0x7F7F), [1.0, -2.0, 3.3895313892515355e38]),
        ("randk:0.5", W_RANDK, randk_body(1, 1, float32_body([3.0])), None),
        ("thresh:1.0", W_THRESH, topk_body(1, 0, varint_bytes(2), float32_body([2.0])), [0.0, 0.0, 2.0]),
        ("zstd", zstd_frame(float32_body(W)), zstd_frame(float32_body(B)), B.tolist()),
    ],
)
def test_new_stage_fixtures_decode_when_valid(spec, w_body, b_body, b_expected):
    # The malformed cases above change one field of these bodies.
    decoded = decode_update(q_payload(b_body, spec, w_body), SHAPES)

    if b_expected is None:
        assert np.count_nonzero(decoded["b"]) == 1
        assert decoded["b"].max() == 3.0
    else:
        np.testing.assert_allclose(decoded["b"], b_expected, rtol=1e-6)


def test_ternary_fixture_decodes_when_valid():
    b_body = topk_body(1, 0, varint_bytes(2), sign_body(2.0, 1))
    payload = frame("topk:0.5,ternary", [W_TERNARY, ("b", (3,), 1, b_body)])

    assert decode_update(payload, SHAPES)["b"].tolist() == [0.0, 0.0, -2.0]


def test_zstd_bomb_rejected_before_allocating():
    # A 17-byte frame header declaring a terabyte, and a real frame that
    # expands 1000 times to 100 MB without declaring its size.
    unknown_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(100_000_000))
    assert len(unknown_size) < 10_000
    for b_body, fragment in ((ZSTD_BOMB_HEADER, "1099511627776"), (unknown_size, "does not declare")):
        tracemalloc.start()
        try:
            with pytest.raises(DecodeError, match=fragment):
                decode_update(zstd_payload(b_body), SHAPES)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000


@pytest.mark.parametrize(
    ("spec", "b_body"),
    [
        ("topk:0.5", topk_body(1, 0, varint_bytes(2), float32_body([2.0]))),
        ("topk:0.5:tensor", topk_body(1, 0, varint_bytes(2), float32_body([2.0]))),
        ("topk:0.5,q:4", topk_body(1, 0, varint_bytes(2), q_body([(2.0, 0.0)], b"\x00"))),
    ],
)
@pytest.mark.parametrize("coding", [0, 1])
def test_topk_k_zero_body_decodes_to_zeros(spec, b_body, coding):
    # Model-scope top-k may keep no entry of a tensor. The body is then k = 0,
    # no index bytes under delta varint (a zero bitmap under bitmap coding),
    # and an empty value section.
    index_bytes = b"" if coding == 0 else bytes(1)
    payload = frame(spec, [("w", (2, 3), 1, topk_body(0, coding, index_bytes, b"")), ("b", (3,), 1, b_body)])

    decoded = decode_update(payload, SHAPES)

    assert decoded["w"].shape == (2, 3)
    assert not decoded["w"].any()
    assert decoded["b"].tolist() == [0.0, 0.0, 2.0]


def test_encoder_writes_k_zero_body():
    update = {"w": np.full((2, 3), 0.01, np.float32), "b": B}

    payload = UpdateCodec("topk:0.1").encode(update, 0)

    # K = ceil(0.1 * 9) = 1 goes to the largest magnitude, b[2] = 2.0.
    expected = frame(
        "topk:0.1",
        [
            ("w", (2, 3), 1, topk_body(0, 0, b"", b"")),
            ("b", (3,), 1, topk_body(1, 0, varint_bytes(2), float32_body([2.0]))),
        ],
    )
    assert payload == expected


def test_shape_mismatch_names_tensor_and_both_shapes():
    with pytest.raises(DecodeError, match=r"tensor 'w': shape is \(2, 3\), expected \(2, 4\)"):
        decode_update(valid_none_payload(), {"w": (2, 4), "b": (3,)})


def test_expected_spec_mismatch():
    payload = UpdateCodec("q:8").encode({"w": W, "b": B}, 0)

    assert decode_update(payload, SHAPES, expected_spec="q:8")["w"].shape == (2, 3)
    with pytest.raises(DecodeError, match="encoded with q:8, expected topk:0.01,q:8"):
        decode_update(payload, SHAPES, expected_spec="topk:0.01,q:8")


@pytest.mark.parametrize("payload", ["PFLU", 12345, None, [1, 2, 3]])
def test_non_bytes_payload(payload):
    with pytest.raises(DecodeError):
        decode_update(payload, SHAPES)


def test_bytearray_and_memoryview_accepted():
    payload = valid_none_payload()

    assert decode_update(bytearray(payload), SHAPES)["b"].tolist() == B.tolist()
    assert decode_update(memoryview(payload), SHAPES)["b"].tolist() == B.tolist()


def test_varint_section_as_long_as_bitmap_is_accepted():
    # The writer picks delta varint on a tie, so a reader must accept a varint
    # section exactly as long as the bitmap: 8 one-byte varints, 8-byte bitmap.
    body = topk_body(8, 0, varint_bytes(0, *[1] * 7), float32_body(range(1, 9)))

    decoded = decode_update(topk_payload(body), TOPK_SHAPES)

    assert decoded["w"].reshape(-1)[:9].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0]


# --- memory under hostile payloads -------------------------------------------------


MEMORY_NUMEL = 1_000_000
MEMORY_SHAPES = {"w": (MEMORY_NUMEL,)}
MEMORY_MODEL_BYTES = 4 * MEMORY_NUMEL


def q_tail(bits, count, block_size=None):
    """A valid quantized body of `count` zero codes, with scale 1 per block."""
    blocks = 1 if block_size is None else -(-count // block_size)
    return q_body([(0.0, 1.0)] * blocks, bytes((count * bits + 7) // 8))


def worst_case_payloads():
    n = MEMORY_NUMEL
    k8 = n // 8
    full_bitmap = b"\xff" * (n // 8)
    # k = numel in one-byte varints: the largest varint section that is not
    # rejected up front is as long as the bitmap, k = numel / 8.
    longest_varint = b"\x00" + b"\x08" * (k8 - 1)
    return {
        "varint k = numel, q:1": ("topk:1,q:1", topk_body(n, 0, b"\x00" + b"\x01" * (n - 1), q_tail(1, n))),
        "varint k = numel / 8, float32": ("topk:1", topk_body(k8, 0, longest_varint, float32_body(np.zeros(k8)))),
        "varint k = numel / 8, q:8:2": ("topk:1,q:8:2", topk_body(k8, 0, longest_varint, q_tail(8, k8, 2))),
        "bitmap k = numel, q:1": ("topk:1,q:1", topk_body(n, 1, full_bitmap, q_tail(1, n))),
        "bitmap k = numel, q:8:2": ("topk:1,q:8:2", topk_body(n, 1, full_bitmap, q_tail(8, n, 2))),
        "bitmap k = numel, float32": ("topk:1", topk_body(n, 1, full_bitmap, float32_body(np.zeros(n)))),
        "dense q:1:2": ("q:1:2", q_tail(1, n, 2)),
        "dense qsgd:127:2": ("qsgd:127:2", b"".join([struct.pack("<f", 1.0)] * (n // 2)) + bytes(n)),
        "dense qsgd:1": ("qsgd:1", struct.pack("<f", 1.0) + bytes(n // 4)),
        "dense sign": ("sign", struct.pack("<f", 1.0) + b"\x55" * (n // 8)),
        "dense fp16": ("fp16", bytes(2 * n)),
        "dense bf16": ("bf16", bytes(2 * n)),
        "bitmap k = numel, thresh, ternary": ("thresh:1.0,ternary", topk_body(n, 1, full_bitmap, sign_body(1.0, 0) + bytes(n // 8 - 1))),
        "randk k = numel / 2, q:8:2": ("randk:0.5,q:8:2", randk_body(3, n // 2, q_tail(8, n // 2, 2))),
        "randk k = numel - 1, float32": ("randk:1,q:1", randk_body(3, n - 1, q_tail(1, n - 1))),
        "randk k = numel / 3, float32": ("randk:0.4", randk_body(3, n // 3, float32_body(np.zeros(n // 3)))),
        "zstd dense float32 of zeros": ("zstd", zstd_frame(bytes(4 * n))),
        "zstd bitmap k = numel, float32": ("topk:1,zstd", zstd_frame(topk_body(n, 1, full_bitmap, bytes(4 * n)))),
        "zstd declares the limit plus one": ("topk:1,zstd", zstd_frame(bytes(9 + n // 8 + 4 * n + 1))),
        "dense q:8:2": ("q:8:2", q_tail(8, n, 2)),
        "dense float32": ("none", float32_body(np.zeros(n))),
        # The model here is 1-d, so low-rank falls back to the dense value coder.
        "lowrank fallback, q:8:2": ("lowrank:4,q:8:2", q_tail(8, n, 2)),
        "rule none for w, topk default": ("topk:0.01;w=none", float32_body(np.zeros(n))),
        "rule bitmap k = numel, q:1": ("none;w=topk:1,q:1", topk_body(n, 1, full_bitmap, q_tail(1, n))),
    }


# A 1000 x 1000 matrix: low-rank factors decode into one product of the model's size.
MATRIX_SHAPES = {"w": (1000, 1000)}


def lowrank_worst_cases():
    n = 1000
    rank = 499  # the largest rank that still factors: 499 * 2000 < 1e6
    return {
        "lowrank:499 float32": ("lowrank:499", float32_body(np.ones(2 * n * rank) * 1e-3)),
        "lowrank:499 q:8:2": ("lowrank:499,q:8:2", q_tail(8, n * rank, 2) + q_tail(8, n * rank, 2)),
        "lowrank:499 zstd": ("lowrank:499,zstd", zstd_frame(bytes(8 * n * rank))),
        "lowrank:499 overflowing product": ("lowrank:499", float32_body(np.full(2 * n * rank, 1e30))),
    }


@pytest.mark.parametrize("case", list(worst_case_payloads()))
def test_decode_peak_memory_bounded_by_model_size(case):
    # Whatever a payload declares, decoding may allocate at most about 4 times
    # the model's float32 size. One-byte varints for every element once took
    # 16 times from a 1.1 MB payload.
    spec, body = worst_case_payloads()[case]
    payload = frame(spec, [("w", (MEMORY_NUMEL,), 1, body)])

    tracemalloc.start()
    try:
        try:
            decode_update(payload, MEMORY_SHAPES)
        except DecodeError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak <= 4 * MEMORY_MODEL_BYTES, f"{case}: peak {peak / MEMORY_MODEL_BYTES:.2f}x the model size"


@pytest.mark.parametrize("case", list(lowrank_worst_cases()))
def test_decode_peak_memory_bounded_for_lowrank(case):
    spec, body = lowrank_worst_cases()[case]
    payload = frame(spec, [("w", (1000, 1000), 1, body)])

    tracemalloc.start()
    try:
        try:
            decode_update(payload, MATRIX_SHAPES)
        except DecodeError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak <= 4 * MEMORY_MODEL_BYTES, f"{case}: peak {peak / MEMORY_MODEL_BYTES:.2f}x the model size"


def test_varint_section_longer_than_bitmap_is_rejected():
    body = topk_body(MEMORY_NUMEL, 0, b"\x00" + b"\x01" * (MEMORY_NUMEL - 1), q_tail(1, MEMORY_NUMEL))
    payload = frame("topk:1,q:1", [("w", (MEMORY_NUMEL,), 1, body)])

    with pytest.raises(DecodeError, match="longer than the 125000-byte bitmap"):
        decode_update(payload, MEMORY_SHAPES)


# --- fuzzing ---------------------------------------------------------------------


FUZZ_SHAPES = {"conv.weight": (4, 3, 2), "conv.bias": (4,), "scale": (), "fc": (40,)}


def fuzz_seed_payloads():
    rng = np.random.default_rng(7)
    update = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in FUZZ_SHAPES.items()}
    specs = [
        "none",
        "q:3",
        "q:8:5",
        "topk:0.2,q:4",
        "topk:0.6",
        "topk:0.05,q:1:2",
        "topk:0.2:tensor,q:4",
        "topk:0.05:tensor,q:1:2",
        "qsgd:3:5",
        "sign",
        "topk:0.2,ternary",
        "fp16",
        "bf16",
        "randk:0.3,q:4",
        "thresh:0.5",
        "q:4:nearest,zstd",
    ]
    return [UpdateCodec(spec).encode(update, 3) for spec in specs]


FUZZ_PAYLOADS = fuzz_seed_payloads()


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(FUZZ_PAYLOADS) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8))),
    fix_crc=st.booleans(),
)
def test_fuzzed_payload_only_raises_decode_error(which, flips, cut, insert, fix_crc):
    payload = bytearray(FUZZ_PAYLOADS[which])
    for position, value in flips:
        payload[position % len(payload)] = value
    if insert is not None:
        position, extra = insert
        payload[position % (len(payload) + 1) : position % (len(payload) + 1)] = extra
    if cut is not None:
        del payload[cut % (len(payload) + 1) :]
    if fix_crc and len(payload) >= 4:
        payload = bytearray(refresh_crc(bytes(payload)))

    try:
        decoded = decode_update(bytes(payload), FUZZ_SHAPES)
    except DecodeError as error:
        assert "could not be decoded" not in str(error), str(error)
        return

    # A mutation that survives decoding must still give finite arrays of the
    # expected shapes.
    assert list(decoded) == list(FUZZ_SHAPES)
    for name, shape in FUZZ_SHAPES.items():
        assert decoded[name].shape == shape
        assert decoded[name].dtype == np.float32
        assert np.isfinite(decoded[name]).all()


# --- per-layer rules and low-rank bodies -------------------------------------------


LOWRANK_SHAPES = {"w": (4, 3, 2), "b": (4,)}


def lowrank_payload(w_body, b_body=None, spec="lowrank:1;bias=none"):
    b_body = float32_body([1.0, 2.0, 3.0, 4.0]) if b_body is None else b_body
    return frame(spec, [("w", (4, 3, 2), 1, w_body), ("b", (4,), 1, b_body)])


def test_lowrank_independent_writer_decodes_p_times_q():
    # P (4 x 1) then Q (6 x 1); the body is 4 * (4 + 6) bytes.
    left = np.array([0.5, -0.5, 0.5, -0.5])
    right = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    payload = lowrank_payload(float32_body(np.concatenate([left, right])))

    decoded = decode_update(payload, LOWRANK_SHAPES)

    np.testing.assert_array_equal(decoded["w"], np.outer(left, right).reshape(4, 3, 2).astype(np.float32))
    # "b" is 1-d, so low-rank sends it dense (no rule needed for that).
    np.testing.assert_array_equal(decoded["b"], [1.0, 2.0, 3.0, 4.0])


GOOD_FACTORS = float32_body(np.ones(10))


@pytest.mark.parametrize(
    ("w_body", "spec", "message"),
    [
        (GOOD_FACTORS[:-1], "lowrank:1", "low-rank body for P \\(4 x 1\\) and Q \\(6 x 1\\) is 39 bytes, expected exactly 40"),
        (GOOD_FACTORS + b"\x00" * 4, "lowrank:1", "is 44 bytes, expected exactly 40"),
        (float32_body([np.nan] + [1.0] * 9), "lowrank:1", "low-rank P\\): value nan"),
        (float32_body([1.0] * 9 + [np.inf]), "lowrank:1", "low-rank Q\\): value inf"),
        (float32_body([1e30] * 10), "lowrank:1", "P @ Q.T is not finite"),
        (float32_body(np.ones(24)), "lowrank:1", "is 96 bytes, expected exactly 40"),
        (float32_body(np.ones(24)), "lowrank:2", "P \\(4 x 2\\) and Q \\(6 x 2\\) is 96 bytes, expected exactly 80"),
        # Rank 3 gives 3 * (4 + 6) >= 24 values, so the reader expects the dense body.
        (GOOD_FACTORS, "lowrank:3", "float32 body for 24 values is 40 bytes, expected exactly 96"),
        (q_body([(0.0, -1.0)], bytes(4)) + q_body([(0.0, 1.0)], bytes(6)), "lowrank:1,q:8", "scale -1.0"),
        (zstd_frame(GOOD_FACTORS + b"\x00"), "lowrank:1,zstd", "more than the 40-byte largest valid body"),
    ],
)
def test_lowrank_malformed_bodies_raise_decode_error(w_body, spec, message):
    payload = lowrank_payload(w_body, spec=spec)
    with pytest.raises(DecodeError, match=message):
        decode_update(payload, LOWRANK_SHAPES)


def test_lowrank_valid_fixture_decodes():
    payload = lowrank_payload(GOOD_FACTORS, spec="lowrank:1")
    assert decode_update(payload, LOWRANK_SHAPES)["w"].shape == (4, 3, 2)


def test_rules_resolve_from_expected_shape_not_a_tag():
    # The same record bytes decode under the rule only when the name matches.
    spec = "q:8;b=none"
    good = frame(spec, [("w", (2,), 1, q_body([(0.0, 1.0)], b"\x01\x02")), ("b", (2,), 1, float32_body([7.0, 8.0]))])
    np.testing.assert_array_equal(decode_update(good, {"w": (2,), "b": (2,)})["b"], [7.0, 8.0])

    swapped = frame(spec, [("w", (2,), 1, float32_body([7.0, 8.0])), ("b", (2,), 1, q_body([(0.0, 1.0)], b"\x01\x02"))])
    with pytest.raises(DecodeError, match="tensor 'w'"):
        decode_update(swapped, {"w": (2,), "b": (2,)})


@pytest.mark.parametrize(
    "spec",
    ["q:8;bias=none;bias=q:4", "q:8;", "q:8;x", "q:8;b=lowrank:2,sign", "q:8;small:0=none"],
)
def test_invalid_rule_spec_in_header_raises_decode_error(spec):
    payload = frame(spec, [("w", (2,), 1, q_body([(0.0, 1.0)], b"\x01\x02"))])
    with pytest.raises(DecodeError, match="pipeline spec in the payload header is invalid"):
        decode_update(payload, {"w": (2,)})


RULE_FUZZ_SHAPES = {"conv.weight": (8, 3, 5), "conv.bias": (8,), "fc.weight": (4, 24), "scale": ()}


def rule_fuzz_payloads():
    rng = np.random.default_rng(11)
    update = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in RULE_FUZZ_SHAPES.items()}
    specs = ["lowrank:1", "lowrank:2,q:4:8", "topk:0.2,q:4;bias=none;fc.*=lowrank:1,fp16", "lowrank:1,zstd;small:2=q:8"]
    return [UpdateCodec(spec).encode(update, 3) for spec in specs]


RULE_FUZZ_PAYLOADS = rule_fuzz_payloads()


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(RULE_FUZZ_PAYLOADS) - 1),
    flips=st.lists(st.tuples(st.integers(0, 2_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 2_000)),
)
def test_fuzzed_lowrank_rule_payloads_raise_decode_error(which, flips, cut):
    payload = bytearray(RULE_FUZZ_PAYLOADS[which])
    for position, value in flips:
        payload[position % len(payload)] = value
    if cut is not None:
        payload = payload[: cut % (len(payload) + 1)]
    payload = refresh_crc(bytes(payload)) if len(payload) >= 4 else bytes(payload)

    try:
        decoded = decode_update(payload, RULE_FUZZ_SHAPES)
    except DecodeError:
        return
    for name, shape in RULE_FUZZ_SHAPES.items():
        assert decoded[name].shape == shape
        assert np.isfinite(decoded[name]).all()
