"""Server checkpoints: round trip, atomic replacement, RNG state and resume checks."""

import logging
import os
import random
import stat

import numpy as np
import pytest
import torch

from pocketfl.server import checkpoint as checkpoint_module
from pocketfl.server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    model_digest,
    restore_rng_state,
    save_checkpoint,
    save_model,
)
from pocketfl.server.config import load_run_config
from pocketfl.server.report import Report, RoundRecord
from pocketfl.server.resume import prepare_resume
from pocketfl.server.rounds import ContinuedRounds
from pocketfl.strategies import CompressedFedAvg


def _model(seed=0):
    generator = np.random.default_rng(seed)
    return {
        "conv.weight": generator.standard_normal((4, 3, 5)).astype(np.float32),
        "conv.bias": generator.standard_normal(4).astype(np.float32),
    }


def _record(server_round):
    return RoundRecord(
        round=server_round,
        accuracy=0.5,
        loss=1.0,
        clients=3,
        sampled_clients=3,
        failed_clients=0,
        uplink_bytes=100,
        uplink_message_bytes=200,
        uplink_float32_bytes=1000,
        downlink_bytes=300,
        compression_ratio=10.0,
        mean_train_seconds=1.0,
        wall_seconds=2.0,
    )


def _report(config, rounds):
    return Report(
        run_name=config.run_name,
        config=config.model_dump(mode="json", by_alias=True),
        train_people=[1, 2],
        held_out_people=[3],
        num_parameters=64,
        rounds=[_record(server_round) for server_round in range(1, rounds + 1)],
    )


def _config(tmp_path, **values):
    return load_run_config({"output_dir": tmp_path, "run_name": "run", **values})


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    saved = Checkpoint(
        completed_rounds=2,
        model=model,
        report={"rounds": [1, 2]},
        initial_accuracy=0.25,
        strategy_state={"downlink-last-version": 7},
        rng_state=capture_rng_state(),
    )
    save_checkpoint(saved, tmp_path)
    loaded = load_checkpoint(tmp_path)

    assert loaded.completed_rounds == 2
    assert loaded.report == {"rounds": [1, 2]}
    assert loaded.initial_accuracy == 0.25
    assert loaded.strategy_state == {"downlink-last-version": 7}
    assert model_digest(loaded.model) == model_digest(model)
    for name, values in model.items():
        assert loaded.model[name].dtype == values.dtype
        np.testing.assert_array_equal(loaded.model[name], values)


def test_missing_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path) is None


def test_rng_state_round_trip(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    save_checkpoint(Checkpoint(1, _model(), {}, rng_state=capture_rng_state()), tmp_path)
    expected = (random.random(), np.random.random(), torch.rand(1).item())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path).rng_state)

    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(Checkpoint(1, _model(0), {}), tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(Checkpoint(2, _model(1), {}), tmp_path)

    loaded = load_checkpoint(tmp_path)
    assert loaded.completed_rounds == 1
    assert model_digest(loaded.model) == model_digest(_model(0))
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]


def test_final_model_is_private_like_checkpoint(tmp_path):
    checkpoint_path = save_checkpoint(Checkpoint(1, _model(), {}), tmp_path)
    state_dict = {name: torch.from_numpy(values) for name, values in _model().items()}
    model_path = save_model(state_dict, tmp_path / "final_model.pt")

    assert stat.S_IMODE(model_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(model_path.stat().st_mode) == stat.S_IMODE(checkpoint_path.stat().st_mode)
    loaded = torch.load(model_path, weights_only=True)
    assert torch.equal(loaded["conv.weight"], state_dict["conv.weight"])
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_FILE, "final_model.pt"]


def test_torn_checkpoint_raises(tmp_path):
    save_checkpoint(Checkpoint(1, _model(), {}), tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)


def test_digest_sees_one_bit(tmp_path):
    model = _model()
    changed = {name: values.copy() for name, values in model.items()}
    changed["conv.bias"].view(np.uint32)[0] ^= 1

    assert model_digest(model) != model_digest(changed)


