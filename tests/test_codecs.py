"""Round trips of the codec stages and parsing of pipeline specs."""

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pocketfl.compression import (
    CompressionSpec,
    DecodeError,
    UpdateCodec,
    decode_update,
    parse_compression_spec,
    payload_float32_bytes,
)
from pocketfl.compression.bitpack import pack_codes, packed_size, unpack_codes
from pocketfl.compression.index_coding import (
    BITMAP,
    DELTA_VARINT,
    decode_indices,
    encode_delta_varint,
    encode_indices,
)
from pocketfl.compression.stages import TopK, random_k_mask, splitmix64, to_bfloat16_bits
from pocketfl.compression.wire import PayloadReader


def shapes_of(update):
    return {name: np.shape(array) for name, array in update.items()}


def round_trip(spec, update, seed=0):
    payload = UpdateCodec(spec).encode(update, seed)
    return decode_update(payload, shapes_of(update))


def quantization_step(values, bits, block_size=None):
    """Return the per-element step (max - min) / (2**bits - 1) of each element's block."""
    flat = values.reshape(-1).astype(np.float64)
    size = max(flat.size, 1) if block_size is None else block_size
    steps = np.empty_like(flat)
    for start in range(0, flat.size, size):
        block = flat[start : start + size]
        steps[start : start + size] = (block.max() - block.min()) / (2**bits - 1)
    return steps.reshape(values.shape)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- none ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (4, 0, 2)], ids=str
)
def test_none_round_trip_exact(rng, shape):
    update = {"t": rng.standard_normal(shape).astype(np.float32)}

    decoded = round_trip("none", update)

    assert decoded["t"].dtype == np.float32
    assert decoded["t"].shape == shape
    np.testing.assert_array_equal(decoded["t"], update["t"])


def test_none_body_is_raw_float32(rng):
    values = rng.standard_normal(10).astype(np.float32)

    payload = UpdateCodec("none").encode({"x": values}, 0)

    assert values.astype("<f4").tobytes() in payload
    assert len(payload) == 4 + 1 + 2 + 4 + 4 + (2 + 1 + 1 + 4 + 1 + 4 + 40) + 4


def test_float32_alias_equals_none():
    assert parse_compression_spec("float32") == parse_compression_spec("none")


# --- q ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("block_size", [None, 2, 7, 256])
def test_quantize_error_below_one_step(rng, bits, block_size):
    values = (rng.standard_normal(1001) * 3 + 1).astype(np.float32)
    spec = f"q:{bits}" if block_size is None else f"q:{bits}:{block_size}"

    decoded = round_trip(spec, {"v": values}, seed=bits)["v"]

    # One step of stochastic rounding plus float32 rounding of the arithmetic.
    bound = quantization_step(values, bits, block_size) * (1 + 1e-4) + 1e-6 * np.abs(values).max()
    error = np.abs(decoded.astype(np.float64) - values)
    assert np.all(error <= bound), f"max error excess {np.max(error - bound)}"


def test_quantize_8bit_error_bound_per_tensor(rng):
    values = rng.uniform(-1, 1, 50_000).astype(np.float32)

    decoded = round_trip("q:8", {"v": values})["v"]

    step = (values.max() - values.min()) / 255
    assert np.abs(decoded - values).max() <= step * 1.0001


def test_quantize_decoded_values_on_levels(rng):
    values = rng.standard_normal(100).astype(np.float32)

    decoded = round_trip("q:3", {"v": values})["v"]

    levels = np.unique(decoded)
    assert levels.size <= 8
    assert decoded.min() >= values.min() - 1e-6
    assert decoded.max() <= values.max() + 1e-6


@pytest.mark.parametrize("spec", ["q:1", "q:4", "q:8", "q:8:2", "q:3:16", "topk:0.5,q:2"])
@pytest.mark.parametrize("constant", [0.0, -3.75, 1e-30, 12345.678])
def test_quantize_constant_tensor_exact(spec, constant):
    update = {
        "matrix": np.full((4, 33), constant, dtype=np.float32),
        "scalar": np.array(constant, dtype=np.float32),
        "single": np.array([constant], dtype=np.float32),
    }

    decoded = round_trip(spec, update)

    for name, array in update.items():
        if spec.startswith("topk"):
            kept = decoded[name][decoded[name] != 0]
            assert np.all(kept == np.float32(constant)) or constant == 0.0
        else:
            np.testing.assert_array_equal(decoded[name], array)


def test_quantize_constant_blocks_exact_between_others():
    values = np.concatenate([np.full(8, 2.5), np.linspace(-1, 1, 8), np.full(8, -7.0)]).astype(np.float32)

    decoded = round_trip("q:4:8", {"v": values})["v"]

    np.testing.assert_array_equal(decoded[:8], values[:8])
    np.testing.assert_array_equal(decoded[16:], values[16:])


@pytest.mark.parametrize("spec", ["q:8", "q:1", "topk:0.01:tensor,q:4", "topk:1.0", "none"])
def test_zero_dim_and_one_element(spec):
    update = {"scalar": np.array(-0.5, dtype=np.float32), "single": np.array([2.0], dtype=np.float32)}

    decoded = round_trip(spec, update)

    assert decoded["scalar"].shape == ()
    assert decoded["single"].shape == (1,)
    assert decoded["scalar"] == np.float32(-0.5)
    assert decoded["single"][0] == np.float32(2.0)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_rounding_unbiased(bits):
    # Values sit at a quarter, half and three quarters of a step, where
    # round-to-nearest would be off by up to half a step.
    levels = 2**bits - 1
    positions = np.array([0, levels, 0.25, 0.5, 0.75, levels - 0.25, 1.3, levels * 0.61])
    values = (positions / levels * 2.0 - 1.0).astype(np.float32)
    codec = UpdateCodec(f"q:{bits}")
    seeds = 1500

    total = np.zeros(values.size)
    squares = np.zeros(values.size)
    for seed in range(seeds):
        decoded = decode_update(codec.encode({"v": values}, seed), {"v": values.shape})["v"]
        total += decoded
        squares += decoded.astype(np.float64) ** 2
    mean = total / seeds

    # Rounding noise per draw is at most half a step in standard deviation, so
    # 6 standard errors of the mean bound a false failure well below 1e-6.
    step = 2.0 / levels
    tolerance = 6 * (step / 2) / math.sqrt(seeds)
    np.testing.assert_allclose(mean, values, atol=tolerance)

    variance = squares / seeds - mean**2
    assert np.all(variance[2:6] > 0.01 * step**2), "interior values should round both ways"


