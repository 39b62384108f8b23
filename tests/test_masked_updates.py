"""Pruned updates on the wire: compacted tensors, and full-shape ones that low-rank factors."""

import numpy as np
import pytest

from pocketfl.compression import DecodeError, UpdateCodec, decode_update, parse_compression_spec
from pocketfl.compression.masked_updates import (
    compact_for_uplink,
    compacted_mask,
    decode_masked_update,
    expand_from_uplink,
)
from pocketfl.compression.pruning import compact, compact_shapes, expand

SHAPES = {"conv.weight": (16, 4, 5), "conv.bias": (16,), "fc.weight": (6, 16)}


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def _mask(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.random(SHAPES[name]) < 0.3 for name in ("conv.weight", "conv.bias")}


@pytest.mark.parametrize(
    ("spec", "compacted"),
    [
        ("lowrank:2,q:4", {"conv.bias"}),
        ("topk:0.1,q:8", {"conv.weight", "conv.bias"}),
        ("q:4", {"conv.weight", "conv.bias"}),
        # A rule that sends the conv weight through top-k compacts it again.
        ("lowrank:2,q:4;conv.weight=topk:0.1,q:8", {"conv.weight", "conv.bias"}),
        # Rank-9 factors of a 16 x 20 matrix (324 values) are not smaller, so it is sent densely.
        ("lowrank:9,q:4", {"conv.weight", "conv.bias"}),
        # Rules are resolved from the full shape first, so the 3-d weight matches no vector rule and is factored.
        ("lowrank:2,q:4;vector=none", {"conv.bias"}),
        # The full weight (320 entries) matches small:400 and is factored, although the default compacts.
        ("topk:0.1,q:8;small:400=lowrank:2,q:4", {"conv.bias"}),
    ],
)
def test_factored_tensors_keep_shape(spec, compacted):
    assert set(compacted_mask(_mask(), parse_compression_spec(spec), SHAPES)) == compacted


def test_lowrank_decode_zeroes_pruned_entries():
    spec = parse_compression_spec("lowrank:2,q:8")
    mask = _mask()
    update = _update()

    sent = compact_for_uplink(update, mask, spec)
    payload = UpdateCodec(spec).encode(sent, seed=3)

    assert sent["conv.weight"].shape == SHAPES["conv.weight"]
    assert sent["conv.bias"].shape == (int(mask["conv.bias"].sum()),)
    assert not sent["conv.weight"][~mask["conv.weight"]].any()

    decoded = decode_masked_update(payload, SHAPES, mask)
    raw = decode_update(payload, {**SHAPES, "conv.bias": sent["conv.bias"].shape})
    # The product of the factors is not zero at pruned entries, so the reader zeroes them.
    assert raw["conv.weight"][~mask["conv.weight"]].any()
    assert not decoded["conv.weight"][~mask["conv.weight"]].any()
    np.testing.assert_array_equal(decoded["conv.weight"][mask["conv.weight"]], raw["conv.weight"][mask["conv.weight"]])
    np.testing.assert_array_equal(decoded["conv.bias"][mask["conv.bias"]], raw["conv.bias"])
    with_spec = decode_masked_update(payload, SHAPES, mask, spec)
    for name in SHAPES:
        np.testing.assert_array_equal(decoded[name], with_spec[name])


def test_lowrank_mask_adds_no_bytes():
    spec = parse_compression_spec("lowrank:2,q:4")
    mask = {"conv.weight": _mask()["conv.weight"]}
    codec = UpdateCodec(spec)

    dense = codec.encode(_update(), seed=0)
    pruned = codec.encode(compact_for_uplink(_update(), mask, spec), seed=0)
    # Compacted, the weight's kept entries (about 96) would go at 4 bits each, not as 2 x (16 + 20) values.
    assert len(pruned) == len(dense)


def test_topk_travels_compacted():
    spec = parse_compression_spec("topk:0.2,q:8")
    mask = _mask()
    update = _update()

    payload = UpdateCodec(spec).encode(compact_for_uplink(update, mask, spec), seed=0)

    expected = expand(decode_update(payload, compact_shapes(SHAPES, mask)), mask, SHAPES)
    decoded = decode_masked_update(payload, SHAPES, mask)
    for name in SHAPES:
        np.testing.assert_array_equal(decoded[name], expected[name])


def test_expand_inverts_compact_on_kept():
    mask = _mask()
    update = _update()
    for text in ("lowrank:2,q:4", "topk:0.1,q:8"):
        spec = parse_compression_spec(text)

        restored = expand_from_uplink(compact_for_uplink(update, mask, spec), mask, spec, SHAPES)

        for name in SHAPES:
            kept_entries = mask.get(name, np.ones(SHAPES[name], dtype=bool))
            np.testing.assert_array_equal(restored[name], np.where(kept_entries, update[name], 0))


def test_truncated_masked_payload_rejected():
    spec = parse_compression_spec("lowrank:2,q:4")
    mask = _mask()
    payload = UpdateCodec(spec).encode(compact_for_uplink(_update(), mask, spec), seed=0)

    with pytest.raises(DecodeError):
        decode_masked_update(payload[:20], SHAPES, mask)
    with pytest.raises(DecodeError):
        decode_masked_update(payload[:-3], SHAPES, mask, spec)


def test_unexpected_pipeline_rejected():
    mask = _mask()
    topk = parse_compression_spec("topk:0.2,q:8")
    payload = UpdateCodec(topk).encode(compact(_update(), mask), seed=0)

    with pytest.raises(DecodeError, match="expected lowrank:2,q:4"):
        decode_masked_update(payload, SHAPES, mask, parse_compression_spec("lowrank:2,q:4"))
