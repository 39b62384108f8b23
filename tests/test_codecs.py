"""Round trips of the codec stages and parsing of pipeline specs."""

import math
from fractions import Fraction

import numpy as np
import pytest

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
from pocketfl.compression.stages import TopK


def shapes_of(update):
    return {name: np.shape(array) for name, array in update.items()}


def round_trip(spec, update, seed=0):
    payload = UpdateCodec(spec).encode(update, seed)
    return decode_update(payload, shapes_of(update))


def quantization_step(values, bits, block_size=None):
    """Return the per-element step (max - min) / (2**bits - 1) of each element's block."""
    flat = values.reshape(-1).astype(np.float64)
    size = flat.size if block_size is None else block_size
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
        ("zip:3", ["'zip:3'", "unknown stage 'zip'", "topk, q, none"]),
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
