"""Compare uncompressed FedAvg with compression pipelines on the same phones.

Every run shares the seed, the clients, their data and the device population,
so the runs differ only in what crosses the links. `compare` writes into the
output folder:

| file | contents |
| --- | --- |
| `compare.md` | one row per run, with time per round and time to the target accuracy |
| `accuracy-by-round.png` | central accuracy against round |
| `accuracy-by-uplink.png` | central accuracy against cumulative uplink megabytes |
| `accuracy-by-time.png` | central accuracy against cumulative simulated seconds |
| `<run>/` | each run's report.json, rounds.csv and final model |

Central accuracy is measured on the task's evaluation data (HAR: the held-out
people), which the table and plots name.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pocketfl.server.config import RunConfig, build_task
from pocketfl.server.report import Report, RoundRecord
from pocketfl.tasks.base import Task, resolve_task

from .engine import simulate
from .profiles import Population
from .run_labels import BASELINE, run_label

TABLE_FILE = "compare.md"
PLOT_FILES = {
    "round": "accuracy-by-round.png",
    "uplink": "accuracy-by-uplink.png",
    "time": "accuracy-by-time.png",
}
BYTES_PER_MEGABYTE = 1_000_000


@dataclass(frozen=True)
class ComparedRun:
    """One run of a comparison and the point where it first reached the target."""

    label: str
    compression: str
    downlink: str
    report: Report
    target_round: RoundRecord | None


def compare(
    base: RunConfig,
    pipelines: list[str],
    population: Population,
    target_accuracy: float,
    start_hour: float = 0.0,
    on_start: Callable[[str], None] | None = None,
) -> list[ComparedRun]:
    """Run uncompressed FedAvg and each pipeline under `base`, then write the table and plots.

    The baseline sends float32 both ways without error feedback, which is plain
    FedAvg. Each pipeline run uses `base`'s downlink and error feedback. Runs go
    to `<base.run_dir>/<label>/`.
    """
    output_dir = base.run_dir
    task = build_task(base, resolve_task(base.task))
    runs = []
    settings = [(BASELINE, BASELINE, False)] + [
        (pipeline, base.downlink_compression, base.error_feedback) for pipeline in pipelines
    ]
    for compression, downlink, error_feedback in settings:
        label = run_label(compression)
        config = base.model_copy(
            update={
                "run_name": label,
                "output_dir": output_dir,
                "compression": compression,
                "downlink_compression": downlink,
                "error_feedback": error_feedback,
            }
        )
        if on_start is not None:
            on_start(label)
        report = simulate(config, population=population, start_hour=start_hour)
        runs.append(
            ComparedRun(label, compression, downlink, report, first_at(report, target_accuracy))
        )

    table = markdown_table(runs, target_accuracy, task.central_data_name)
    (output_dir / TABLE_FILE).write_text(table, encoding="utf-8")
    title = (
        f"task {task.name}, {base.resolved_num_clients} phones ({base.partitioning}), "
        f"{base.num_server_rounds} rounds, seed {base.seed}"
    )
    write_plots(runs, output_dir, target_accuracy, title, task.central_data_name)
    return runs


def markdown_table(
    runs: list[ComparedRun],
    target_accuracy: float,
    central_data_name: str = Task.central_data_name,
) -> str:
    """Return the comparison as a markdown table, with speed-ups against the first run.

    `central_data_name` names the data that accuracy is measured on, such as a
    task's `central_data_name`.
    """
    baseline = runs[0]
    lines = [
        f"Target accuracy on {central_data_name}: {target_accuracy:.3f}. Uplink megabytes are "
        "Flower reply messages as serialized (10^6 bytes); time is simulated phone time.",
        "A run's speed-up to the target is about its speed-up per round times FedAvg's rounds "
        "to the target over its own, so the speed-up per round bounds it when the run needs "
        "at least as many rounds as FedAvg.",
        "",
        "| run | uplink | downlink | final accuracy | uplink MB | simulated s | s per round "
        "| FedAvg s per round / this | round at target | uplink MB to target "
        "| simulated s to target | FedAvg time / this time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        summary = run.report.summary
        total_uplink = _cumulative_uplink(run.report)[-1] if run.report.rounds else 0.0
        row = [
            run.label,
            f"`{run.compression}`",
            f"`{run.downlink}`",
            f"{summary.final_accuracy:.4f}" if summary else "-",
            f"{total_uplink:,.2f}",
            f"{summary.total_simulated_seconds:,.1f}" if summary else "-",
            _format_seconds(_seconds_per_round(run.report)),
            _per_round_speedup(baseline, run),
        ]
        if run.target_round is None:
            row += ["not reached", "-", "-", "-"]
        else:
            index = run.target_round.round - 1
            row += [
                str(run.target_round.round),
                f"{_cumulative_uplink(run.report)[index]:,.2f}",
                f"{run.target_round.cumulative_simulated_seconds:,.1f}",
                _speedup(baseline, run),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_plots(
    runs: list[ComparedRun],
    output_dir: Path,
    target_accuracy: float,
    title: str = "",
    central_data_name: str = Task.central_data_name,
) -> None:
    """Write accuracy against round, cumulative uplink MB and simulated seconds, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    axes_by_kind = {
        "round": ("round", lambda report: [record.round for record in report.rounds]),
        "uplink": ("cumulative uplink (MB, 10^6 bytes)", _cumulative_uplink),
        "time": (
            "cumulative simulated phone time (s)",
            lambda report: [record.cumulative_simulated_seconds for record in report.rounds],
        ),
    }
    for kind, (x_label, x_values) in axes_by_kind.items():
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for run in runs:
            accuracies = [record.accuracy for record in run.report.rounds]
            axes.plot(x_values(run.report), accuracies, marker="o", markersize=3, label=run.label)
        axes.axhline(target_accuracy, color="gray", linestyle="--", label=f"target {target_accuracy:.2f}")
        if kind == "uplink":
            axes.set_xscale("log")
            x_label += ", log scale"
        axes.set_xlabel(x_label)
        axes.set_ylabel(f"accuracy on {central_data_name} (fraction)")
        axes.set_ylim(0.0, 1.0)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(loc="lower right")
        figure.tight_layout()
        figure.savefig(output_dir / PLOT_FILES[kind], dpi=120)
        plt.close(figure)


def first_at(report: Report, target_accuracy: float) -> RoundRecord | None:
    """Return the first round whose central accuracy is at least `target_accuracy`, or None."""
    return next((record for record in report.rounds if record.accuracy >= target_accuracy), None)


def _cumulative_uplink(report: Report) -> list[float]:
    total, values = 0, []
    for record in report.rounds:
        total += record.uplink_message_bytes
        values.append(total / BYTES_PER_MEGABYTE)
    return values


def _seconds_per_round(report: Report) -> float | None:
    # Failed rounds count: the phones spent that time even if the model was kept.
    if not report.rounds:
        return None
    return report.rounds[-1].cumulative_simulated_seconds / len(report.rounds)


def _format_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.3g}"


def _per_round_speedup(baseline: ComparedRun, run: ComparedRun) -> str:
    baseline_seconds = _seconds_per_round(baseline.report)
    seconds = _seconds_per_round(run.report)
    if baseline_seconds is None or not seconds:
        return "-"
    return f"{baseline_seconds / seconds:.2f}x"


def _speedup(baseline: ComparedRun, run: ComparedRun) -> str:
    if baseline.target_round is None or run.target_round is None:
        return "-"
    seconds = run.target_round.cumulative_simulated_seconds
    if seconds <= 0:
        return "-"
    return f"{baseline.target_round.cumulative_simulated_seconds / seconds:.2f}x"
