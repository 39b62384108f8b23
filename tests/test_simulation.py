"""Short federations through the real Flower Simulation Engine (Ray backend)."""

from pathlib import Path

import pytest
import torch
from flwr.simulation import run_simulation

from pocketfl.server import federation
from pocketfl.server.app import build_server_app
from pocketfl.server.config import load_run_config
from pocketfl.server.report import read_report
from pocketfl.simulations.engine import backend_config, simulate
from pocketfl.simulations.profiles import DeviceProfile, Population
from pocketfl.strategies import CompressedFedAvg
from pocketfl.strategies.discarded_reports import DISCARDED_ROUND_KEY

pytestmark = pytest.mark.simulation

TESTS_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = TESTS_DIR.parent / "examples"


def _config(tmp_path, **overrides):
    values = {
        "run_name": "sim",
        "num_server_rounds": 2,
        "num_clients": 3,
        "local_epochs": 1,
        "batch_size": 64,
        "output_dir": tmp_path,
    }
    values.update(overrides)
    return load_run_config(values)


def test_two_rounds_write_report_and_model(tmp_path):
    config = _config(tmp_path)
    rounds_seen = []

    report = simulate(config, on_round=lambda record: rounds_seen.append(record.round))

    assert rounds_seen == [1, 2]
    assert [record.round for record in report.rounds] == [1, 2]
    for record in report.rounds:
        assert record.clients == 3
        assert record.failed_clients == 0
        assert 0.0 <= record.accuracy <= 1.0
        assert record.uplink_float32_bytes == 3 * 4 * report.num_parameters
        assert 0 < record.uplink_bytes < record.uplink_message_bytes
        assert record.compression_ratio > 50
        # The default downlink is 8-bit: about a quarter of the float32 model.
        assert record.downlink_float32_bytes == 3 * 4 * report.num_parameters
        assert 0 < record.downlink_payload_bytes < record.downlink_bytes < record.downlink_float32_bytes
        assert record.client_accuracy is not None
    assert report.summary.completed_rounds == 2
    assert report.summary.final_accuracy == report.rounds[-1].accuracy

    state = torch.load(tmp_path / "sim" / "final_model.pt")
    assert sum(tensor.numel() for tensor in state.values()) == report.num_parameters
    assert len((tmp_path / "sim" / "rounds.csv").read_text().splitlines()) == 3


def test_uncompressed_run_sends_float32(tmp_path):
    report = simulate(_config(tmp_path, compression="none", num_server_rounds=1))
    record = report.rounds[0]
    assert record.compression_ratio < 1.0
    assert record.uplink_bytes > record.uplink_float32_bytes


def test_bad_replies_cost_those_replies_not_the_round(tmp_path, monkeypatch):
    # The Ray workers import tests/faulty_clients.py by name.
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    import faulty_clients

    config = _config(tmp_path, num_clients=6)
    run_simulation(
        server_app=build_server_app(config),
        client_app=faulty_clients.app,
        num_supernodes=config.num_clients,
        backend_config=backend_config(),
    )

    report = read_report(config.run_dir / "report.json")
    assert len(report.rounds) == 2
    for record in report.rounds:
        # Partitions 0 (corrupt payload), 1 (negative seconds), 3 (crash) and
        # 4 (float32 where top-k was asked for) fail; partition 5 declines.
        assert record.failed_clients == 4
        assert record.declined_clients == 1
        assert record.decline_reasons == {faulty_clients.DECLINE_REASON: 1}
        # Partition 2 replied to the identity query with garbage and 3 crashed
        # on it. Neither has a key, and 2 still trains.
        assert record.clients == 1
        assert record.sampled_clients == 6
        assert record.sampled_partitions == [0, 1, 4, 5]
        assert record.uplink_float32_bytes == 1 * 4 * report.num_parameters
        assert record.mean_train_seconds >= 0
        assert 0.0 <= record.client_accuracy <= 1.0
    assert report.summary.completed_rounds == 2


def test_same_seed_gives_same_report(tmp_path):
    timing = {"wall_seconds", "mean_train_seconds"}
    first = simulate(_config(tmp_path, run_name="first", num_server_rounds=1))
    second = simulate(_config(tmp_path, run_name="second", num_server_rounds=1))

    assert first.rounds[0].model_dump(exclude=timing) == second.rounds[0].model_dump(exclude=timing)
    assert first.held_out_people == second.held_out_people