def test_resume_off_deletes_checkpoint(tmp_path):
    config = _config(tmp_path)
    config.run_dir.mkdir(parents=True)
    save_checkpoint(Checkpoint(1, _model(), _report(config, 1).model_dump(mode="json")), config.run_dir)

    assert prepare_resume(config, CompressedFedAvg()) is None
    assert not (config.run_dir / CHECKPOINT_FILE).exists()


def test_resume_restores_report_and_downlink(tmp_path, caplog):
    config = _config(tmp_path, resume=True, num_server_rounds=4)
    config.run_dir.mkdir(parents=True)
    report = _report(config, 3)
    save_checkpoint(
        Checkpoint(2, _model(), report.model_dump(mode="json"), strategy_state={"downlink-last-version": 9}),
        config.run_dir,
    )
    strategy = CompressedFedAvg(downlink="q:8")

    with caplog.at_level(logging.WARNING, logger="pocketfl.server.resume"):
        checkpoint, resumed = prepare_resume(config, strategy)

    assert f"resuming run run from round 3 (checkpoint {config.run_dir / CHECKPOINT_FILE}" in caplog.text
    assert checkpoint.completed_rounds == 2
    assert [record.round for record in resumed.rounds] == [1, 2]
    assert resumed.resumes[0].after_round == 2
    assert resumed.resumes[0].model_sha256 == model_digest(_model())
    assert strategy.downlink.last_version == 9
    assert strategy.downlink.versions == ()


def test_resume_rejects_other_settings(tmp_path):
    config = _config(tmp_path, resume=True)
    config.run_dir.mkdir(parents=True)
    saved_config = _config(tmp_path, compression="q:4")
    save_checkpoint(Checkpoint(1, _model(), _report(saved_config, 1).model_dump(mode="json")), config.run_dir)

    with pytest.raises(ValueError, match="compression='q:4' in the checkpoint"):
        prepare_resume(config, CompressedFedAvg())


def test_resume_rejects_fewer_rounds(tmp_path):
    config = _config(tmp_path, resume=True, num_server_rounds=2)
    config.run_dir.mkdir(parents=True)
    save_checkpoint(Checkpoint(3, _model(), _report(config, 3).model_dump(mode="json")), config.run_dir)

    with pytest.raises(ValueError, match="use at least 3"):
        prepare_resume(config, CompressedFedAvg())


class _RecordingStrategy:
    """Stand-in strategy that records the round numbers it is called with."""

    def __init__(self):
        self.calls = []

    def configure_train(self, server_round, arrays, config, grid):
        self.calls.append(("configure_train", server_round))
        return []

    def aggregate_train(self, server_round, replies):
        self.calls.append(("aggregate_train", server_round))
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        self.calls.append(("configure_evaluate", server_round))
        return []

    def aggregate_evaluate(self, server_round, replies):
        self.calls.append(("aggregate_evaluate", server_round))
        return {"accuracy": 0.5}

    def summary(self):
        pass


def test_continued_rounds_shift_numbers():
    inner = _RecordingStrategy()
    rounds = ContinuedRounds(inner, completed_rounds=2)

    rounds.configure_train(1, None, None, None)
    rounds.aggregate_train(1, [])
    rounds.configure_evaluate(2, None, None, None)
    rounds.aggregate_evaluate(2, [])

    assert inner.calls == [
        ("configure_train", 3),
        ("aggregate_train", 3),
        ("configure_evaluate", 4),
        ("aggregate_evaluate", 4),
    ]
    assert rounds.client_evaluate_metrics == {4: {"accuracy": 0.5}}


def test_continued_rounds_skip_initial_evaluation():
    evaluated = []
    resumed = ContinuedRounds(_RecordingStrategy(), completed_rounds=2)
    fresh = ContinuedRounds(_RecordingStrategy(), completed_rounds=0)

    resumed_fn = resumed.wrap_evaluate_fn(lambda server_round, arrays: evaluated.append(server_round))
    fresh_fn = fresh.wrap_evaluate_fn(lambda server_round, arrays: evaluated.append(server_round))
    resumed_fn(0, None)
    resumed_fn(1, None)
    fresh_fn(0, None)
    fresh_fn(1, None)

    assert evaluated == [3, 0, 1]
