"""CompressedFedAvg.aggregate_train on hand-made replies, without a Flower run."""

from types import SimpleNamespace

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from pocketfl.compression import UpdateCodec
from pocketfl.strategies import CompressedFedAvg

SHAPES = {"w": (4,)}


def _reply(update: np.ndarray, num_examples: int, node_id: int, spec: str = "none"):
    # Flower's Message needs a running app to be built, so a stand-in carries
    # the parts that aggregate_train reads: content, metadata and has_error.
    payload = UpdateCodec(spec).encode({"w": update}, seed=0)
    metrics = {"num-examples": num_examples, "train-loss": 0.1, "train-seconds": 0.1, "payload-bytes": len(payload)}
    content = RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord(metrics)})
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node_id), has_error=lambda: False)


def _strategy(uplink: str | None = None) -> CompressedFedAvg:
    strategy = CompressedFedAvg(uplink=uplink)
    strategy._global = {"w": np.full(4, 0.5, dtype=np.float32)}
    return strategy


def test_weighted_mean_applied_to_global():
    strategy = _strategy()
    replies = [_reply(np.full(4, 1.0, np.float32), 1, 1), _reply(np.full(4, 4.0, np.float32), 3, 2)]

    arrays, metrics = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 0.5 + 13 / 4))
    assert metrics["train-loss"] == 0.1
    assert strategy.traffic[1].clients == 2


def test_huge_weighted_update_does_not_overflow_sum():
    strategy = _strategy()
    largest = np.finfo(np.float32).max
    reply = _reply(np.array([largest, 0, 0, 0], np.float32), 10_000_000, 1)

    arrays, _ = strategy.aggregate_train(1, [reply])

    assert np.isfinite(arrays["w"].numpy()).all()


def test_non_finite_aggregate_keeps_previous_global():
    strategy = _strategy()
    strategy._global = {"w": np.full(4, np.finfo(np.float32).max, dtype=np.float32)}
    reply = _reply(np.full(4, np.finfo(np.float32).max, np.float32), 5, 1)

    arrays, metrics = strategy.aggregate_train(1, [reply])

    assert arrays is None
    assert metrics is None


def test_other_uplink_pipeline_dropped():
    strategy = _strategy(uplink="topk:0.5,q:8")
    honest = _reply(np.arange(4, dtype=np.float32), 2, 1, spec="topk:0.5,q:8")
    float32 = _reply(np.arange(4, dtype=np.float32), 2, 2, spec="none")

    arrays, _ = strategy.aggregate_train(1, [honest, float32])

    assert arrays is not None
    assert strategy.traffic[1].clients == 1
    assert strategy.traffic[1].failed_clients == 1