def test_encode_deterministic_per_seed(rng):
    update = {"a": rng.standard_normal((20, 30)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    codec = UpdateCodec("topk:0.3,q:3:16")

    first = codec.encode(update, 42)
    second = UpdateCodec("topk:0.3,q:3:16").encode(update, 42)
    other = codec.encode(update, 43)

    assert first == second
    assert first != other


def test_encode_rejects_non_finite():
    for bad in (np.nan, np.inf, -np.inf):
        update = {"good": np.ones(3, np.float32), "layer.bias": np.array([1.0, bad, 2.0], np.float32)}
        for spec in ("q:8", "topk:0.5", "none"):
            with pytest.raises(ValueError, match="layer.bias"):
                UpdateCodec(spec).encode(update, 0)


def test_encode_rejects_bad_inputs():
    codec = UpdateCodec("q:8")

    with pytest.raises(ValueError, match="seed"):
        codec.encode({"x": np.ones(2, np.float32)}, -1)
    with pytest.raises(ValueError, match="floating-point"):
        codec.encode({"x": np.ones(2, np.int32)}, 0)
    with pytest.raises(ValueError, match="names must be str"):
        codec.encode({3: np.ones(2, np.float32)}, 0)
    with pytest.raises(ValueError, match="UTF-8"):
        codec.encode({"\udc80": np.ones(2, np.float32)}, 0)


def test_encode_rejects_range_beyond_float32():
    values = np.array([-3e38, 3e38], dtype=np.float32)

    with pytest.raises(ValueError, match="'huge'"):
        UpdateCodec("q:1").encode({"huge": values}, 0)


def test_encode_accepts_float64(rng):
    values = rng.standard_normal(6)

    decoded = round_trip("none", {"x": values})["x"]

    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, values.astype(np.float32))


def test_decode_returns_expected_order(rng):
    update = {"first": rng.standard_normal(3).astype(np.float32), "second": rng.standard_normal(2).astype(np.float32)}
    payload = UpdateCodec("q:8").encode(update, 0)

    decoded = decode_update(payload, {"second": (2,), "first": (3,)})

    assert list(decoded) == ["second", "first"]
    assert payload.index(b"first") < payload.index(b"second")


def test_payload_float32_bytes():
    assert payload_float32_bytes({"a": (3, 4), "b": (), "c": (0, 5), "d": (7,)}) == 4 * (12 + 1 + 0 + 7)


def test_q8_payload_near_quarter_of_float32(rng):
    update = {"w": rng.standard_normal(100_000).astype(np.float32)}

    payload = UpdateCodec("q:8").encode(update, 0)

    assert len(payload) < payload_float32_bytes(shapes_of(update)) / 4 + 64


def test_codec_declared_properties():
    assert UpdateCodec("none").unbiased
    assert UpdateCodec("q:4").unbiased
    assert not UpdateCodec("q:4").error_feedback_advised
    assert not UpdateCodec("topk:0.1,q:4").unbiased
    assert UpdateCodec("topk:0.1,q:4").error_feedback_advised
    assert [stage.name for stage in UpdateCodec("topk:0.1,q:4").stages] == ["topk", "q"]
    assert UpdateCodec("topk:0.1,q:4").stages[0].scope == "model"
    assert UpdateCodec("topk:0.1:tensor,q:4").stages[0].scope == "tensor"


# --- topk ---------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["", ":tensor"])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.37, 0.9])
def test_topk_keeps_exactly_top_k(rng, fraction, scope):
    # With one tensor, model and tensor scope select the same entries.
    values = rng.permutation(np.linspace(-5, 5, 2000)).astype(np.float32).reshape(40, 50)

    decoded = round_trip(f"topk:{fraction}{scope}", {"w": values})["w"]

    k = max(1, math.ceil(fraction * values.size))
    expected_kept = np.argsort(-np.abs(values.reshape(-1)), kind="stable")[:k]
    kept = np.flatnonzero(decoded.reshape(-1))
    assert kept.size == k
    assert set(kept) == set(expected_kept)
    np.testing.assert_array_equal(decoded.reshape(-1)[kept], values.reshape(-1)[kept])

    dropped = np.ones(values.size, bool)
    dropped[kept] = False
    assert np.all(decoded.reshape(-1)[dropped] == 0)


def test_topk_fraction_one_keeps_all(rng):
    values = rng.standard_normal((17, 3)).astype(np.float32)

    decoded = round_trip("topk:1.0", {"w": values})["w"]

    np.testing.assert_array_equal(decoded, values)


def test_topk_k_from_decimal_fraction():
    # In binary floating point 0.07 * 100 is 7.000000000000001, which ceil
    # would turn into 8.
    assert TopK(0.07).k_for(100) == 7
    assert TopK(0.01).k_for(300) == 3
    assert TopK(0.01).k_for(1) == 1
    assert TopK(0.5).k_for(0) == 0
    assert TopK(1e-9).k_for(10) == 1


@pytest.mark.parametrize("scope", ["", ":tensor"])
def test_topk_ties_go_to_lower_index(scope):
    values = np.array([1.0, -3.0, 2.0, 3.0, -2.0, 3.0, 0.5], dtype=np.float32)

    decoded = round_trip(f"topk:0.3{scope}", {"w": values})["w"]

    # k = ceil(0.3 * 7) = 3, and three entries have magnitude 3.
    np.testing.assert_array_equal(np.flatnonzero(decoded), [1, 3, 5])

    # k = ceil(0.5 * 7) = 4, and two entries tie at magnitude 2.
    decoded = round_trip(f"topk:0.5{scope}", {"w": values})["w"]
    np.testing.assert_array_equal(np.flatnonzero(decoded), [1, 2, 3, 5])


def reference_model_topk(update, fraction):
    """Return the (tensor position, flat index) pairs that model-scope top-k keeps, by a full sort."""
    flats = [np.asarray(array, np.float32).reshape(-1) for array in update.values()]
    total = sum(flat.size for flat in flats)
    k = max(1, math.ceil(Fraction(repr(fraction)) * total))

    positions = np.concatenate([np.full(flat.size, i) for i, flat in enumerate(flats)])
    offsets = np.concatenate([np.arange(flat.size) for flat in flats])
    # A stable sort on descending magnitude breaks ties by concatenated order,
    # which is (tensor position, flat index).
    order = np.argsort(-np.abs(np.concatenate(flats)), kind="stable")[:k]
    return k, {(int(positions[j]), int(offsets[j])) for j in order}


def mixed_scale_update(rng):
    return {
        "conv.weight": (rng.standard_normal((8, 3, 5)) * 1.0).astype(np.float32),
        "conv.bias": (rng.standard_normal(8) * 1e-3).astype(np.float32),
        "fc.weight": (rng.standard_normal((20, 30)) * 20.0).astype(np.float32),
        "fc.bias": (rng.standard_normal(20) * 0.05).astype(np.float32),
        "scale": np.array(0.5, dtype=np.float32),
    }


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_model_topk_matches_numpy_reference(rng, fraction):
    update = mixed_scale_update(rng)

    decoded = round_trip(f"topk:{fraction}", update)

    k, expected = reference_model_topk(update, fraction)
    kept = {
        (position, int(index))
        for position, name in enumerate(update)
        for index in np.flatnonzero(decoded[name].reshape(-1))
    }
    assert len(kept) == k
    assert kept == expected
    for name, array in update.items():
        mask = decoded[name] != 0
        np.testing.assert_array_equal(decoded[name][mask], array[mask])


def test_model_topk_budget_goes_to_large_tensors(rng):
    update = mixed_scale_update(rng)
    total = sum(array.size for array in update.values())

    decoded = round_trip("topk:0.05", update)

    counts = {name: int(np.count_nonzero(array)) for name, array in decoded.items()}
    assert sum(counts.values()) == math.ceil(0.05 * total)
    assert counts["fc.weight"] == math.ceil(0.05 * total)
    assert counts["conv.bias"] == 0
    assert counts["scale"] == 0


def test_model_topk_select_update_indices(rng):
    update = mixed_scale_update(rng)
    flats = [array.reshape(-1) for array in update.values()]
    stage = TopK(0.1)

    selected = stage.select_update(flats)

    k, expected = reference_model_topk(update, 0.1)
    assert sum(indices.size for indices in selected) == k
    assert {(i, int(j)) for i, indices in enumerate(selected) for j in indices} == expected
    for indices in selected:
        assert indices.dtype == np.int64
        assert np.all(np.diff(indices) > 0)


def test_tensor_topk_keeps_k_per_tensor(rng):
    update = mixed_scale_update(rng)

    decoded = round_trip("topk:0.05:tensor", update)

    for name, array in update.items():
        assert np.count_nonzero(decoded[name]) == max(1, math.ceil(0.05 * array.size)), name


def test_model_topk_ties_by_position():
    update = {
        "a": np.array([0.0, 3.0, 1.0, -3.0], np.float32),
        "b": np.array([-3.0, 3.0], np.float32),
        "c": np.array([2.0, 3.0], np.float32),
    }
    # Eight entries in all, so fraction f keeps ceil(8 f).
    expected = {
        0.125: {"a": [1], "b": [], "c": []},
        0.25: {"a": [1, 3], "b": [], "c": []},
        0.375: {"a": [1, 3], "b": [0], "c": []},
        0.625: {"a": [1, 3], "b": [0, 1], "c": [1]},
        0.75: {"a": [1, 3], "b": [0, 1], "c": [0, 1]},
    }

    for fraction, kept in expected.items():
        for seed in (0, 5):
            decoded = round_trip(f"topk:{fraction}", update, seed=seed)
            for name in update:
                assert np.flatnonzero(decoded[name]).tolist() == kept[name], (fraction, name)


def test_model_topk_empty_tensor_round_trips_to_zeros():
    update = {
        "large": np.array([5.0, -4.0, 3.0, 6.0], np.float32),
        "small": np.full((2, 3), 1e-3, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(-1e-4, np.float32),
    }

    for spec in ("topk:0.1", "topk:0.1,q:4", "topk:0.1,q:2:4"):
        payload = UpdateCodec(spec).encode(update, 0)
        decoded = decode_update(payload, shapes_of(update), expected_spec=spec)

        # K = ceil(0.1 * 11) = 2 goes to the two largest entries of "large".
        assert np.flatnonzero(decoded["large"]).tolist() == [0, 3], spec
        for name in ("small", "empty", "scalar"):
            assert decoded[name].shape == update[name].shape
            assert not decoded[name].any(), (spec, name)

    # A k = 0 body is the 9-byte top-k header alone: k 0, delta varint, 0 index bytes.
    payload = UpdateCodec("topk:0.1,q:4").encode(update, 0)
    small_record = payload.index(b"small")
    body_length_at = small_record + len(b"small") + 1 + 8 + 1
    assert payload[body_length_at : body_length_at + 4] == (9).to_bytes(4, "little")
    assert payload[body_length_at + 4 : body_length_at + 13] == bytes(9)


def test_model_topk_keeps_all_entries_at_fraction_one(rng):
    update = mixed_scale_update(rng)

    decoded = round_trip("topk:1.0", update)

    for name, array in update.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_model_topk_empty_update():
    assert decode_update(UpdateCodec("topk:0.1,q:4").encode({}, 0), {}) == {}
    decoded = round_trip("topk:0.5", {"empty": np.zeros(0, np.float32)})
    assert decoded["empty"].shape == (0,)


def test_model_and_tensor_scope_payloads_differ(rng):
    update = mixed_scale_update(rng)

    model = UpdateCodec("topk:0.05").encode(update, 0)
    tensor = UpdateCodec("topk:0.05:tensor").encode(update, 0)

    # Spec length (u16) at offset 5, then the canonical spec text.
    assert model[5:16] == b"\x09\x00topk:0.05"
    assert tensor[5:23] == b"\x10\x00topk:0.05:tensor"
    with pytest.raises(DecodeError, match="encoded with topk:0.05:tensor, expected topk:0.05"):
        decode_update(tensor, shapes_of(update), expected_spec="topk:0.05")


def test_topk_stage_rejects_unknown_scope():
    with pytest.raises(ValueError, match="scope 'layer'"):
        TopK(0.1, "layer")


def test_topk_then_quantize_error(rng):
    values = rng.standard_normal(5000).astype(np.float32)

    decoded = round_trip("topk:0.02,q:8", {"w": values})["w"]

    k = 100
    top = np.sort(np.argsort(-np.abs(values))[:k])
    np.testing.assert_array_equal(np.flatnonzero(decoded), top)
    kept = values[top]
    step = (kept.max() - kept.min()) / 255
    assert np.abs(decoded[top] - kept).max() <= step * 1.0001


def test_topk_picks_shorter_index_coding(rng):
    values = rng.standard_normal(4096).astype(np.float32)
    header_end = len(b"PFLU") + 1 + 2

    sparse = UpdateCodec("topk:0.01").encode({"w": values}, 0)
    dense = UpdateCodec("topk:0.5").encode({"w": values}, 0)

    # The index coding byte follows the record fields and k.
    def coding_byte(payload, spec):
        record_start = header_end + len(spec) + 4
        body_start = record_start + 2 + 1 + 1 + 4 + 1 + 4
        return payload[body_start + 4]

    assert coding_byte(sparse, "topk:0.01") == DELTA_VARINT
    assert coding_byte(dense, "topk:0.5") == BITMAP


# --- index coding and bit packing ---------------------------------------------


def test_delta_varint_large_gaps():
    numel = 2**32 - 1
    indices = np.array([0, 127, 128, 2**14, 2**21 + 3, 2**28 + 5, numel - 1], dtype=np.int64)

    coded = encode_delta_varint(indices)
    decoded = decode_indices(DELTA_VARINT, np.frombuffer(coded, np.uint8), indices.size, numel, "t")

    np.testing.assert_array_equal(decoded, indices)
    assert coded[:3] == bytes([0x00, 0x7F, 0x01])


def test_delta_varint_known_bytes():
    coded = encode_delta_varint(np.array([5, 305], dtype=np.int64))

    # 5, then 300 = 0b10_0101100 -> 0xAC 0x02.
    assert coded == bytes([0x05, 0xAC, 0x02])


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_index_coding_round_trip(rng, numel):
    for count in {1, numel // 3, numel}:
        if count == 0:
            continue
        indices = np.sort(rng.choice(numel, size=count, replace=False))
        coding, coded = encode_indices(indices, numel)
        decoded = decode_indices(coding, np.frombuffer(coded, np.uint8), count, numel, "t")
        np.testing.assert_array_equal(decoded, indices)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 1000])
def test_bitpack_round_trip(rng, bits, count):
    codes = rng.integers(0, 2**bits, size=count, dtype=np.uint8)

    packed = pack_codes(codes, bits)

    assert len(packed) == packed_size(count, bits)
    np.testing.assert_array_equal(unpack_codes(np.frombuffer(packed, np.uint8), count, bits), codes)


def test_bitpack_layout_lsb_first():
    assert pack_codes(np.array([1, 2, 3], np.uint8), 4) == bytes([0x21, 0x03])
    assert pack_codes(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], np.uint8), 1) == bytes([0x0D, 0x01])
    # 3-bit codes 5, 6, 7: stream 101 011 111 from the low bit -> 0xF5, 0x01.
    assert pack_codes(np.array([5, 6, 7], np.uint8), 3) == bytes([0xF5, 0x01])


