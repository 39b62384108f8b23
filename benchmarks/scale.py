"""1,000 simulated phones: peak memory of the whole process tree and time per round against plain Flower.

Three runs on the same virtual phones (HAR pooled and split over `--phones`
phones), the same model and the same share of phones per round, one after
another in one invocation:

1. `flower-fedavg`: Flower's FedAvg with float32 ArrayRecords (benchmarks/plain_fedavg.py).
2. `pocketfl`: `pocketfl simulate` with its default compression, no device simulation.
3. `pocketfl-phones`: the same with the default device population, 30%
   over-selection and a round deadline.

Each run is a child process. The parent samples every 0.2 s the memory of
that child and all its descendants (the Ray GCS, raylet and workers) from
/proc: the sum of RSS, which counts shared pages once per process, and the
sum of PSS, which splits shared pages between the processes that map them.
Time per round is the wall time between the ends of consecutive central
evaluations, the same measure in all runs. Round 1 also starts the Ray
workers and loads the data in each, so the table gives the median of the
later rounds. On a shared machine other processes slow some runs, so the runs
repeat `--repeats` times in turn (A B C A B C) and the table keeps each run's
fastest median; the load average at each start is recorded. Results go to
`scale.json` in the output folder, and a markdown table is printed.

    .venv/bin/python benchmarks/scale.py --phones 1000 --fraction 0.1 --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RUNS = ("flower-fedavg", "pocketfl", "pocketfl-phones")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--partitioning", default="dirichlet:0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/scale"))
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = _run_worker(args)
        (args.output_dir / f"{args.worker}.json").write_text(json.dumps(result), encoding="utf-8")
        return

    args.output_dir.mkdir(parents=True, exist_ok=True)
    measurements = []
    for repeat in range(args.repeats):
        for run in RUNS:
            print(f"running {run}, repeat {repeat + 1} of {args.repeats}", flush=True)
            measurements.append(_measure(run, args))
    (args.output_dir / "scale.json").write_text(json.dumps(measurements, indent=2) + "\n", encoding="utf-8")

    rows = []
    for run in RUNS:
        repeats = [row for row in measurements if row["run"] == run]
        best = min(repeats, key=lambda row: row["median_round_seconds"])
        best["peak_tree_pss_mib"] = max(row["peak_tree_pss_mib"] for row in repeats)
        best["peak_tree_rss_mib"] = max(row["peak_tree_rss_mib"] for row in repeats)
        rows.append(best)
    _print_table(rows, args)


def _measure(run: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", run, *_forwarded(args)]
    load_average = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(command)
    peaks = {"rss_mib": 0.0, "pss_mib": 0.0, "processes": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, pss, count = _tree_memory(child.pid)
            if pss > peaks["pss_mib"]:
                peaks.update(pss_mib=pss, processes=count)
            peaks["rss_mib"] = max(peaks["rss_mib"], rss)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    return_code = child.wait()
    stop.set()
    sampler.join()
    if return_code != 0:
        raise SystemExit(f"{run} failed with exit code {return_code}")

    result = json.loads((args.output_dir / f"{run}.json").read_text(encoding="utf-8"))
    round_seconds = result["round_seconds"]
    return {
        "run": run,
        "total_seconds": time.perf_counter() - started,
        "round_seconds": round_seconds,
        "median_round_seconds": statistics.median(round_seconds[1:] or round_seconds),
        "load_average_at_start": load_average,
        "final_accuracy": result["accuracy"][-1],
        "peak_tree_rss_mib": peaks["rss_mib"],
        "peak_tree_pss_mib": peaks["pss_mib"],
        "processes_at_peak": peaks["processes"],
    }


def _forwarded(args: argparse.Namespace) -> list[str]:
    return [
        "--phones", str(args.phones),
        "--fraction", str(args.fraction),
        "--rounds", str(args.rounds),
        "--epochs", str(args.epochs),
        "--partitioning", args.partitioning,
        "--seed", str(args.seed),
        "--output-dir", str(args.output_dir),
    ]  # fmt: skip


def _tree_memory(root: int) -> tuple[float, float, int]:
    """Return (sum of RSS in MiB, sum of PSS in MiB, process count) of `root` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as file:
                # The command name in brackets may contain spaces; the parent pid follows it.
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))

    rss_kb = pss_kb = 0
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
        rss_kb += _rss_kb(pid)
        pss_kb += _pss_kb(pid)
    return rss_kb / 1024, pss_kb / 1024, len(tree)


def _rss_kb(pid: int) -> int:
    # /proc/PID/statm: the second field is the resident set, in pages.
    try:
        with open(f"/proc/{pid}/statm", encoding="utf-8") as file:
            return int(file.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def _run_worker(args: argparse.Namespace) -> dict:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    cache_dir = os.environ.get("POCKETFL_CACHE_DIR")
    if args.worker == "flower-fedavg":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plain_fedavg import run_plain_fedavg

        from pocketfl.tasks.base import TaskSettings

        settings = TaskSettings(
            seed=args.seed,
            cache_dir=Path(cache_dir) if cache_dir else None,
            partitioning=args.partitioning,
        )
        return run_plain_fedavg(settings, args.phones, args.fraction, args.rounds, args.epochs)

    from pocketfl.server.config import load_run_config
    from pocketfl.simulations.engine import simulate
    from pocketfl.simulations.profiles import DEFAULT_POPULATION

    phones = args.worker == "pocketfl-phones"
    config = load_run_config(
        {
            "run_name": args.worker,
            "num_server_rounds": args.rounds,
            "num_clients": args.phones,
            "partitioning": args.partitioning,
            "fraction_train": args.fraction,
            "local_epochs": args.epochs,
            "seed": args.seed,
            "output_dir": args.output_dir,
            "over_selection": 1.3 if phones else 1.0,
            "round_deadline": 120.0 if phones else None,
        }
    )
    report = simulate(config, population=DEFAULT_POPULATION if phones else None)
    return {
        "round_seconds": [record.wall_seconds for record in report.rounds],
        "accuracy": [record.accuracy for record in report.rounds],
    }


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    baseline = rows[0]["median_round_seconds"]
    print(
        f"\n{args.phones} phones ({args.partitioning}), {args.fraction:.0%} per round, "
        f"{args.rounds} rounds, {args.epochs} local epochs\n"
    )
    print("| run | median s per round | vs Flower FedAvg | peak tree PSS MiB | peak tree RSS MiB | processes | final accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['run']} | {row['median_round_seconds']:.2f} | {row['median_round_seconds'] / baseline:.2f}x | "
            f"{row['peak_tree_pss_mib']:,.0f} | {row['peak_tree_rss_mib']:,.0f} | "
            f"{row['processes_at_peak']} | {row['final_accuracy']:.4f} |"
        )


if __name__ == "__main__":
    main()
