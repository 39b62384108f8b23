"""Relative error of rank-r factors of real HAR client updates, by how the factors are found.

Trains the HAR CNN from its initial weights on several virtual phones of the
1,000-phone Dirichlet split and factors each phone's update of each weight
matrix. It prints the mean of ||M - approximation|| / ||M|| per layer for one
random sketch, for one and two subspace iterations, for pocketfl's encoder
(`lowrank:RANK` decoded from its payload) and for the truncated SVD, which is
the best any rank-r factors can do.

    .venv/bin/python benchmarks/lowrank_error.py --phones 20 --rank 2
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from pocketfl.compression import UpdateCodec, decode_update
from pocketfl.tasks.base import TaskSettings, TrainSettings
from pocketfl.tasks.har.task import HarTask

NUM_CLIENTS = 1000
METHODS = ("one sketch", "1 iteration", "2 iterations", "pocketfl", "truncated SVD")


def sketch_error(matrix: np.ndarray, rank: int, iterations: int, rng: np.random.Generator) -> float:
    """Return the relative error of projecting `matrix` on a randomized range estimate."""
    sketch = matrix @ rng.standard_normal((matrix.shape[1], rank))
    for _ in range(iterations):
        basis, _ = np.linalg.qr(sketch)
        sketch = matrix @ (matrix.T @ basis)
    basis, _ = np.linalg.qr(sketch)

    return float(np.linalg.norm(matrix - basis @ (basis.T @ matrix)) / np.linalg.norm(matrix))


def svd_error(matrix: np.ndarray, rank: int) -> float:
    """Return the relative error of the best rank-`rank` approximation."""
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt(np.sum(singular_values[rank:] ** 2)) / np.linalg.norm(matrix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=20, help="virtual phones to train, from partition 0")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--cache-dir", type=Path, default=None, help="HAR cache folder")
    args = parser.parse_args()

    task = HarTask(TaskSettings(seed=0, cache_dir=args.cache_dir, partitioning="dirichlet:0.5"))
    model = task.build_model(seed=0)
    initial = {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}
    codec = UpdateCodec(f"lowrank:{args.rank}")
    rng = np.random.default_rng(0)
    errors: dict[str, list[list[float]]] = {}

    for phone in range(args.phones):
        model.load_state_dict({name: torch.from_numpy(values.copy()) for name, values in initial.items()})
        settings = TrainSettings(epochs=2, learning_rate=args.learning_rate, batch_size=32, seed=phone)
        task.train(model, task.load_partition(phone, NUM_CLIENTS), settings)

        for name, values in model.state_dict().items():
            update = values.numpy() - initial[name]
            if codec.stages[0].factor_shape(update.shape) is None:
                continue
            matrix = update.reshape(update.shape[0], -1).astype(np.float64)
            decoded = decode_update(codec.encode({name: update}, phone), {name: update.shape})[name]
            encoder_error = np.linalg.norm(matrix - decoded.reshape(matrix.shape)) / np.linalg.norm(matrix)
            row = [sketch_error(matrix, args.rank, iterations, rng) for iterations in (0, 1, 2)]
            row += [float(encoder_error), svd_error(matrix, args.rank)]
            errors.setdefault(f"{name} {tuple(update.shape)}", []).append(row)

    print(f"| tensor (rank {args.rank}, {args.phones} phones) | " + " | ".join(METHODS) + " |")
    print("| --- " * (len(METHODS) + 1) + "|")
    for name, rows in errors.items():
        means = np.mean(rows, axis=0)
        print(f"| `{name}` | " + " | ".join(f"{mean:.3f}" for mean in means) + " |")


if __name__ == "__main__":
    main()
