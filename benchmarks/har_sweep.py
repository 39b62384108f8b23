"""Final HAR accuracy against uplink bits per parameter, for several pipelines.

Each pipeline runs as `pocketfl simulate` with the main job's settings and one
seed, with and without error feedback, and with a float32 downlink so that
only the uplink differs between runs. The script writes `sweep.json` with one
row per run and `sweep.png` with accuracy against bits per parameter (log
scale) into the output folder. Runs whose report already exists are reused, so
an interrupted sweep continues where it stopped.

    .venv/bin/python benchmarks/har_sweep.py --seed 0 --output-dir runs/sweep
"""

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from pocketfl.server.config import load_run_config  # noqa: E402
from pocketfl.server.report import REPORT_FILE, Report, read_report  # noqa: E402
from pocketfl.simulations.engine import simulate  # noqa: E402

# Pipelines of the sweep, from dense to very sparse. Specs that this version
# of pocketfl cannot parse are skipped with a message.
PIPELINES = (
    "q:8",
    "q:4",
    "q:2",
    "sign",
    "topk:0.1,q:8",
    "topk:0.03,q:4",
    "topk:0.01,q:8",
    "topk:0.01,q:4",
    "topk:0.01,ternary",
    "topk:0.01,q:8;vector=none",
    "lowrank:1,q:8",
    "topk:0.003,q:8",
    "topk:0.001,q:8",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/sweep"))
    args = parser.parse_args()

    rows = [_run(args, "none", error_feedback=False)]
    for pipeline in PIPELINES:
        try:
            load_run_config({"compression": pipeline})
        except ValueError as error:
            print(f"skipping {pipeline}: {error}")
            continue
        for error_feedback in (True, False):
            rows.append(_run(args, pipeline, error_feedback))

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    _plot(rows, args.output_dir / "sweep.png", args.seed, args.rounds)
    _print_table(rows)


def _run(args: argparse.Namespace, pipeline: str, error_feedback: bool) -> dict:
    name = f"seed{args.seed}-{_slug(pipeline)}-{'ef' if error_feedback else 'noef'}"
    config = load_run_config(
        {
            "run_name": name,
            "compression": pipeline,
            # The sweep measures the uplink, so every run gets the same exact
            # float32 downlink.
            "downlink_compression": "none",
            "error_feedback": error_feedback,
            "seed": args.seed,
            "num_server_rounds": args.rounds,
            "output_dir": args.output_dir,
        }
    )
    report_path = config.run_dir / REPORT_FILE
    report = read_report(report_path) if report_path.exists() else None
    if report is None or report.summary is None or report.summary.completed_rounds != args.rounds:
        print(f"running {name}")
        report = simulate(config)
    return _row(report, pipeline, error_feedback)


def _row(report: Report, pipeline: str, error_feedback: bool) -> dict:
    summary = report.summary
    updates = sum(record.clients for record in report.rounds)
    return {
        "compression": pipeline,
        "error_feedback": error_feedback,
        "final_accuracy": summary.final_accuracy,
        "best_accuracy": summary.best_accuracy,
        "uplink_bytes": summary.total_uplink_bytes,
        "bits_per_parameter": 8 * summary.total_uplink_bytes / (updates * report.num_parameters),
        "ratio_vs_float32": summary.uplink_compression_ratio,
    }


def _plot(rows: list[dict], path: Path, seed: int, rounds: int) -> None:
    figure, axes = plt.subplots(figsize=(8, 5))
    for error_feedback, marker, label in ((True, "o", "error feedback"), (False, "x", "no error feedback")):
        chosen = [row for row in rows if row["error_feedback"] == error_feedback and row["compression"] != "none"]
        axes.scatter(
            [row["bits_per_parameter"] for row in chosen],
            [row["final_accuracy"] for row in chosen],
            marker=marker,
            label=label,
        )
        for row in chosen:
            axes.annotate(row["compression"], (row["bits_per_parameter"], row["final_accuracy"]), fontsize=7)

    baseline = next(row for row in rows if row["compression"] == "none")
    axes.axhline(baseline["final_accuracy"], color="gray", linestyle="--", label="uncompressed float32")
    axes.axhline(baseline["final_accuracy"] - 0.01, color="gray", linestyle=":", label="1 point below")
    axes.set_xscale("log")
    axes.set_xlabel("uplink bits per parameter (log scale)")
    axes.set_ylabel("final accuracy on held-out people")
    axes.set_title(f"HAR, 24 clients, {rounds} rounds, seed {seed}")
    axes.legend(loc="lower right")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _print_table(rows: list[dict]) -> None:
    print("| compression | error feedback | bits per parameter | vs float32 | final accuracy | best accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in sorted(rows, key=lambda row: -row["bits_per_parameter"]):
        print(
            f"| `{row['compression']}` | {'yes' if row['error_feedback'] else 'no'} | "
            f"{row['bits_per_parameter']:.3f} | {row['ratio_vs_float32']:.1f}x | "
            f"{row['final_accuracy']:.4f} | {row['best_accuracy']:.4f} |"
        )


def _slug(pipeline: str) -> str:
    # Run names allow letters, digits, '.', '_' and '-' only.
    return re.sub(r"[^A-Za-z0-9.]+", "-", pipeline.replace(":", ""))


if __name__ == "__main__":
    main()
