"""Central (non-federated) training of the HAR CNN: the accuracy ceiling for federated runs.

Trains on all windows of the training people and evaluates on the held-out
people, with the same split, normalization and model as `pocketfl simulate`.

    python benchmarks/central_baseline.py --epochs 8 --seed 0
"""

import argparse
import time

import numpy as np
import torch

from pocketfl.tasks.har.federation import load_federation
from pocketfl.tasks.har.model import build_model
from pocketfl.tasks.har.training import evaluate, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--held-out-people", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    federation = load_federation(args.held_out_people, args.seed)
    train_rows = np.isin(federation.person, federation.split.train_people)
    x_test, y_test = federation.held_out_arrays()
    model = build_model(seed=args.seed)

    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train(
            model,
            federation.x[train_rows],
            federation.y[train_rows],
            epochs=1,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            seed=args.seed + epoch,
        )
        loss, accuracy = evaluate(model, x_test, y_test)
        print(f"epoch {epoch}: held-out accuracy {accuracy:.4f}, loss {loss:.4f}")

    print(f"{time.perf_counter() - started:.1f} s on one thread")


if __name__ == "__main__":
    main()
