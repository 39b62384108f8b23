"""Training throughput of the HAR model on one CPU core, in samples per second.

The default device profiles (simulations/profiles.py) scale phone speeds from
this number. The model, batch size and optimizer are those of the main job.

    .venv/bin/python benchmarks/device_speed.py
"""

import time

import numpy as np
import torch

from pocketfl.tasks.har.model import build_model
from pocketfl.tasks.har.training import train

WINDOWS = 2048
EPOCHS = 2
REPEATS = 5


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((WINDOWS, 6, 128)).astype(np.float32)
    y = rng.integers(0, 6, size=WINDOWS).astype(np.int64)

    speeds = []
    for repeat in range(REPEATS):
        model = build_model(seed=repeat)
        started = time.perf_counter()
        train(model, x, y, epochs=EPOCHS, learning_rate=0.05, batch_size=32, seed=repeat)
        speeds.append(WINDOWS * EPOCHS / (time.perf_counter() - started))

    print(f"samples per second, {REPEATS} runs: {', '.join(f'{speed:,.0f}' for speed in speeds)}")
    print(f"max {max(speeds):,.0f}, median {float(np.median(speeds)):,.0f}")


if __name__ == "__main__":
    main()