def _two_speed_population():
    # Half the phones upload 100 times slower than the other half.
    common = {
        "weight": 1.0,
        "train_samples_per_second": 1e6,
        "memory_mb": 2048,
        "downlink_mbps": 100.0,
        "availability": 1.0,
    }
    return Population(
        profiles=[
            DeviceProfile(name="fast", uplink_mbps=100.0, **common),
            DeviceProfile(name="slow", uplink_mbps=1.0, **common),
        ]
    )


def test_deadline_drops_slow_phones_and_short_rounds_fail(tmp_path):
    # A compressed update (a few kB) takes well under a second at either
    # speed; uncompressed (129 kB) it takes about 1 s at 1 Mbps.
    config = _config(
        tmp_path, num_clients=4, compression="none", round_deadline=0.5, min_reports=3
    )

    report = simulate(config, population=_two_speed_population())

    initial = report.summary.initial_accuracy
    for record in report.rounds:
        assert record.sampled_clients == 4
        assert record.clients == 2
        assert record.late_clients == 2
        assert record.dropped_clients == 0
        assert record.failed
        assert record.simulated_seconds == 0.5
        # A failed round keeps the global model.
        assert record.accuracy == initial
    assert report.rounds[-1].cumulative_simulated_seconds == 1.0
    assert report.summary.failed_rounds == 2


def test_rounds_on_the_simulated_clock_add_up(tmp_path):
    config = _config(tmp_path, num_clients=4)

    report = simulate(config, population=_two_speed_population())

    for record in report.rounds:
        assert record.clients == 4
        assert not record.failed
        assert record.late_clients == 0
        assert record.simulated_seconds > 0
    assert report.summary.total_simulated_seconds == pytest.approx(
        sum(record.simulated_seconds for record in report.rounds)
    )


def test_a_task_other_than_har_trains(tmp_path, monkeypatch):
    # The Ray workers import examples/blobs_task.py by name.
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES_DIR))
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    config = _config(
        tmp_path,
        task="blobs_task:BlobsTask",
        num_clients=4,
        num_server_rounds=3,
        learning_rate=0.1,
        compression="q:8",
        downlink_compression="none",
    )

    report = simulate(config)

    assert report.task == "blobs_task:BlobsTask"
    assert report.train_people == []
    # 10 * 64 + 64 weights and biases, then 64 * 4 + 4.
    assert report.num_parameters == 964
    assert [record.clients for record in report.rounds] == [4, 4, 4]
    assert report.rounds[0].uplink_float32_bytes == 4 * 4 * 964
    # Four separable blobs: a few rounds take the MLP far above chance (0.25).
    assert report.summary.final_accuracy > report.summary.initial_accuracy
    assert report.summary.final_accuracy > 0.8


def test_phones_without_memory_for_training_decline(tmp_path):
    # A HAR round needs about 4.4 MB (docs/benchmarks.md); 1 MiB is too little.
    common = {
        "weight": 1.0,
        "train_samples_per_second": 1e6,
        "downlink_mbps": 100.0,
        "uplink_mbps": 100.0,
        "availability": 1.0,
    }
    population = Population(
        profiles=[
            DeviceProfile(name="roomy", memory_mb=2048, **common),
            DeviceProfile(name="cramped", memory_mb=1, **common),
        ]
    )

    report = simulate(_config(tmp_path, num_clients=4), population=population)

    for record in report.rounds:
        assert record.sampled_clients == 4
        assert record.clients == 2
        assert record.declined_clients == 2
        assert record.decline_reasons == {"insufficient-memory": 2}
        assert record.failed_clients == 0


def _blobs_config(tmp_path, monkeypatch, **overrides):
    # The Ray workers import examples/blobs_task.py by name.
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES_DIR))
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    values = {
        "task": "blobs_task:BlobsTask",
        "num_clients": 8,
        "num_server_rounds": 3,
        "fraction_train": 0.5,
        "learning_rate": 0.1,
        "compression": "q:8",
        "error_feedback": False,
        "downlink_compression": "none",
        "seed": 5,
    }
    values.update(overrides)
    return _config(tmp_path, **values)


