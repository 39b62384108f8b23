"""Federated pruning end to end: the strategy's mask, clients under it, declines for memory."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from pocketfl.compression import UpdateCodec
from pocketfl.compression.pruning import compact, magnitude_mask
from pocketfl.server.config import load_run_config
from pocketfl.simulations.engine import simulate
from pocketfl.strategies import CompressedFedAvg


def _reply(delta, node_id, spec="none"):
    payload = UpdateCodec(spec).encode(delta, seed=0)
    metrics = {"num-examples": 10, "train-loss": 0.1, "train-seconds": 0.1, "payload-bytes": len(payload)}
    content = RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord(metrics)})
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node_id), has_error=lambda: False)


def test_aggregation_expands_compact_updates_and_keeps_mask():
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": np.ones(4, np.float32)}
    mask = magnitude_mask(weights, 0.5)
    strategy = CompressedFedAvg()
    strategy._global = {"w": np.where(mask["w"], weights["w"], 0).astype(np.float32), "b": weights["b"]}
    strategy._mask = mask
    full_delta = {"w": np.full((4, 5), 2.0, np.float32), "b": np.full(4, 2.0, np.float32)}

    arrays, _ = strategy.aggregate_train(1, [_reply(compact(full_delta, mask), 1)])

    new_w = arrays["w"].numpy()
    assert np.all(new_w[~mask["w"]] == 0)
    np.testing.assert_allclose(new_w[mask["w"]], weights["w"][mask["w"]] + 2.0)
    np.testing.assert_allclose(arrays["b"].numpy(), 3.0)


def test_dense_update_under_mask_is_dropped():
    weights = {"w": np.arange(1, 21, dtype=np.float32).reshape(4, 5)}
    strategy = CompressedFedAvg()
    strategy._global = weights
    strategy._mask = magnitude_mask(weights, 0.5)

    arrays, _ = strategy.aggregate_train(1, [_reply({"w": np.ones((4, 5), np.float32)}, 1)])

    assert arrays is None
    assert strategy.traffic[1].failed_clients == 1


def _lowrank_strategy():
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(size=(6, 8)).astype(np.float32), "b": np.ones(6, np.float32)}
    # Whole rows pruned, as channel pruning does, so a masked rank-1 matrix stays rank 1.
    mask = {"w": np.repeat(np.array([True, False, True, True, False, True])[:, None], 8, axis=1)}
    strategy = CompressedFedAvg(uplink="lowrank:1,q:8")
    strategy._global = {"w": np.where(mask["w"], weights["w"], 0).astype(np.float32), "b": weights["b"]}
    strategy._mask = mask
    return strategy, mask


def test_lowrank_update_keeps_shape_under_mask():
    strategy, mask = _lowrank_strategy()
    # A rank-1 update comes back exactly from rank-1 factors, up to 8-bit rounding.
    update = {"w": np.outer(np.arange(1, 7), np.ones(8)).astype(np.float32), "b": np.zeros(6, np.float32)}
    update["w"] = np.where(mask["w"], update["w"], 0).astype(np.float32)

    arrays, _ = strategy.aggregate_train(1, [_reply(update, 1, "lowrank:1,q:8")])

    new_w = arrays["w"].numpy()
    assert np.all(new_w[~mask["w"]] == 0)
    np.testing.assert_allclose(new_w[mask["w"]], (strategy._global["w"] + update["w"])[mask["w"]], atol=0.1)


def test_compacted_lowrank_update_dropped():
    strategy, mask = _lowrank_strategy()
    update = {"w": np.ones((6, 8), np.float32), "b": np.zeros(6, np.float32)}

    arrays, _ = strategy.aggregate_train(1, [_reply(compact(update, mask), 1, "lowrank:1,q:8")])

    assert arrays is None
    assert strategy.traffic[1].failed_clients == 1


def _config(tmp_path, **overrides):
    values = {
        "run_name": "pruned",
        "num_server_rounds": 2,
        "num_clients": 3,
        "local_epochs": 1,
        "batch_size": 64,
        "output_dir": tmp_path,
    }
    values.update(overrides)
    return load_run_config(values)


@pytest.mark.simulation
def test_pruned_federation_keeps_final_model_sparse(tmp_path):
    config = _config(tmp_path, pruning="global", target_sparsity=0.8, qat=True)

    report = simulate(config)

    for record in report.rounds:
        assert record.clients == 3
        assert record.failed_clients == 0
        # The default low-rank uplink factors the pruned weight matrices at
        # full shape. Their kept entries alone would go at 4 bits, about 40x.
        assert record.compression_ratio > 100
        # At least the model and one client's local data.
        assert record.peak_train_memory_bytes > 4 * 32_230 + 100 * 6 * 128 * 4
    state = torch.load(tmp_path / "pruned" / "final_model.pt")
    weights = {name: tensor.numpy() for name, tensor in state.items() if tensor.dim() >= 2}
    zeros = sum(int((values == 0).sum()) for values in weights.values())
    assert zeros / sum(values.size for values in weights.values()) == pytest.approx(0.8, abs=0.01)


@pytest.mark.simulation
def test_memory_limit_declines_round_with_reason(tmp_path):
    config = _config(tmp_path, num_server_rounds=1, memory_limit_mb=0.5)

    report = simulate(config)

    record = report.rounds[0]
    assert record.clients == 0
    assert record.failed_clients == 0
    assert record.declined_clients == 3
    assert record.decline_reasons == {"insufficient-memory": 3}
