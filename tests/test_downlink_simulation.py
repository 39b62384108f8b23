"""Downlink compression through the real Flower Simulation Engine (Ray backend)."""

import logging
import math

import pytest

from pocketfl.server import federation
from pocketfl.server.config import load_run_config
from pocketfl.simulations.engine import simulate
from pocketfl.strategies import CompressedFedAvg
from pocketfl.strategies.downlink import DOWNLINK_KEY, FULL_KEY, PAYLOAD_KEY

pytestmark = pytest.mark.simulation


def _config(tmp_path, **overrides):
    values = {
        "run_name": "downlink",
        "num_server_rounds": 2,
        "num_clients": 3,
        "local_epochs": 1,
        "batch_size": 64,
        "output_dir": tmp_path,
        "downlink_compression": "q:8",
    }
    values.update(overrides)
    return load_run_config(values)


class RecordingFedAvg(CompressedFedAvg):
    """Records, for each broadcast, whether each message carried a full model."""

    broadcasts: list[list[bool]] = []

    def _encode_downlink(self, messages):
        messages, payload_bytes = super()._encode_downlink(messages)
        RecordingFedAvg.broadcasts.append(
            [bool(message.content[DOWNLINK_KEY][FULL_KEY]) for message in messages]
        )
        return messages, payload_bytes


class CorruptingFedAvg(CompressedFedAvg):
    """Truncates the downlink payload of the first message of every broadcast."""

    def _encode_downlink(self, messages):
        messages, payload_bytes = super()._encode_downlink(messages)
        downlink = messages[0].content[DOWNLINK_KEY]
        downlink[PAYLOAD_KEY] = downlink[PAYLOAD_KEY][:-7]
        return messages, payload_bytes


def test_quantized_downlink_cuts_payload_bytes(tmp_path):
    report = simulate(_config(tmp_path, num_server_rounds=3))

    float32_per_round = 3 * 4 * report.num_parameters
    for record in report.rounds:
        assert record.clients == 3
        assert record.failed_clients == 0
        assert math.isfinite(record.accuracy)
        assert 0.0 <= record.accuracy <= 1.0
        assert record.downlink_float32_bytes == float32_per_round
        assert 0 < record.downlink_payload_bytes < record.downlink_float32_bytes / 3
        assert record.downlink_payload_bytes < record.downlink_bytes < float32_per_round / 2
        assert record.client_accuracy is not None
    assert report.summary.downlink_compression_ratio > 3
    assert report.summary.total_downlink_payload_bytes == sum(
        record.downlink_payload_bytes for record in report.rounds
    )


def test_clients_that_miss_rounds_still_decode(tmp_path, monkeypatch):
    # The Simulation Engine runs the ServerApp in this process, so the
    # strategy class can be swapped here; clients run in Ray workers.
    monkeypatch.setattr(federation, "CompressedFedAvg", RecordingFedAvg)
    RecordingFedAvg.broadcasts = []
    config = _config(tmp_path, num_clients=4, fraction_train=0.5, num_server_rounds=4)

    report = simulate(config)

    assert len(report.rounds) == 4
    for record in report.rounds:
        assert record.sampled_clients == 2
        assert record.clients == 2
        assert record.failed_clients == 0
        assert math.isfinite(record.accuracy)
        assert record.client_accuracy is not None

    # Train and evaluate broadcasts, 2 of 4 clients each: the first is all
    # full models, and later ones send deltas to clients that took part before.
    broadcasts = RecordingFedAvg.broadcasts
    assert len(broadcasts) == 8
    assert all(broadcasts[0])
    assert sum(not full for sent in broadcasts[1:] for full in sent) >= 4


def test_downlink_none_sends_the_float32_model(tmp_path):
    report = simulate(_config(tmp_path, downlink_compression="none", num_server_rounds=1))

    record = report.rounds[0]
    assert record.downlink_payload_bytes == record.downlink_float32_bytes == 3 * 4 * report.num_parameters
    assert record.downlink_bytes > record.downlink_payload_bytes
    assert report.summary.downlink_compression_ratio == 1.0
    assert record.failed_clients == 0


def test_corrupt_downlink_fails_that_client_not_the_round(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(federation, "CompressedFedAvg", CorruptingFedAvg)
    caplog.set_level(logging.WARNING, logger="pocketfl.strategies.compressed_fedavg")

    report = simulate(_config(tmp_path))

    assert len(report.rounds) == 2
    for record in report.rounds:
        assert record.sampled_clients == 3
        assert record.failed_clients == 1
        assert record.clients == 2
        assert math.isfinite(record.accuracy)
    assert report.summary.completed_rounds == 2

    failures = [entry.getMessage() for entry in caplog.records if "failed to train" in entry.getMessage()]
    assert len(failures) == 2
    assert all("node " in message and "downlink did not decode" in message for message in failures)
