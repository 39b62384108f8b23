"""Compressed models for phones: dense float32 against 80% pruning with int8, exported and measured.

Runs the main job dense and with federated pruning to `--sparsity` (channel
pruning with and without quantization-aware training, global magnitude
pruning with it). Then it exports each final model with `pocketfl export`
and prints the markdown rows recorded in docs/benchmarks.md. The rows give accuracy on the
held-out people in each file's own runtime, bytes on disk and CPU latency per
window. The script also measures the peak memory of one client's training
round.

    .venv/bin/python benchmarks/mobile_compression.py --output-dir runs/mobile
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from pocketfl.client.memory import training_peak_bytes
from pocketfl.client.pruned_training import compressed_training
from pocketfl.server.config import load_run_config
from pocketfl.server.export import export_run
from pocketfl.simulations.engine import simulate
from pocketfl.tasks.base import TrainSettings
from pocketfl.tasks.har.task import HarTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/mobile"))
    parser.add_argument("--skip-training", action="store_true", help="export the runs already there")
    parser.add_argument("--only", nargs="+", help="run only these of the runs below")
    parser.add_argument("--compression", help="uplink pipeline of every run (default: the main job's)")
    args = parser.parse_args()

    # Pruning reaches its target at 3/4 of the rounds by default. The
    # "-early" runs reach it at half, and "-late" one round before the end.
    channel = {"pruning": "channel", "target_sparsity": args.sparsity}
    runs = {
        "dense": {},
        "channel": channel,
        "channel-qat": {**channel, "qat": True},
        "channel-qat-late": {**channel, "qat": True, "pruning_end_round": args.rounds - 1},
        "channel-qat-early": {**channel, "qat": True, "pruning_end_round": args.rounds // 2},
        "channel-early": {**channel, "pruning_end_round": args.rounds // 2},
        "global-qat": {"pruning": "global", "target_sparsity": args.sparsity, "qat": True},
    }
    if args.only:
        runs = {name: runs[name] for name in args.only}
    results = {}
    for name, options in runs.items():
        values = {
            "run_name": f"{name}-seed{args.seed}",
            "seed": args.seed,
            "num_server_rounds": args.rounds,
            "output_dir": args.output_dir,
            **options,
        }
        if args.compression:
            values["compression"] = args.compression
        config = load_run_config(values)
        if not args.skip_training:
            simulate(config)
        report = json.loads((config.run_dir / "report.json").read_text())
        exported = export_run(config.run_dir)
        results[name] = {
            "federated_accuracy": report["summary"]["final_accuracy"],
            "wall_seconds": report["summary"]["wall_seconds"],
            "files": [dataclasses.asdict(item) for item in exported],
        }

    results["peak_memory_bytes"] = _peak_memory(args.seed)
    (args.output_dir / "mobile_compression.json").write_text(json.dumps(results, indent=2))
    _print_rows(results)


def _peak_memory(seed: int) -> dict[str, int]:
    # The largest phone's round: its data, the model, one step's activations,
    # gradients and optimizer state, as the ClientApp measures it.
    task = HarTask(load_run_config({"seed": seed}).task_settings)
    clients = [task.load_partition(index, task.default_num_clients()) for index in range(task.default_num_clients())]
    data = max(clients, key=lambda client: len(client.y_train))
    settings = TrainSettings(epochs=1, learning_rate=0.05, batch_size=32, seed=seed)

    peaks = {}
    for qat in (False, True):
        def step(model, x, y, qat=qat):
            with compressed_training(model, {}, qat):
                task.train(model, dataclasses.replace(data, x_train=x, y_train=y), settings)

        model = task.build_model(seed)
        peaks["qat" if qat else "float32"] = training_peak_bytes(model, data.x_train, data.y_train, 32, step)
    peaks["windows"] = len(data.y_train)
    return peaks


def _print_rows(results: dict) -> None:
    print("| run | federated accuracy | file | params | bytes | vs dense float32 file | sparsity "
          "| zstd bytes | zstd vs dense float32 file | accuracy in runtime | agreement with PyTorch "
          "| max logit diff | ms per window |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    dense = {item["name"]: item["bytes"] for item in results["dense"]["files"]} if "dense" in results else {}
    for name, result in results.items():
        if name == "peak_memory_bytes":
            continue
        for item in result["files"]:
            reference = dense.get("model_float32" + Path(item["name"]).suffix, item["bytes"])
            print(
                f"| {name} | {result['federated_accuracy']:.4f} | `{item['name']}` | {item['parameters']:,} "
                f"| {item['bytes']:,} | 1/{reference / item['bytes']:.1f} | {item['sparsity']:.3f} "
                f"| {item['zstd_bytes']:,} | 1/{reference / item['zstd_bytes']:.1f} | {item['accuracy']:.4f} "
                f"| {item['agreement']:.4f} | {item['max_abs_difference']:.2g} | {item['latency_ms']:.3f} |"
            )
    print()
    print(f"peak training memory: {results['peak_memory_bytes']}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