# --- spec parsing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fraction", "scope", "bits", "block_size", "canonical"),
    [
        ("topk:0.01,q:8", 0.01, "model", 8, None, "topk:0.01,q:8"),
        ("q:4", None, "model", 4, None, "q:4"),
        ("q:4:256", None, "model", 4, 256, "q:4:256"),
        ("topk:0.05", 0.05, "model", None, None, "topk:0.05"),
        ("none", None, "model", None, None, "none"),
        (" topk:1 , q:1:2 ", 1.0, "model", 1, 2, "topk:1.0,q:1:2"),
        ("topk:1e-05,q:8", 1e-05, "model", 8, None, "topk:1e-05,q:8"),
        ("topk:.5", 0.5, "model", None, None, "topk:0.5"),
        ("topk:0.01:model", 0.01, "model", None, None, "topk:0.01"),
        ("topk:0.01:model,q:8", 0.01, "model", 8, None, "topk:0.01,q:8"),
        ("topk:0.01:tensor", 0.01, "tensor", None, None, "topk:0.01:tensor"),
        ("topk:0.01:tensor,q:4:256", 0.01, "tensor", 4, 256, "topk:0.01:tensor,q:4:256"),
        (" topk:1:tensor , q:1:2 ", 1.0, "tensor", 1, 2, "topk:1.0:tensor,q:1:2"),
        ("topk:.5:tensor,q:8", 0.5, "tensor", 8, None, "topk:0.5:tensor,q:8"),
    ],
)
def test_spec_parses_valid(text, fraction, scope, bits, block_size, canonical):
    spec = parse_compression_spec(text)

    assert spec.topk_fraction == fraction
    assert spec.topk_scope == scope
    assert spec.bits == bits
    assert spec.block_size == block_size
    assert spec.canonical() == canonical
    assert str(spec) == canonical
    assert parse_compression_spec(spec.canonical()) == spec


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["empty"]),
        ("   ", ["empty"]),
        ("zip:3", ["'zip:3'", "unknown stage 'zip'", "topk, randk, thresh, lowrank, none, q, qsgd"]),
        ("q:9", ["'q:9'", "bits 9", "1..8"]),
        ("q:0", ["'q:0'", "bits 0", "1..8"]),
        ("q:four", ["'q:four'", "1..8"]),
        ("topk:0", ["'topk:0'", "(0, 1]"]),
        ("topk:1.5", ["'topk:1.5'", "(0, 1]"]),
        ("topk:-0.1", ["'topk:-0.1'", "(0, 1]"]),
        ("topk:nan", ["'topk:nan'", "(0, 1]"]),
        ("topk:inf", ["'topk:inf'", "(0, 1]"]),
        ("q:4:1", ["'q:4:1'", "block size 1", "2.."]),
        ("q:4:0", ["'q:4:0'", "block size 0"]),
        ("q:4:2.5", ["'q:4:2.5'", "not an integer"]),
        ("q:4:-8", ["'q:4:-8'", "not an integer"]),
        ("q:4,q:8", ["'q:8'", "more than once"]),
        ("topk:0.1,topk:0.2", ["'topk:0.2'", "more than once"]),
        ("q:8,topk:0.01", ["'topk:0.01'", "before 'q'"]),
        ("none,q:8", ["'none'", "cannot be combined"]),
        ("q:8,none", ["'none'", "cannot be combined"]),
        ("topk:0.1,", ["empty token"]),
        ("topk", ["'topk'", "topk:FRACTION"]),
        ("topk:0.01:layer", ["'topk:0.01:layer'", "scope 'layer' is invalid", "'tensor'", "'model'"]),
        ("topk:0.01:Tensor", ["scope 'Tensor' is invalid", "'tensor'"]),
        ("topk:0.01:", ["scope '' is invalid", "'tensor'"]),
        ("topk:0.01:tensor:2", ["'topk:0.01:tensor:2'", "topk:FRACTION:tensor", "3 argument(s)"]),
        ("topk:tensor", ["fraction 'tensor'"]),
        ("q:8,topk:0.01:tensor", ["before 'q'"]),
        ("q", ["'q'", "q:BITS"]),
        ("q:4:256:2", ["'q:4:256:2'", "q:BITS:BLOCK"]),
        ("none:1", ["'none:1'"]),
    ],
)
def test_spec_rejects_invalid(text, fragments):
    with pytest.raises(ValueError) as raised:
        parse_compression_spec(text)

    message = str(raised.value)
    assert "Example of a valid spec: 'topk:0.01,q:8'" in message
    for fragment in fragments:
        assert fragment in message


def test_spec_model_validates_text():
    assert CompressionSpec.model_validate("q:4:256") == CompressionSpec(bits=4, block_size=256)

    with pytest.raises(ValueError, match="bits 12"):
        CompressionSpec.model_validate("q:12")
    with pytest.raises(ValueError, match="needs bits"):
        CompressionSpec(block_size=64)
    with pytest.raises(ValueError):
        CompressionSpec(topk_fraction=0.0)
    with pytest.raises(ValueError, match="needs topk_fraction"):
        CompressionSpec(topk_scope="tensor")
    with pytest.raises(ValueError, match="topk_scope"):
        CompressionSpec(topk_fraction=0.1, topk_scope="layer")


