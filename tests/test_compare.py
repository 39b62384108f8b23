"""The comparison table and plots of `pocketfl compare`, from hand-made reports."""

from matplotlib.axes import Axes

from pocketfl.server.report import Report, RoundRecord, Summary
from pocketfl.simulations.compare import PLOT_FILES, ComparedRun, first_at, markdown_table, write_plots


def _report(accuracies: list[float], seconds_per_round: float, uplink_per_round: int) -> Report:
    rounds = []
    for index, accuracy in enumerate(accuracies, start=1):
        rounds.append(
            RoundRecord(
                round=index,
                accuracy=accuracy,
                loss=1.0,
                clients=2,
                sampled_clients=2,
                failed_clients=0,
                uplink_bytes=uplink_per_round - 100,
                uplink_message_bytes=uplink_per_round,
                uplink_float32_bytes=1000,
                downlink_bytes=1000,
                compression_ratio=1.0,
                mean_train_seconds=0.1,
                wall_seconds=0.1,
                simulated_seconds=seconds_per_round,
                cumulative_simulated_seconds=index * seconds_per_round,
            )
        )
    summary = Summary(
        final_accuracy=accuracies[-1],
        best_accuracy=max(accuracies),
        initial_accuracy=0.1,
        uplink_compression_ratio=None,
        total_uplink_bytes=0,
        total_uplink_float32_bytes=0,
        total_downlink_bytes=0,
        completed_rounds=len(rounds),
        total_simulated_seconds=len(rounds) * seconds_per_round,
        wall_seconds=1.0,
    )
    return Report(
        run_name="r", config={}, train_people=[], held_out_people=[], num_parameters=10,
        rounds=rounds, summary=summary,
    )


def _run(label: str, report: Report, target: float) -> ComparedRun:
    return ComparedRun(label, label, "none", report, first_at(report, target))


def test_table_gives_time_to_target_and_speedup():
    baseline = _run("fedavg", _report([0.5, 0.7, 0.9], 10.0, 2_000_000), 0.7)
    compressed = _run("topk", _report([0.4, 0.6, 0.75], 1.0, 20_000), 0.7)
    never = _run("sign", _report([0.3, 0.4, 0.5], 1.0, 10_000), 0.7)

    table = markdown_table([baseline, compressed, never], 0.7)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}

    # FedAvg reaches 0.7 at round 2: 20 s and 4 MB; top-k at round 3: 3 s and 0.06 MB.
    assert "| 2 | 4.00 | 20.0 | 1.00x |" in rows["fedavg"]
    assert "| 3 | 0.06 | 3.0 | 6.67x |" in rows["topk"]
    assert "not reached" in rows["sign"]


def test_table_gives_per_round_speedup():
    baseline = _run("fedavg", _report([0.5, 0.7, 0.9], 10.0, 2_000_000), 0.7)
    compressed = _run("topk", _report([0.4, 0.6, 0.75], 2.5, 20_000), 0.7)

    table = markdown_table([baseline, compressed], 0.7)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}

    # 30 s over 3 rounds against 7.5 s over 3: 4x shorter rounds, but one
    # round more to the target, so 20 s against 7.5 s to the target.
    assert "| 30.0 | 10 | 1.00x | 2 |" in rows["fedavg"]
    assert "| 7.5 | 2.5 | 4.00x | 3 |" in rows["topk"]
    assert rows["topk"].endswith("| 2.67x |")


def test_plots_are_written(tmp_path):
    runs = [_run("fedavg", _report([0.5, 0.9], 2.0, 1000), 0.8)]

    write_plots(runs, tmp_path, 0.8, "test")

    for name in PLOT_FILES.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_names_central_data():
    runs = [_run("fedavg", _report([0.5, 0.9], 2.0, 1000), 0.8)]

    named = markdown_table(runs, 0.8, "the held-out people")
    default = markdown_table(runs, 0.8)

    assert named.startswith("Target accuracy on the held-out people: 0.800.")
    assert default.startswith("Target accuracy on the central test data: 0.800.")


def test_plots_name_central_data(tmp_path, monkeypatch):
    labels = []
    set_ylabel = Axes.set_ylabel

    def record_ylabel(axes, label, *args, **kwargs):
        labels.append(label)
        return set_ylabel(axes, label, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_ylabel", record_ylabel)
    runs = [_run("fedavg", _report([0.5, 0.9], 2.0, 1000), 0.8)]

    write_plots(runs, tmp_path, 0.8, "test", "the blobs test set")

    assert labels == ["accuracy on the blobs test set (fraction)"] * len(PLOT_FILES)
