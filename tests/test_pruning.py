"""Pruning masks, their wire form, compact updates, training under a mask, channel removal."""

import numpy as np
import pytest
import torch

from pocketfl.compression.pruning import (
    apply_mask,
    channel_mask,
    compact,
    compact_shapes,
    expand,
    magnitude_mask,
    mask_sparsity,
    masked_training,
    pack_mask,
    scheduled_sparsity,
    unpack_mask,
)
from pocketfl.compression.structured import shrink_channels
from pocketfl.tasks.har.model import CHANNEL_CHAIN, build_model
from pocketfl.tasks.har.training import train


def _weights(model):
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}


def test_schedule_rises_to_target_and_stays():
    values = [scheduled_sparsity(r, 0.8, 10) for r in range(0, 15)]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values[:10], values[1:11]))
    assert values[10:] == [pytest.approx(0.8)] * 5


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_mask_prunes_smallest_weights(scope):
    weights = _weights(build_model(seed=0))
    mask = magnitude_mask(weights, 0.8, scope)

    assert set(mask) == {name for name, values in weights.items() if values.ndim >= 2}
    assert mask_sparsity(mask) == pytest.approx(0.8, abs=1e-3)
    for name, kept in mask.items():
        magnitudes = np.abs(weights[name])
        if scope == "layer":
            assert kept.mean() == pytest.approx(0.2, abs=1e-2)
            assert magnitudes[kept].min() >= magnitudes[~kept].max()


def test_global_mask_is_one_threshold_across_layers():
    weights = _weights(build_model(seed=1))
    mask = magnitude_mask(weights, 0.5, "global")
    kept_min = min(np.abs(weights[name][kept]).min() for name, kept in mask.items())
    pruned_max = max(np.abs(weights[name][~kept]).max() for name, kept in mask.items())
    assert kept_min >= pruned_max


def test_mask_of_pruned_model_keeps_pruned_entries():
    weights = _weights(build_model(seed=2))
    first = magnitude_mask(weights, 0.5)
    second = magnitude_mask(apply_mask(weights, first), 0.7)
    for name in first:
        assert not (second[name] & ~first[name]).any()


def test_pack_unpack_round_trip_and_rejects_bad_sizes():
    weights = _weights(build_model(seed=0))
    shapes = {name: values.shape for name, values in weights.items()}
    mask = magnitude_mask(weights, 0.6)
    names, blobs = pack_mask(mask)

    restored = unpack_mask(names, blobs, shapes)
    assert all(np.array_equal(restored[name], mask[name]) for name in mask)
    assert sum(len(blob) for blob in blobs) == sum(-(-kept.size // 8) for kept in mask.values())

    with pytest.raises(ValueError, match="bytes"):
        unpack_mask(names, [blobs[0][:-1]] + blobs[1:], shapes)
    with pytest.raises(ValueError, match="does not have"):
        unpack_mask(["nope"], blobs[:1], shapes)


def test_compact_expand_round_trip():
    weights = _weights(build_model(seed=0))
    shapes = {name: values.shape for name, values in weights.items()}
    mask = magnitude_mask(weights, 0.75)

    compacted = compact(weights, mask)
    assert {name: values.shape for name, values in compacted.items()} == compact_shapes(shapes, mask)
    assert sum(values.size for values in compacted.values()) < 0.3 * sum(v.size for v in weights.values())
    restored = expand(compacted, mask, shapes)
    expected = apply_mask(weights, mask)
    assert all(np.array_equal(restored[name], expected[name]) for name in weights)


def test_training_under_mask_keeps_pruned_entries_zero():
    model = build_model(seed=0)
    weights = _weights(model)
    mask = magnitude_mask(weights, 0.8)
    model.load_state_dict({name: torch.from_numpy(v) for name, v in apply_mask(weights, mask).items()})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 128)).astype(np.float32)
    y = rng.integers(0, 6, size=64).astype(np.int64)

    with masked_training(model, mask):
        train(model, x, y, epochs=2, learning_rate=0.1, batch_size=16, seed=0)

    trained = _weights(model)
    assert set(trained) == set(weights)
    for name, kept in mask.items():
        assert np.all(trained[name][~kept] == 0)
        assert not np.array_equal(trained[name][kept], weights[name][kept])


def test_channel_mask_and_shrink_give_same_outputs():
    model = build_model(seed=0)
    weights = _weights(model)
    mask = channel_mask(weights, CHANNEL_CHAIN, 0.8)
    assert mask_sparsity(mask) >= 0.8
    model.load_state_dict({name: torch.from_numpy(v) for name, v in apply_mask(weights, mask).items()})

    narrow = shrink_channels(model, CHANNEL_CHAIN)
    dense_count = sum(p.numel() for p in model.parameters())
    narrow_count = sum(p.numel() for p in narrow.parameters())
    assert narrow_count <= 0.21 * dense_count

    x = torch.randn(8, 6, 128)
    torch.testing.assert_close(narrow.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_masked_training_rejects_unknown_parameter():
    with pytest.raises(ValueError, match="not a parameter"):
        with masked_training(build_model(), {"features.9.weight": np.ones((2, 2), bool)}):
            pass