def test_same_seed_samples_the_same_phones(tmp_path, monkeypatch):
    first = simulate(_blobs_config(tmp_path, monkeypatch, run_name="first"))
    second = simulate(_blobs_config(tmp_path, monkeypatch, run_name="second"))

    sampled = [record.sampled_partitions for record in first.rounds]
    assert all(len(partitions) == 4 for partitions in sampled)
    assert len({tuple(partitions) for partitions in sampled}) > 1
    assert sampled == [record.sampled_partitions for record in second.rounds]
    assert [record.accuracy for record in first.rounds] == [record.accuracy for record in second.rounds]
    assert [record.client_accuracy for record in first.rounds] == [
        record.client_accuracy for record in second.rounds
    ]


def test_resumed_run_samples_as_an_uninterrupted_one(tmp_path, monkeypatch):
    # Error feedback and a compressed downlink keep per-node state that a
    # restart loses. With both off, the rounds match exactly.
    whole = simulate(_blobs_config(tmp_path, monkeypatch, run_name="whole"))
    simulate(_blobs_config(tmp_path, monkeypatch, run_name="resumed", num_server_rounds=2))
    resumed = simulate(_blobs_config(tmp_path, monkeypatch, run_name="resumed", resume=True))

    assert [resume.after_round for resume in resumed.resumes] == [2]
    assert resumed.rounds[2].sampled_partitions == whole.rounds[2].sampled_partitions
    assert resumed.rounds[2].accuracy == whole.rounds[2].accuracy


def test_over_selection_keeps_phones_and_profiles(tmp_path, monkeypatch):
    # Twice the phones a round needs are sampled and the first two reports
    # count, so accuracy and round length also depend on which phone got the
    # slow uplink: equal runs need the same sample and the same profiles.
    def run(name):
        config = _blobs_config(
            tmp_path, monkeypatch, run_name=name, num_server_rounds=2, fraction_train=0.25, over_selection=2.0
        )
        return simulate(config, population=_two_speed_population())

    first = run("first")
    second = run("second")

    for record in first.rounds:
        assert record.sampled_clients == 4
        assert len(record.sampled_partitions) == 4
        assert record.clients == 2
        assert record.late_clients == 2
    assert [record.sampled_partitions for record in first.rounds] == [
        record.sampled_partitions for record in second.rounds
    ]
    assert [record.simulated_seconds for record in first.rounds] == [
        record.simulated_seconds for record in second.rounds
    ]
    assert [record.accuracy for record in first.rounds] == [record.accuracy for record in second.rounds]


class RecordingDiscardedFedAvg(CompressedFedAvg):
    """Records, for each training round, the discarded round named in each train message."""

    named: list[list[int | None]] = []

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        RecordingDiscardedFedAvg.named.append(
            sorted((message.content["config"].get(DISCARDED_ROUND_KEY) for message in messages), key=str)
        )
        return messages


def test_late_phones_get_their_discarded_round(tmp_path, monkeypatch):
    # The Simulation Engine runs the ServerApp in this process, so the
    # strategy class can be swapped here; clients run in Ray workers.
    monkeypatch.setattr(federation, "CompressedFedAvg", RecordingDiscardedFedAvg)
    RecordingDiscardedFedAvg.named = []
    common = {"weight": 1.0, "memory_mb": 2048, "downlink_mbps": 100.0, "uplink_mbps": 100.0, "availability": 1.0}
    # A HAR phone has a few hundred training examples: the slow phones train
    # for minutes and miss the 5 s deadline every round.
    population = Population(
        profiles=[
            DeviceProfile(name="fast", train_samples_per_second=1e6, **common),
            DeviceProfile(name="slow", train_samples_per_second=1.0, **common),
        ]
    )
    config = _config(tmp_path, num_clients=4, num_server_rounds=3, round_deadline=5.0, error_feedback=True)

    report = simulate(config, population=population)

    for record in report.rounds:
        assert record.clients == 2
        assert record.late_clients == 2
        assert record.failed_clients == 0
        assert not record.failed
    assert RecordingDiscardedFedAvg.named == [[None] * 4, [1, 1, None, None], [2, 2, None, None]]