def test_spec_scope_equality():
    model = parse_compression_spec("topk:0.01")

    assert model == parse_compression_spec("topk:0.01:model")
    assert model == CompressionSpec(topk_fraction=0.01)
    assert model != parse_compression_spec("topk:0.01:tensor")
    assert CompressionSpec.model_validate("topk:0.01:tensor,q:4") == CompressionSpec(
        topk_fraction=0.01, topk_scope="tensor", bits=4
    )


def test_codec_accepts_spec_object():
    spec = parse_compression_spec("topk:0.1,q:4")

    assert UpdateCodec(spec).spec is spec
    assert UpdateCodec("topk:0.1,q:4").spec == spec


# --- new stages: shared round-trip bounds --------------------------------------


def qsgd_step(values, levels, block_size=None):
    """Return each element's QSGD step, its block's float32 L2 norm over `levels`."""
    flat = values.reshape(-1).astype(np.float64)
    size = max(flat.size, 1) if block_size is None else block_size
    steps = np.empty_like(flat)
    for start in range(0, flat.size, size):
        block = flat[start : start + size]
        steps[start : start + size] = np.float32(np.sqrt(np.sum(block**2))) / levels
    return steps.reshape(values.shape)


def error_bound(spec, values):
    """Return the per-element error bound a dense value coder states for `values`."""
    magnitude = np.abs(values.astype(np.float64))
    # Float32 rounding, plus the blocks whose step is below the smallest normal
    # float32 and which are sent as constant (error below 3e-36, see stages.py).
    slack = 1e-6 * (magnitude.max() if magnitude.size else 0.0) + 3e-36
    if spec.startswith("q:") and spec.endswith(":nearest"):
        parts = spec.split(":")
        block = int(parts[2]) if len(parts) == 4 else None
        return quantization_step(values, int(parts[1]), block) * 0.5 * (1 + 1e-4) + slack
    if spec.startswith("qsgd:"):
        parts = spec.split(":")
        block = int(parts[2]) if len(parts) == 3 else None
        return qsgd_step(values, int(parts[1]), block) * (1 + 1e-4) + slack
    if spec.startswith("fp16"):
        # Half a unit in the last place: 2**-11 relative, 2**-25 absolute for subnormals.
        return magnitude * 2.0**-11 + 2.0**-25
    if spec.startswith("bf16"):
        # Half a unit in the last of 8 significant bits, 2**-8 relative, and
        # half the subnormal spacing 2**-133 below the normal range.
        return magnitude * 2.0**-8 + 2.0**-134
    if spec == "sign":
        # |x - (±mu)| <= |x| + mu with mu the mean magnitude.
        return magnitude + (magnitude.mean() if magnitude.size else 0.0) * (1 + 1e-6) + slack
    raise AssertionError(spec)


DENSE_SPECS = ["q:3:nearest", "q:8:5:nearest", "qsgd:1", "qsgd:15", "qsgd:127:7", "sign", "fp16", "bf16", "bf16,zstd"]


@pytest.mark.parametrize("spec", DENSE_SPECS)
@pytest.mark.parametrize("shape", [(), (1,), (9,), (5, 7), (0,), (3, 0)], ids=str)
def test_new_value_coders_round_trip_within_bound(rng, spec, shape):
    values = (rng.standard_normal(shape) * 2 + 0.3).astype(np.float32)

    decoded = round_trip(spec, {"t": values}, seed=5)["t"]

    assert decoded.shape == shape
    assert decoded.dtype == np.float32
    error = np.abs(decoded.astype(np.float64) - values)
    assert np.all(error <= error_bound(spec, values)), f"max excess {np.max(error - error_bound(spec, values))}"


@pytest.mark.parametrize("spec", ["q:2:nearest", "qsgd:3", "qsgd:7:4", "fp16", "bf16", "sign", "qsgd:3,zstd"])
@pytest.mark.parametrize("constant", [0.0, -3.75, 1.0])
def test_new_value_coders_constant_tensor_exact(spec, constant):
    update = {
        "matrix": np.full((4, 33), constant, dtype=np.float32),
        "scalar": np.array(constant, dtype=np.float32),
    }

    decoded = round_trip(spec, update)

    # Sign sends the mean magnitude, which is the constant's own magnitude.
    for name, array in update.items():
        if spec.startswith("qsgd") and constant != 0.0 and name == "matrix":
            # A constant's QSGD level is |x| / (norm / s) = s / sqrt(n), not on a level.
            assert np.all(np.abs(decoded[name] - array) <= qsgd_step(array, int(spec.split(":")[1].split(",")[0])) * 1.0001)
        else:
            np.testing.assert_array_equal(decoded[name], array)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(DENSE_SPECS),
    values=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=40),
        elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True),
    ),
    seed=st.integers(0, 2**32),
)
def test_new_value_coders_property_round_trip(spec, values, seed):
    decoded = round_trip(spec, {"t": values}, seed=seed)["t"]

    assert decoded.shape == values.shape
    assert np.isfinite(decoded).all()
    error = np.abs(decoded.astype(np.float64) - values)
    assert np.all(error <= error_bound(spec, values))


# --- q nearest -------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [None, 4])
def test_quantize_nearest_deterministic_and_within_half_step(rng, block_size):
    values = (rng.standard_normal(301) * 3).astype(np.float32)
    spec = "q:4:nearest" if block_size is None else f"q:4:{block_size}:nearest"
    codec = UpdateCodec(spec)

    payloads = {codec.encode({"v": values}, seed) for seed in range(5)}
    assert len(payloads) == 1, "nearest rounding must not depend on the seed"

    decoded = decode_update(payloads.pop(), {"v": values.shape})["v"]
    step = quantization_step(values, 4, block_size)
    error = np.abs(decoded.astype(np.float64) - values)
    assert np.all(error <= step * 0.5 * (1 + 1e-4) + 1e-6)
    # Stochastic rounding is off by more than half a step somewhere on 301 values.
    stochastic = round_trip(spec.replace(":nearest", ""), {"v": values})["v"]
    assert np.abs(stochastic.astype(np.float64) - values).max() > step.max() * 0.5


def test_quantize_nearest_matches_reference_codes():
    # Positions 0.49 and 0.5 of a step: nearest rounding sends 0 and 1.
    values = np.array([0.0, 0.49, 0.5, 1.51, 3.0], dtype=np.float32)

    decoded = round_trip("q:2:nearest", {"v": values})["v"]

    np.testing.assert_array_equal(decoded, [0.0, 0.0, 1.0, 2.0, 3.0])


def test_quantize_nearest_same_body_layout_as_stochastic():
    values = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)

    nearest = UpdateCodec("q:2:nearest").encode({"v": values}, 0)
    stochastic = UpdateCodec("q:2").encode({"v": values}, 0)

    # On-level values round the same both ways; only the spec text differs.
    assert nearest[7 + len("q:2:nearest") :] == stochastic[7 + len("q:2") :][: -4] + nearest[-4:]


# --- qsgd --------------------------------------------------------------------------


def test_qsgd_exact_hand_case_bytes():
    # norm 5 over s = 5 levels gives step 1; 3 and 4 sit on levels, so every seed agrees.
    values = np.array([-3.0, 4.0], dtype=np.float32)

    payload = UpdateCodec("qsgd:5").encode({"v": values}, 0)
    decoded = decode_update(payload, {"v": (2,)})["v"]

    np.testing.assert_array_equal(decoded, values)
    # 4-bit codes: level 3 with the sign bit (0b1011), then level 4 (0b0100).
    body = np.float32(5.0).astype("<f4").tobytes() + bytes([0x4B])
    assert payload[-4 - len(body) : -4] == body


def test_qsgd_unbiased_over_seeds():
    values = np.array([0.1, -0.35, 0.7, 0.05, -0.6, 0.0, 0.22, -0.01], dtype=np.float32)
    codec = UpdateCodec("qsgd:2")
    seeds = 2000

    total = np.zeros(values.size)
    for seed in range(seeds):
        total += decode_update(codec.encode({"v": values}, seed), {"v": values.shape})["v"]
    mean = total / seeds

    # Per-draw error is below one step norm / s, so its standard deviation is
    # at most half a step; 6 standard errors make a false failure negligible.
    step = float(np.linalg.norm(values)) / 2
    np.testing.assert_allclose(mean, values, atol=6 * (step / 2) / math.sqrt(seeds))
    assert not np.allclose(mean, np.round(values / step) * step, atol=1e-3), "should not be nearest rounding"


@pytest.mark.parametrize(("levels", "bits"), [(1, 2), (2, 3), (3, 3), (4, 4), (15, 5), (16, 6), (127, 8)])
def test_qsgd_bits_per_value(levels, bits):
    values = np.linspace(-1, 1, 800, dtype=np.float32)

    payload = UpdateCodec(f"qsgd:{levels}").encode({"v": values}, 0)

    header = 4 + 1 + 2 + len(f"qsgd:{levels}") + 4 + 2 + 1 + 1 + 4 + 1 + 4
    assert len(payload) == header + 4 + 800 * bits // 8 + 4


