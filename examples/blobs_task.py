"""A pocketfl task on synthetic data: a small MLP that separates Gaussian blobs.

It shows everything a task needs, and nothing of HAR. Run it with

    PYTHONPATH=examples pocketfl simulate --task blobs_task:BlobsTask --clients 8 --rounds 5

The module must be importable by every simulated phone, hence PYTHONPATH.
Each phone draws its own blobs from the run seed and its partition id, with
a label skew: phone i sees mostly classes i mod 4 and (i + 1) mod 4.
"""

import time

import numpy as np
import torch
from torch import nn

from pocketfl.tasks.base import ClientData, Task, TaskSettings, TrainResult, TrainSettings

NUM_FEATURES = 10
NUM_CLASSES = 4
SAMPLES_PER_PHONE = 200
CENTRAL_SAMPLES = 1000
SKEW = 0.8


class BlobsTask(Task):
    """Four Gaussian blobs in 10 dimensions, classified by a 2-layer MLP (about 800 parameters)."""

    name = "blobs"

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        # The blob centres are part of the task: every process draws the same ones.
        self.centres = np.random.default_rng(settings.seed).normal(0.0, 2.0, (NUM_CLASSES, NUM_FEATURES))

    def build_model(self, seed: int | None = None) -> nn.Module:
        if seed is not None:
            torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(NUM_FEATURES, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))

    def default_num_clients(self) -> int:
        return 8

    def load_partition(self, partition_id: int, num_partitions: int) -> ClientData:
        rng = np.random.default_rng([self.settings.seed, partition_id])
        favourite = [partition_id % NUM_CLASSES, (partition_id + 1) % NUM_CLASSES]
        x, y = self._draw(rng, SAMPLES_PER_PHONE, favourite)
        cut = int(0.8 * len(y))
        return ClientData(x_train=x[:cut], y_train=y[:cut], x_eval=x[cut:], y_eval=y[cut:])

    def central_data(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.settings.seed, 2**31])
        return self._draw(rng, CENTRAL_SAMPLES, favourite=None)

    def train(self, model: nn.Module, data: ClientData, settings: TrainSettings) -> TrainResult:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(settings.seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
        inputs, targets = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)

        model.train()
        total_loss = 0.0
        for _ in range(settings.epochs):
            for batch in torch.randperm(len(inputs), generator=generator).split(settings.batch_size):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(batch)

        seen = settings.epochs * len(inputs)
        return TrainResult(len(inputs), total_loss / seen, time.perf_counter() - started)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        model.eval()
        logits = model(torch.from_numpy(x))
        targets = torch.from_numpy(y)
        loss = nn.functional.cross_entropy(logits, targets).item()
        accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
        return loss, accuracy

    def _draw(
        self, rng: np.random.Generator, count: int, favourite: list[int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if favourite is None:
            labels = rng.integers(0, NUM_CLASSES, count)
        else:
            skewed = rng.random(count) < SKEW
            labels = np.where(skewed, rng.choice(favourite, count), rng.integers(0, NUM_CLASSES, count))
        x = self.centres[labels] + rng.normal(0.0, 1.0, (count, NUM_FEATURES))
        return x.astype(np.float32), labels.astype(np.int64)
