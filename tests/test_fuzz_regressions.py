"""Inputs that must fail to decode with DecodeError, and only DecodeError.

Three sources, all decoded against the HAR CNN's shapes as the fuzzer does
(benchmarks/fuzz_decoder.py, docs/fuzzing.md):

- every file under tests/vectors/fuzz/: minimized inputs the fuzzer found;
- the fuzzer's seed corpus, which must decode, and damaged copies of it;
- hand-picked nasty inputs: empty, magic only, huge declared lengths.

The harness's own contract check (`check_one`) runs on each, so a decode that
succeeds must return finite float32 arrays of the expected shapes, within the
harness's memory bound.
"""

import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from pocketfl.compression import DecodeError, decode_update

REPOSITORY = Path(__file__).resolve().parents[1]
FINDINGS = sorted((REPOSITORY / "tests" / "vectors" / "fuzz").glob("*"))


def _load_harness():
    spec = importlib.util.spec_from_file_location("fuzz_decoder", REPOSITORY / "benchmarks" / "fuzz_decoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HARNESS = _load_harness()
SHAPES = HARNESS.HAR_SHAPES
SEEDS = HARNESS.seed_payloads()


def _framed(spec: bytes, records: bytes, count: int, *, spec_length: int | None = None) -> bytes:
    """Frame raw record bytes under a spec, with a correct CRC, as a hostile client could."""
    size = len(spec) if spec_length is None else spec_length
    body = b"PFLU" + struct.pack("<BH", 1, size) + spec + struct.pack("<I", count) + records
    return body + struct.pack("<I", zlib.crc32(body))


def _record(name: str, shape: tuple[int, ...], body: bytes, *, body_length: int | None = None) -> bytes:
    encoded = name.encode()
    length = len(body) if body_length is None else body_length
    return (
        struct.pack("<H", len(encoded))
        + encoded
        + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
        + struct.pack("<BI", 1, length)
        + body
    )


def _first_record_only(spec: bytes, body: bytes, **lengths) -> bytes:
    # One record for the first tensor; the count claims all eight, so the
    # decoder must reject the body before it notices the missing records.
    name, shape = next(iter(SHAPES.items()))
    return _framed(spec, _record(name, shape, body, **lengths), len(SHAPES))


NASTY = {
    "empty": b"",
    "magic only": b"PFLU",
    "magic and version": b"PFLU\x01",
    "shortest frame, no CRC": b"PFLU\x01\x00\x00\x00\x00\x00\x00",
    "empty update": _framed(b"none", b"", 0),
    "spec length past the end": _framed(b"none", b"", 8, spec_length=0xFFFF),
    "tensor count 2**32 - 1": _framed(b"none", b"", 0xFFFFFFFF),
    "spec not UTF-8": _framed(b"\xff\xfe", b"", 8),
    "unknown stage": _framed(b"zip:9", b"", 8),
    "name length 65535": _framed(b"none", struct.pack("<H", 0xFFFF), 8),
    "body length 2**32 - 1": _first_record_only(b"none", b"", body_length=0xFFFFFFFF),
    "top-k k = 2**32 - 1": _first_record_only(
        b"topk:0.1", struct.pack("<IBI", 0xFFFFFFFF, 0, 0)
    ),
    "top-k index length 2**32 - 1": _first_record_only(
        b"topk:0.1", struct.pack("<IBI", 10, 0, 0xFFFFFFFF)
    ),
    "top-k varint index of 2**35": _first_record_only(
        b"topk:0.1", struct.pack("<IBI", 1, 0, 5) + b"\x80\x80\x80\x80\x7f" + b"\0" * 4
    ),
    "top-k unknown index coding": _first_record_only(
        b"topk:0.1", struct.pack("<IBI", 1, 9, 1) + b"\x00" + b"\0" * 4
    ),
    "quantized scale infinity": _first_record_only(
        b"q:8", struct.pack("<ff", 0.0, float("inf")) + b"\0" * 960
    ),
    "quantized min NaN": _first_record_only(
        b"q:8", struct.pack("<ff", float("nan"), 1.0) + b"\0" * 960
    ),
    "quantized negative scale": _first_record_only(
        b"q:8", struct.pack("<ff", 0.0, -1.0) + b"\0" * 960
    ),
    "float32 NaN value": _first_record_only(b"none", struct.pack("<f", float("nan")) * 960),
    "float32 body one byte short": _first_record_only(b"none", b"\0" * 3839),
}


def _expect_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_update(data, SHAPES)
    # The same input under the harness's whole contract, memory bound included.
    HARNESS.check_one(data, decode_update, DecodeError, track_memory=True)


def test_fuzzer_findings_raise_decode_error():
    # One test over the whole folder, so that it runs (and passes) while empty.
    for path in FINDINGS:
        try:
            _expect_decode_error(path.read_bytes())
        except BaseException as error:
            raise AssertionError(f"tests/vectors/fuzz/{path.name}: {error!r}") from error


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_input_raises_decode_error(name):
    _expect_decode_error(NASTY[name])


@pytest.mark.parametrize("spec", list(SEEDS))
def test_seed_payload_decodes_within_the_contract(spec):
    HARNESS.check_one(SEEDS[spec], decode_update, DecodeError, track_memory=True)

    decoded = decode_update(SEEDS[spec], SHAPES)
    update = HARNESS.seed_update()
    if spec == "none":
        for name, array in decoded.items():
            np.testing.assert_array_equal(array, update[name])


@pytest.mark.parametrize("spec", list(SEEDS))
def test_damaged_seed_payload_raises_decode_error(spec):
    payload = SEEDS[spec]
    middle = len(payload) // 2
    flipped = payload[:middle] + bytes([payload[middle] ^ 0x01]) + payload[middle + 1 :]

    _expect_decode_error(payload[:-1])
    _expect_decode_error(payload[: len(payload) // 3])
    _expect_decode_error(payload + b"\0")
    _expect_decode_error(flipped)
    # A wrong tensor count with the CRC fixed up must fail past the CRC check.
    count_offset = 7 + len(spec)
    assert payload[7:count_offset] == spec.encode(), "seed specs are written in canonical form"
    wrong_count = payload[:count_offset] + b"\x09" + payload[count_offset + 1 :]
    _expect_decode_error(HARNESS.fix_crc(wrong_count))

def test_findings_folder_holds_only_raw_inputs():
    # Each finding is the raw payload bytes, named after what it broke.
    for path in FINDINGS:
        assert path.is_file(), path.name
        assert path.suffix in {".bin", ""}, path.name