# --- sign and ternary --------------------------------------------------------------


def test_sign_exact_hand_case_bytes():
    values = np.array([1.0, -2.0, 3.0, 0.0], dtype=np.float32)

    payload = UpdateCodec("sign").encode({"v": values}, 0)
    decoded = decode_update(payload, {"v": (4,)})["v"]

    # mu = (1 + 2 + 3 + 0) / 4; zero counts as positive.
    np.testing.assert_array_equal(decoded, [1.5, -1.5, 1.5, 1.5])
    assert payload[-4 - 5 : -4] == np.float32(1.5).astype("<f4").tobytes() + bytes([0b0010])


def test_sign_keeps_l1_norm(rng):
    values = rng.standard_normal(1000).astype(np.float32)

    decoded = round_trip("sign", {"v": values})["v"]

    np.testing.assert_allclose(np.abs(decoded).sum(), np.abs(values).sum(), rtol=1e-5)
    np.testing.assert_array_equal(np.sign(decoded), np.where(values < 0, -1.0, 1.0))


def test_ternary_exact_hand_case():
    values = np.array([0.5, -4.0, 2.0, 0.1], dtype=np.float32)

    decoded = round_trip("topk:0.5:tensor,ternary", {"v": values})["v"]

    # k = 2 keeps -4 and 2, whose mean magnitude is 3.
    np.testing.assert_array_equal(decoded, [0.0, -3.0, 3.0, 0.0])


def test_ternary_after_threshold_and_empty_selection():
    update = {"big": np.array([5.0, -1.0, 7.0], np.float32), "small": np.array([0.1, -0.2], np.float32)}

    decoded = round_trip("thresh:1.0,ternary", update)

    mu = np.float32(13 / 3)
    np.testing.assert_array_equal(decoded["big"], [mu, -mu, mu])
    np.testing.assert_array_equal(decoded["small"], [0.0, 0.0])


# --- fp16 and bf16 -----------------------------------------------------------------


