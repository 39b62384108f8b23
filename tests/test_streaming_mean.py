import numpy as np
import pytest

from pocketfl.strategies.streaming import StreamingMean

SHAPES = {"weight": (3, 2), "bias": (2,)}


def _update(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, dtype=np.float32) for name, shape in SHAPES.items()}


def test_weighted_mean_matches_numpy():
    rng = np.random.default_rng(1)
    updates = [
        {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
        for _ in range(5)
    ]
    weights = [3, 1, 4, 1, 5]

    running = StreamingMean(SHAPES)
    for update, weight in zip(updates, weights):
        running.add(update, weight)
    mean = running.mean()

    for name in SHAPES:
        expected = np.average([u[name] for u in updates], axis=0, weights=weights)
        np.testing.assert_allclose(mean[name], expected, rtol=1e-6)
        assert mean[name].dtype == np.float32
    assert running.count == 5
    assert running.total_weight == sum(weights)


def test_empty_mean_raises():
    with pytest.raises(ValueError, match="no update"):
        StreamingMean(SHAPES).mean()


def test_wrong_tensor_names_rejected():
    running = StreamingMean(SHAPES)
    with pytest.raises(ValueError, match="do not match"):
        running.add({"weight": np.zeros((3, 2), np.float32)}, 1)
    assert running.count == 0


@pytest.mark.parametrize("weight", [0, -2])
def test_non_positive_weight_rejected(weight):
    with pytest.raises(ValueError, match="positive"):
        StreamingMean(SHAPES).add(_update(1.0), weight)


def test_small_updates_survive_large_sums():
    # float32 accumulation would drop 1e-4 next to 1e4; the float64 sum keeps it.
    running = StreamingMean({"w": (1,)})
    running.add({"w": np.array([1e4], np.float32)}, 1)
    for _ in range(1000):
        running.add({"w": np.array([1e-4], np.float32)}, 1)
    running.add({"w": np.array([-1e4], np.float32)}, 1)
    assert running.mean()["w"][0] == pytest.approx(1000 * 1e-4 / 1002, rel=1e-3)
