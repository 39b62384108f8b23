"""Time to several target accuracies, read from the run folders of one `pocketfl compare`.

`compare` reports the time to one target. A single target can sit on a
plateau of the baseline's accuracy curve, where one noisy round moves the
speed-up a lot, so this table gives the time to each of several targets.
The first run named is the baseline of the speed-ups.

    .venv/bin/python benchmarks/time_to_targets.py runs/compare \\
        --runs fedavg-float32 topk0.01-q8 --targets 0.5 0.55 0.6
"""

import argparse
from pathlib import Path

from pocketfl.server.report import REPORT_FILE, Report, read_report
from pocketfl.simulations.compare import first_at


def table(reports: dict[str, Report], targets: list[float]) -> str:
    """Return a markdown table: per target, each run's round, simulated seconds and speed-up."""
    names = list(reports)
    header = "| target | " + " | ".join(names) + " |"
    lines = [header, "| --- |" + " --- |" * len(names)]
    for target in targets:
        hits = {name: first_at(report, target) for name, report in reports.items()}
        baseline = hits[names[0]]
        cells = []
        for name in names:
            hit = hits[name]
            if hit is None:
                cells.append("not reached")
                continue

            cell = f"round {hit.round}, {hit.cumulative_simulated_seconds:,.2f} s"
            if baseline is not None and hit.cumulative_simulated_seconds > 0:
                cell += f", {baseline.cumulative_simulated_seconds / hit.cumulative_simulated_seconds:.2f}x"
            cells.append(cell)
        lines.append(f"| {target:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dir", type=Path, help="Output folder of one `pocketfl compare`.")
    parser.add_argument("--runs", nargs="+", required=True, help="Run folder names; the first is the baseline.")
    parser.add_argument("--targets", nargs="+", type=float, required=True, help="Target accuracies, as fractions.")
    args = parser.parse_args()

    reports = {}
    for name in args.runs:
        path = args.compare_dir / name / REPORT_FILE
        if not path.is_file():
            parser.error(f"no {REPORT_FILE} in {path.parent}; name a run folder of {args.compare_dir}")
        reports[name] = read_report(path)

    print(table(reports, args.targets), end="")


if __name__ == "__main__":
    main()