def test_fp16_round_trip_matches_numpy_cast(rng):
    values = (rng.standard_normal(500) * 100).astype(np.float32)

    decoded = round_trip("fp16", {"v": values})["v"]

    np.testing.assert_array_equal(decoded, values.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("bad", [65520.0, -65520.0, 1e5, 3e38])
def test_fp16_rejects_values_beyond_range(bad):
    update = {"fine": np.ones(2, np.float32), "layer.weight": np.array([1.0, bad], np.float32)}

    with pytest.raises(ValueError, match=r"'layer.weight'.*float16 range"):
        UpdateCodec("fp16").encode(update, 0)


def test_fp16_accepts_values_that_round_to_max():
    values = np.array([65504.0, 65519.0, -65519.0], np.float32)

    decoded = round_trip("fp16", {"v": values})["v"]

    np.testing.assert_array_equal(decoded, [65504.0, 65504.0, -65504.0])


BF16_CASES = [
    (0x3F800000, 0x3F80),  # 1.0, exact
    (0x3F807FFF, 0x3F80),  # just below the tie: down
    (0x3F808000, 0x3F80),  # tie, even below: down
    (0x3F818000, 0x3F82),  # tie, odd below: up to even
    (0x3F808001, 0x3F81),  # just above the tie: up
    (0xBF818000, 0xBF82),  # negative tie rounds the magnitude the same way
    (0x3FFFFFFF, 0x4000),  # carry into the exponent
    (0x00000001, 0x0000),  # smallest subnormal rounds to zero
    (0x80018000, 0x8002),  # negative subnormal tie, odd below: up
    (0x7F7F7FFF, 0x7F7F),  # largest float32 that stays finite in bfloat16
    (0x80000000, 0x8000),  # negative zero keeps its sign
]


@pytest.mark.parametrize(("float32_bits", "bfloat16_bits"), BF16_CASES, ids=[f"{a:#010x}" for a, _ in BF16_CASES])
def test_bf16_rounds_to_nearest_even(float32_bits, bfloat16_bits):
    value = np.array([float32_bits], dtype=np.uint32).view(np.float32)

    assert to_bfloat16_bits(value)[0] == bfloat16_bits
    decoded = round_trip("bf16", {"v": value})["v"]
    assert decoded.view(np.uint32)[0] == bfloat16_bits << 16


def test_bf16_rejects_values_rounding_to_infinity():
    value = np.array([0x7F7FFFFF], dtype=np.uint32).view(np.float32)

    with pytest.raises(ValueError, match="'huge'.*bfloat16 range"):
        UpdateCodec("bf16").encode({"huge": value}, 0)


# --- thresh ------------------------------------------------------------------------


def test_thresh_keeps_exactly_entries_at_or_above_tau(rng):
    values = rng.standard_normal((30, 40)).astype(np.float32)
    values[0, 0] = 1.5  # exactly TAU is kept

    decoded = round_trip("thresh:1.5", {"w": values})["w"]

    keep = np.abs(values) >= 1.5
    np.testing.assert_array_equal(decoded[keep], values[keep])
    assert not decoded[~keep].any()
    assert decoded[0, 0] == np.float32(1.5)


def test_thresh_compares_tau_exactly_not_in_float32():
    # 0.1 as a double lies below float32(0.1), so float32(0.1) is kept; the
    # largest float32 below it is not.
    below = np.nextafter(np.float32(0.1), np.float32(0))
    values = np.array([np.float32(0.1), below], np.float32)

    decoded = round_trip("thresh:0.1", {"v": values})["v"]

    assert decoded.tolist() == [np.float32(0.1), 0.0]


def test_thresh_with_quantizer_and_empty_tensors(rng):
    update = {
        "w": (rng.standard_normal(200) * 3).astype(np.float32),
        "quiet": np.full(5, 0.01, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(4.0, np.float32),
    }

    decoded = round_trip("thresh:2.0,q:8", update)

    keep = np.abs(update["w"]) >= 2.0
    step = (update["w"][keep].max() - update["w"][keep].min()) / 255
    assert np.all(np.abs(decoded["w"][keep] - update["w"][keep]) <= step * 1.0001)
    assert not decoded["w"][~keep].any()
    assert not decoded["quiet"].any()
    assert decoded["empty"].shape == (0, 3)
    assert decoded["scalar"] == np.float32(4.0)


def test_thresh_uses_canonical_index_coding():
    values = np.zeros(80, np.float32)
    values[[3, 50]] = 9.0
    dense = np.full(80, 9.0, np.float32)

    sparse_payload = UpdateCodec("thresh:1.0").encode({"v": values}, 0)
    dense_payload = UpdateCodec("thresh:1.0").encode({"v": dense}, 0)

    # Two indices: 2 varint bytes beat the 10-byte bitmap; all 80: the bitmap wins.
    assert struct.pack("<IBI", 2, 0, 2) + bytes([3, 47]) in sparse_payload
    assert struct.pack("<IBI", 80, 1, 10) + b"\xff" * 10 in dense_payload


# --- randk -------------------------------------------------------------------------


def reference_random_k(seed, numel, k):
    """Random-k subset, one candidate at a time, written from docs/wire-format.md."""
    mask64 = 2**64 - 1
    if k >= numel:
        return set(range(numel))
    if k == 0:
        return set()
    drop = 2 * k > numel
    target = numel - k if drop else k
    chosen, j = [], 0
    seen = set()
    while len(chosen) < target:
        z = (seed + (j + 1) * 0x9E3779B97F4A7C15) & mask64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        z ^= z >> 31
        j += 1
        m = (z >> 32) * numel
        if (m & 0xFFFFFFFF) < (2**32 % numel):
            continue
        index = m >> 32
        if index not in seen:
            seen.add(index)
            chosen.append(index)
    return set(range(numel)) - seen if drop else seen


@pytest.mark.parametrize(
    ("seed", "numel", "k"),
    [(0, 10, 3), (1, 10, 7), (2**64 - 1, 1000, 10), (12345, 1000, 600), (7, 3, 1), (99, 70_000, 40), (5, 2, 1)],
)
def test_random_k_mask_matches_documented_algorithm(seed, numel, k):
    mask = random_k_mask(seed, numel, k)

    assert int(mask.sum()) == k
    assert set(np.flatnonzero(mask).tolist()) == reference_random_k(seed, numel, k)


def test_splitmix64_known_values():
    # First outputs for seed 0, the reference values of SplitMix64.
    assert splitmix64(0, 0, 3).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_randk_keeps_k_per_tensor_scaled(rng):
    update = {"w": (rng.standard_normal((20, 50)) + 3).astype(np.float32), "b": np.ones(7, np.float32)}

    payload = UpdateCodec("randk:0.1").encode(update, 11)
    decoded = decode_update(payload, shapes_of(update))

    for name, k in (("w", 100), ("b", 1)):
        kept = np.flatnonzero(decoded[name].reshape(-1))
        assert kept.size == k
        scale = np.float32(update[name].size / k)
        np.testing.assert_array_equal(decoded[name].reshape(-1)[kept], update[name].reshape(-1)[kept] * scale)


def test_randk_indices_not_sent(rng):
    update = {"w": rng.standard_normal(100_000).astype(np.float32)}

    payload = UpdateCodec("randk:0.01").encode(update, 0)

    # Seed and k (12 bytes) plus 1000 float32 values, no index bytes.
    header = 4 + 1 + 2 + len("randk:0.01") + 4 + 2 + 1 + 1 + 4 + 1 + 4
    assert len(payload) == header + 12 + 4000 + 4


def test_randk_unbiased_and_uniform_over_seeds():
    values = np.linspace(-1, 2, 12, dtype=np.float32)
    codec = UpdateCodec("randk:0.25")
    seeds = 3000

    total = np.zeros(values.size)
    kept = np.zeros(values.size)
    for seed in range(seeds):
        decoded = decode_update(codec.encode({"v": values}, seed), {"v": values.shape})["v"]
        total += decoded
        kept += decoded != 0

    # Each entry is kept with probability 3 / 12 and then decodes as 4 x, so
    # one draw has standard deviation sqrt(3) |x|.
    tolerance = 6 * math.sqrt(3) * np.abs(values) / math.sqrt(seeds) + 1e-6
    assert np.all(np.abs(total / seeds - values) <= tolerance)
    nonzero = values != 0
    frequencies = kept[nonzero] / seeds
    assert np.all(np.abs(frequencies - 0.25) <= 6 * math.sqrt(0.25 * 0.75 / seeds))


def test_randk_fraction_one_and_empty_tensor(rng):
    update = {"w": rng.standard_normal((3, 4)).astype(np.float32), "e": np.zeros((0,), np.float32)}

    decoded = round_trip("randk:1.0", update)

    np.testing.assert_array_equal(decoded["w"], update["w"])
    assert decoded["e"].shape == (0,)


def test_randk_large_k_is_fast_enough(rng):
    # A half-dense random-k of a million entries must not loop per element.
    values = rng.standard_normal(1_000_000).astype(np.float32)

    decoded = round_trip("randk:0.5,q:8", {"v": values})["v"]

    assert np.count_nonzero(decoded) <= 500_000


# --- zstd --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["none", "q:4", "topk:0.05,q:8", "thresh:1.0,ternary", "randk:0.2,qsgd:7", "bf16"])
def test_zstd_wraps_each_body_losslessly(rng, spec):
    update = {"w": rng.standard_normal((40, 25)).astype(np.float32), "s": np.array(2.0, np.float32)}
    zstd_spec = "zstd" if spec == "none" else f"{spec},zstd:7"

    plain = UpdateCodec(spec).encode(update, 4)
    packed = UpdateCodec(zstd_spec).encode(update, 4)

    for name in update:
        np.testing.assert_array_equal(
            decode_update(packed, shapes_of(update))[name], decode_update(plain, shapes_of(update))[name]
        )
    # Each body is one zstandard frame of the body the plain pipeline writes.
    plain_bodies = [record.body for record in _records(plain, update)]
    packed_bodies = [record.body for record in _records(packed, update)]
    assert [zstandard.ZstdDecompressor().decompress(bytes(body)) for body in packed_bodies] == [
        bytes(body) for body in plain_bodies
    ]


def test_zstd_shrinks_sparse_quantized_update(rng):
    values = np.where(rng.random(100_000) < 0.05, rng.standard_normal(100_000), 0).astype(np.float32)

    plain = UpdateCodec("qsgd:3").encode({"v": values}, 0)
    packed = UpdateCodec("qsgd:3,zstd").encode({"v": values}, 0)

    assert len(packed) < 0.5 * len(plain)


def _records(payload, update):
    reader = PayloadReader(payload)
    reader.read_header()
    return list(reader.read_records(shapes_of(update)))


# --- declared properties and spec parsing of the new stages ------------------------


@pytest.mark.parametrize(
    ("spec", "unbiased", "feedback", "commutes"),
    [
        ("none", True, False, True),
        ("q:8", True, False, False),
        ("q:8:nearest", False, True, False),
        ("qsgd:15", True, False, False),
        ("sign", False, True, False),
        ("topk:0.1,ternary", False, True, False),
        ("fp16", False, False, True),
        ("bf16,zstd", False, False, False),
        ("randk:0.1", True, False, False),
        ("randk:0.1,qsgd:3", True, False, False),
        ("thresh:0.5,q:4", False, True, False),
        ("zstd", True, False, False),
    ],
)
def test_new_stage_declared_properties(spec, unbiased, feedback, commutes):
    codec = UpdateCodec(spec)

    assert codec.unbiased is unbiased
    assert codec.error_feedback_advised is feedback
    assert codec.decode_commutes_with_sum is commutes
    for stage in codec.stages:
        assert isinstance(stage.unbiased, bool)
        assert isinstance(stage.decode_needs_shape, bool)
        assert isinstance(stage.decode_commutes_with_sum, bool)


@pytest.mark.parametrize(
    ("text", "canonical", "names"),
    [
        ("q:8:nearest", "q:8:nearest", ("q",)),
        ("q:8:256:nearest", "q:8:256:nearest", ("q",)),
        ("q:8:stochastic", "q:8", ("q",)),
        ("q:8:64:stochastic", "q:8:64", ("q",)),
        ("qsgd:15", "qsgd:15", ("qsgd",)),
        ("qsgd:1:512", "qsgd:1:512", ("qsgd",)),
        ("sign", "sign", ("sign",)),
        ("topk:0.01,ternary", "topk:0.01,ternary", ("topk", "ternary")),
        ("randk:0.1, ternary, zstd:19", "randk:0.1,ternary,zstd:19", ("randk", "ternary", "zstd")),
        ("fp16", "fp16", ("fp16",)),
        ("bf16,zstd:3", "bf16,zstd", ("bf16", "zstd")),
        ("randk:.5,q:4", "randk:0.5,q:4", ("randk", "q")),
        ("thresh:1e-3,qsgd:7", "thresh:0.001,qsgd:7", ("thresh", "qsgd")),
        ("thresh:2", "thresh:2.0", ("thresh",)),
        ("zstd", "zstd", ("none", "zstd")),
        ("none,zstd:1", "zstd:1", ("none", "zstd")),
        ("float32,zstd", "zstd", ("none", "zstd")),
        ("topk:0.01:tensor,q:4:nearest,zstd:9", "topk:0.01:tensor,q:4:nearest,zstd:9", ("topk", "q", "zstd")),
        ("topk:0.1,zstd", "topk:0.1,zstd", ("topk", "zstd")),
    ],
)
def test_spec_parses_new_stages(text, canonical, names):
    spec = parse_compression_spec(text)

    assert spec.canonical() == canonical
    assert spec.stage_names == names
    assert parse_compression_spec(canonical) == spec
    # Float32 values are a stage named "none" that the spec text leaves out after a sparsifier.
    built = [stage.name for stage in UpdateCodec(spec).stages if stage.name != "none"]
    assert built == [name for name in names if name != "none"]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("ternary", ["'ternary'", "needs one before it", "'sign'"]),
        ("ternary,zstd", ["'ternary'", "needs one before it"]),
        ("q:8,sign", ["exactly one value coder", "'q' and 'sign'"]),
        ("fp16,bf16", ["exactly one value coder"]),
        ("qsgd:4,q:4", ["exactly one value coder"]),
        ("topk:0.1,randk:0.1", ["at most one sparsifier", "'topk' and 'randk'"]),
        ("thresh:1,topk:0.1", ["at most one sparsifier"]),
        ("zstd,q:8", ["'q' must come before 'zstd'"]),
        ("q:8,zstd,zstd", ["more than once"]),
        ("sign,topk:0.1", ["'topk' must come before 'sign'"]),
        ("topk:0.1,sign", ["sparse ternary compression", "'ternary'"]),
        ("randk:0.1:tensor", ["takes no scope word"]),
        ("randk:0.1:model", ["takes no scope word"]),
        ("randk:0", ["(0, 1]"]),
        ("randk", ["randk:FRACTION"]),
        ("thresh:0", ["above 0"]),
        ("thresh:-1", ["not a positive decimal"]),
        ("thresh:inf", ["not a positive decimal"]),
        ("thresh:1e999", ["above 0 and finite"]),
        ("thresh", ["thresh:TAU"]),
        ("q:8:nearest:4", ["q:BITS:BLOCK:nearest", "3 argument(s)"]),
        ("q:8:round", ["block size 'round'"]),
        ("q:8:4:2:nearest", ["q:BITS:BLOCK:nearest", "3 argument(s)"]),
        ("q:nearest", ["q:BITS", "0 argument(s)"]),
        ("qsgd:0", ["levels 0", "1..127"]),
        ("qsgd:128", ["levels 128", "1..127"]),
        ("qsgd:4:1", ["block size 1"]),
        ("qsgd:4:nearest", ["block size 'nearest'"]),
        ("zstd:0", ["zstd level 0", "1..19"]),
        ("zstd:20", ["zstd level 20"]),
        ("zstd:3:1", ["zstd:LEVEL"]),
        ("sign:2", ["expected the form 'sign'"]),
        ("fp16:1", ["expected the form 'fp16'"]),
        ("none,sign", ["'none' cannot be combined"]),
        ("topk:0.1,none", ["'none' cannot be combined", "leave the value coder out"]),
        ("none,zstd,q:8", ["'none' cannot be combined", "except a final 'zstd'"]),
    ],
)
def test_spec_rejects_invalid_new_stages(text, fragments):
    with pytest.raises(ValueError) as raised:
        parse_compression_spec(text)

    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, message


