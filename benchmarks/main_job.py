"""The main job against the same run without compression, at one seed.

Runs `pocketfl simulate` with its defaults and again with `--compression none`,
then prints the markdown rows recorded in docs/benchmarks.md. `--downlink`
sets the downlink pipeline of every run (default: the main job's).

    .venv/bin/python benchmarks/main_job.py --seed 0 --output-dir runs/benchmarks
    .venv/bin/python benchmarks/main_job.py --seed 0 --downlink none
"""

import argparse
import time
from pathlib import Path

from pocketfl.server.config import load_run_config
from pocketfl.simulations.engine import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument(
        "--compression",
        action="append",
        help="pipelines to run beside 'none' (default: the main job's)",
    )
    parser.add_argument("--downlink", help="downlink pipeline of every run (default: the main job's)")
    args = parser.parse_args()

    defaults = load_run_config({})
    pipelines = args.compression or [defaults.compression]
    downlink = args.downlink or defaults.downlink_compression
    rows = []
    for compression in [*pipelines, "none"]:
        name = f"seed{args.seed}-{_slug(compression)}-down-{_slug(downlink)}"
        config = load_run_config(
            {
                "run_name": name,
                "compression": compression,
                "downlink_compression": downlink,
                "seed": args.seed,
                "num_server_rounds": args.rounds,
                "output_dir": args.output_dir,
            }
        )
        started = time.perf_counter()
        report = simulate(config)
        summary = report.summary
        ratio = summary.uplink_compression_ratio
        downlink_ratio = summary.downlink_compression_ratio
        rows.append(
            f"| `{compression}` | `{downlink}` | {args.seed} | {summary.final_accuracy:.4f} | "
            f"{summary.best_accuracy:.4f} | {summary.total_uplink_bytes:,} | {ratio:.1f}x | "
            f"{summary.total_downlink_payload_bytes:,} | {summary.total_downlink_bytes:,} | "
            f"{downlink_ratio:.2f}x | {time.perf_counter() - started:.0f} s |"
        )

    print(
        "| compression | downlink | seed | final accuracy | best accuracy | uplink bytes | vs float32 "
        "| downlink payload bytes | downlink message bytes | downlink vs float32 | wall time |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def _slug(spec: str) -> str:
    return spec.replace(":", "").replace(",", "-")


if __name__ == "__main__":
    main()