def test_spec_model_rejects_impossible_combinations():
    with pytest.raises(ValueError, match="needs one before it"):
        CompressionSpec(coder="ternary")
    with pytest.raises(ValueError, match="exactly one value coder"):
        CompressionSpec(bits=8, qsgd_levels=4)
    with pytest.raises(ValueError, match="at most one sparsifier"):
        CompressionSpec(topk_fraction=0.1, threshold=1.0)
    with pytest.raises(ValueError, match="rounding 'nearest' needs bits"):
        CompressionSpec(rounding="nearest")
    with pytest.raises(ValueError, match="write 'ternary'"):
        CompressionSpec(randk_fraction=0.1, coder="sign")
    assert CompressionSpec(qsgd_levels=4, block_size=64).canonical() == "qsgd:4:64"
    assert CompressionSpec.model_validate("bf16,zstd:9") == CompressionSpec(coder="bf16", zstd_level=9)


# --- per-layer rules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "selectors"),
    [
        ("topk:0.01,q:8;bias=none", "topk:0.01,q:8;bias=none", ("bias",)),
        (" topk:0.01 , q:8 ; bias = none ; *.norm* = q:8 ", "topk:0.01,q:8;bias=none;*.norm*=q:8", ("bias", "*.norm*")),
        ("q:4;small:0100=none;vector=fp16", "q:4;small:100=none;vector=fp16", ("small:100", "vector")),
        ("lowrank:2;conv?.weight=q:8,zstd:3", "lowrank:2;conv?.weight=q:8,zstd", ("conv?.weight",)),
        ("none;[b]ias=q:8", "none;[b]ias=q:8", ("[b]ias",)),
    ],
)
def test_rules_parse_and_canonical_round_trip(text, canonical, selectors):
    spec = parse_compression_spec(text)

    assert spec.canonical() == canonical
    assert tuple(rule.selector for rule in spec.rules) == selectors
    assert parse_compression_spec(canonical) == spec
    assert CompressionSpec.model_validate(canonical) == spec
    assert spec.default_pipeline.rules == ()


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("q:8;", ["rule 1", "the rule is empty"]),
        ("q:8;bias", ["rule 1 'bias'", "has no '='"]),
        ("q:8;=none", ["the selector is empty"]),
        ("q:8;bias:1=none", ["'bias' takes no argument"]),
        ("q:8;small=none", ["'small:N' needs N"]),
        ("q:8;small:0=none", ["'small:N' needs N", "got '0'"]),
        ("q:8;small:x=none", ["'small:N' needs N"]),
        ("q:8;a b=none", ["contains whitespace"]),
        ("q:8;bias=q:9", ["bits 9 is outside"]),
        ("q:8;bias=", ["the spec is empty"]),
        ("q:8;bias=none;bias=q:4", ["rule 2 repeats selector 'bias' of rule 1"]),
        ("q:8;small:010=none;small:10=q:4", ["rule 2 repeats selector 'small:10'"]),
        ("q:8;x=none=q:4", ["unknown stage 'none=q'"]),
    ],
)
def test_rules_reject_invalid(text, fragments):
    with pytest.raises(ValueError) as raised:
        parse_compression_spec(text)

    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, message


def test_rules_model_validation():
    inner = {"selector": "x", "pipeline": {"bits": 8}}
    with pytest.raises(ValueError, match="has rules of its own"):
        CompressionSpec(rules=[{"selector": "bias", "pipeline": {"bits": 8, "rules": [inner]}}])
    with pytest.raises(ValueError, match="selector 'small:N' needs N"):
        CompressionSpec(rules=[{"selector": "small:-1", "pipeline": {}}])
    spec = CompressionSpec(bits=4, rules=[{"selector": "small:007", "pipeline": {}}])
    assert spec.canonical() == "q:4;small:7=none"


def test_rule_resolution_first_match_wins():
    spec = parse_compression_spec("q:4;bias=none;vector=fp16;small:10=q:8;*.norm*=bf16")

    assert spec.pipeline_for("fc.bias", (5,))[0] == 1
    assert spec.pipeline_for("fc.bias", (3, 3))[0] == 3  # not 1-d, and 9 elements < 10
    assert spec.pipeline_for("fc.bias", (5, 2))[0] == 0  # 10 elements is not fewer than 10
    assert spec.pipeline_for("bn.weight", (64,))[0] == 2
    assert spec.pipeline_for("scale", ())[0] == 2
    assert spec.pipeline_for("w", (3, 3))[0] == 3
    assert spec.pipeline_for("layer.norm.weight", (8, 8))[0] == 4
    assert spec.pipeline_for("Layer.NORM.weight", (8, 8))[0] == 0  # globs are case-sensitive
    assert spec.pipeline_for("conv.weight", (8, 8))[0] == 0
    assert spec.pipeline_for("conv.weight", (8, 8))[1] == parse_compression_spec("q:4")


def test_rules_send_bias_exactly_and_weights_compressed(rng):
    update = {
        "conv.weight": rng.standard_normal((16, 3, 5)).astype(np.float32),
        "conv.bias": rng.standard_normal(16).astype(np.float32),
        "bn.weight": rng.standard_normal(16).astype(np.float32),
        "fc.weight": rng.standard_normal((6, 64)).astype(np.float32),
        "fc.bias": rng.standard_normal(6).astype(np.float32),
    }
    spec = "topk:0.1,q:4;bias=none;bn.*=q:8"
    decoded = round_trip(spec, update, seed=5)

    np.testing.assert_array_equal(decoded["conv.bias"], update["conv.bias"])
    np.testing.assert_array_equal(decoded["fc.bias"], update["fc.bias"])
    step = quantization_step(update["bn.weight"], 8)
    assert np.all(np.abs(decoded["bn.weight"] - update["bn.weight"]) <= step * 1.0001)
    assert np.count_nonzero(decoded["bn.weight"]) == 16

    # The weights share one model-scope top-k: 10 % of their 624 entries.
    weights = ("conv.weight", "fc.weight")
    kept = sum(np.count_nonzero(decoded[name]) for name in weights)
    assert kept == math.ceil(0.1 * (240 + 384))

    # The payload header carries the whole spec.
    reader = PayloadReader(UpdateCodec(spec).encode(update, 5))
    assert reader.read_header() == spec


def test_model_topk_ranks_only_default_governed_tensors():
    # The bias contains the largest entries. Under a rule it takes none of the
    # weights' top-k budget, so the weights' k counts only their own entries.
    update = {
        "w": np.arange(1, 101, dtype=np.float32).reshape(10, 10),
        "v": -np.arange(1, 11, dtype=np.float32),
        "bias": np.full(50, 1000.0, dtype=np.float32),
    }
    decoded = round_trip("topk:0.1;bias=none", update)

    np.testing.assert_array_equal(decoded["bias"], update["bias"])
    kept_w = np.flatnonzero(decoded["w"])
    kept_v = np.flatnonzero(decoded["v"])
    assert kept_w.size + kept_v.size == 11  # ceil(0.1 * 110), not ceil(0.1 * 160)
    np.testing.assert_array_equal(kept_w, np.arange(89, 100))
    assert kept_v.size == 0

    # Without the rule the bias wins the whole budget.
    decoded = round_trip("topk:0.1", update)
    assert np.count_nonzero(decoded["w"]) == 0
    assert np.count_nonzero(decoded["bias"]) == 16


def test_topk_inside_rule_ranks_rule_tensors(rng):
    update = {
        "a.weight": rng.standard_normal((20, 20)).astype(np.float32),
        "b.weight": 100 * rng.standard_normal((20, 20)).astype(np.float32),
        "a.bias": rng.standard_normal(20).astype(np.float32),
        "b.bias": 100 * rng.standard_normal(20).astype(np.float32),
    }
    decoded = round_trip("q:8;bias=topk:0.25", update)

    kept = {name: np.count_nonzero(decoded[name]) for name in ("a.bias", "b.bias")}
    assert kept["a.bias"] + kept["b.bias"] == 10
    assert kept["b.bias"] >= 9
    assert np.count_nonzero(decoded["a.weight"]) == 400


def test_rules_codec_properties_cover_every_pipeline():
    assert UpdateCodec("q:8;bias=none").unbiased is True
    assert UpdateCodec("q:8;bias=q:8:nearest").unbiased is False
    assert UpdateCodec("none;w*=lowrank:2").error_feedback_advised is True
    # stages lists the default pipeline only, as before rules existed.
    assert [stage.name for stage in UpdateCodec("q:8;bias=none").stages] == ["q"]


# --- low-rank ----------------------------------------------------------------------


def low_rank_matrix(rng, shape, rank):
    rows, columns = shape[0], math.prod(shape[1:])
    matrix = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, columns))
    return matrix.reshape(shape).astype(np.float32)


@pytest.mark.parametrize(("shape", "rank"), [((64, 32, 5), 1), ((64, 64, 5), 2), ((40, 30), 4), ((6, 64), 2)])
def test_lowrank_exact_for_rank_r_matrix(rng, shape, rank):
    update = {"w": low_rank_matrix(rng, shape, rank)}
    decoded = round_trip(f"lowrank:{rank}", update, seed=3)

    scale = np.max(np.abs(update["w"]))
    np.testing.assert_allclose(decoded["w"], update["w"], rtol=0, atol=1e-5 * scale)


def test_lowrank_error_decreases_with_rank(rng):
    update = {"w": rng.standard_normal((64, 160)).astype(np.float32)}
    # A decaying spectrum, as weight updates have, so that rank matters.
    update["w"] = (update["w"] * np.linspace(1, 0.01, 160)[None, :] ** 2).astype(np.float32)
    errors = []
    for rank in (1, 2, 4, 8, 16):
        decoded = round_trip(f"lowrank:{rank}", update, seed=1)
        errors.append(np.linalg.norm(decoded["w"] - update["w"]))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("seed", range(5))
def test_lowrank_near_svd_with_heavy_tail(rng, seed):
    # Two strong directions over 62 weak ones. A sketch without subspace
    # iterations mixes the tail into its span and loses 1.3 to 1.7 times the
    # optimal norm here.
    left, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    right, _ = np.linalg.qr(rng.standard_normal((320, 64)))
    singular_values = np.r_[10.0, 9.0, np.ones(62)]
    update = {"w": ((left * singular_values) @ right.T).astype(np.float32)}

    decoded = round_trip("lowrank:2", update, seed=seed)

    optimal_error = np.sqrt(np.sum(singular_values[2:] ** 2))
    assert np.linalg.norm(decoded["w"] - update["w"]) <= 1.01 * optimal_error


def test_lowrank_body_holds_p_and_q_as_float32(rng):
    update = {"w": rng.standard_normal((32, 6, 5)).astype(np.float32)}
    payload = UpdateCodec("lowrank:2").encode(update, 0)
    (record,) = _records(payload, update)

    assert len(record.body) == 4 * 2 * (32 + 30)
    left = np.frombuffer(record.body, dtype="<f4", count=64).reshape(32, 2)
    right = np.frombuffer(record.body, dtype="<f4", offset=256).reshape(30, 2)
    np.testing.assert_allclose(left.T @ left, np.eye(2), atol=1e-5)  # P is orthonormal
    decoded = decode_update(payload, shapes_of(update))["w"]
    np.testing.assert_allclose(decoded.reshape(32, 30), left @ right.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("bias", (16,)), ("scalar", ()), ("square", (4, 4)), ("thin", (3, 2)), ("empty", (0, 5)), ("rank", (5, 8))],
)
def test_lowrank_falls_back_to_dense_value_coder(rng, name, shape):
    # Rank 2: (4, 4) gives 16 >= 16 values, (3, 2) 10 >= 6, (5, 8) 26 >= 40 is false.
    update = {name: rng.standard_normal(shape).astype(np.float32)}
    payload = UpdateCodec("lowrank:2").encode(update, 0)
    (record,) = _records(payload, update)
    numel = math.prod(shape)

    if shape == (5, 8):
        assert len(record.body) == 4 * 2 * (5 + 8)
        return
    assert len(record.body) == 4 * numel
    np.testing.assert_array_equal(decode_update(payload, shapes_of(update))[name], update[name])


def test_lowrank_with_value_coder_and_zstd(rng):
    update = {
        "w": low_rank_matrix(rng, (64, 64, 5), 2),
        "b": rng.standard_normal(64).astype(np.float32),
    }
    decoded = round_trip("lowrank:2,q:8,zstd", update, seed=2)

    scale = np.max(np.abs(update["w"]))
    assert np.max(np.abs(decoded["w"] - update["w"])) < 0.05 * scale
    step = quantization_step(update["b"], 8)
    assert np.all(np.abs(decoded["b"] - update["b"]) <= step * 1.0001)


def test_lowrank_deterministic_and_declared_biased(rng):
    update = {"w": rng.standard_normal((20, 30)).astype(np.float32)}
    codec = UpdateCodec("lowrank:3,fp16")

    assert codec.encode(update, 4) == codec.encode(update, 4)
    assert codec.encode(update, 4) != codec.encode(update, 5)
    assert codec.unbiased is False
    assert codec.error_feedback_advised is True
    assert [stage.name for stage in codec.stages] == ["lowrank", "fp16"]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("lowrank", ["lowrank:RANK"]),
        ("lowrank:0", ["rank 0 is outside", "1..65535"]),
        ("lowrank:2.5", ["rank '2.5' is not an integer"]),
        ("lowrank:2,sign", ["'sign' cannot code low-rank factors"]),
        ("lowrank:2,ternary", ["'ternary' cannot code low-rank factors"]),
        ("topk:0.1,lowrank:2", ["at most one sparsifier"]),
        ("q:8,lowrank:2", ["'lowrank' must come before 'q'"]),
    ],
)
def test_lowrank_spec_rejects_invalid(text, fragments):
    with pytest.raises(ValueError) as raised:
        parse_compression_spec(text)
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)


def test_lowrank_spec_parses():
    spec = parse_compression_spec("lowrank:4, qsgd:15:64 ,zstd")
    assert spec.canonical() == "lowrank:4,qsgd:15:64,zstd"
    assert spec.stage_names == ("lowrank", "qsgd", "zstd")
    with pytest.raises(ValueError, match="cannot code low-rank factors"):
        CompressionSpec(lowrank_rank=2, coder="sign")


# --- sampled top-k selection -------------------------------------------------------


def exact_top_k(magnitudes, k):
    order = np.lexsort((np.arange(magnitudes.size), -magnitudes))
    return np.sort(order[:k])


@pytest.mark.parametrize("distribution", ["gaussian", "student_t", "ties"])
@pytest.mark.parametrize("k", [1, 37, 2_000, 300_000])
def test_sampled_selection_equals_exact_top_k(distribution, k):
    from pocketfl.compression.stages import SAMPLED_SELECTION_MIN, _largest_magnitudes, _rank_all

    rng = np.random.default_rng(k)
    size = SAMPLED_SELECTION_MIN + 12_345
    if distribution == "gaussian":
        values = rng.standard_normal(size)
    elif distribution == "student_t":
        values = rng.standard_t(1.5, size)
    else:
        values = rng.integers(0, 50, size)  # heavy ties at every threshold
    magnitudes = np.abs(values).astype(np.float32)

    kept = _largest_magnitudes(magnitudes, k, seed=9)

    assert kept.size == k
    np.testing.assert_array_equal(kept, _rank_all(magnitudes, k))
    if k <= 2_000:
        np.testing.assert_array_equal(kept, exact_top_k(magnitudes, k))


def test_sampled_selection_falls_back_when_sample_misses(monkeypatch):
    from pocketfl.compression import stages

    # A negative margin puts the sampled threshold above the k-th magnitude
    # (a miss the 6-sigma margin makes rare); the full partition must then run.
    rng = np.random.default_rng(1)
    magnitudes = rng.permutation(stages.SAMPLED_SELECTION_MIN).astype(np.float32)
    k = 1_000
    monkeypatch.setattr(stages, "_SAMPLE_MARGIN_SIGMAS", -30.0)
    assert stages._sampled_candidates(magnitudes, k, seed=0) is None

    kept = stages._largest_magnitudes(magnitudes, k, seed=0)
    np.testing.assert_array_equal(kept, exact_top_k(magnitudes, k))


def test_sampled_selection_candidates_bound_and_miss_returns_none():
    from pocketfl.compression.stages import SAMPLED_SELECTION_MIN, _sampled_candidates

    rng = np.random.default_rng(0)
    magnitudes = np.abs(rng.standard_normal(SAMPLED_SELECTION_MIN)).astype(np.float32)
    k = 10_000
    candidates = _sampled_candidates(magnitudes, k, seed=1)
    # At least k, and not many more: the 6-sigma margin on 65536 samples.
    assert k <= candidates.size <= 1.5 * k
    assert np.all(np.diff(candidates) > 0)
    # k close to the size leaves no room for a margin.
    assert _sampled_candidates(magnitudes, magnitudes.size - 1, seed=1) is None


def test_large_tensor_topk_payload_same_as_full_partition(rng, monkeypatch):
    from pocketfl.compression import stages

    update = {"w": rng.standard_normal(stages.SAMPLED_SELECTION_MIN + 7).astype(np.float32), "b": np.ones(3, np.float32)}
    for spec in ("topk:0.001,q:8", "topk:0.01:tensor"):
        sampled = UpdateCodec(spec).encode(update, 3)
        monkeypatch.setattr(stages, "SAMPLED_SELECTION_MIN", 1 << 40)
        exact = UpdateCodec(spec).encode(update, 3)
        monkeypatch.undo()
        assert sampled == exact
