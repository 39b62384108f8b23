"""Local training and evaluation of the HAR model on one CPU."""

import time

import numpy as np
import torch
from torch import nn

from pocketfl.tasks.base import TrainResult

EVAL_BATCH_SIZE = 512

# Clipping the gradient norm keeps SGD with momentum stable on the first rounds,
# when a phone's few hundred windows give large, one-sided gradients.
MAX_GRAD_NORM = 1.0


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> TrainResult:
    """Train `model` in place with SGD and momentum for `epochs` passes over (x, y).

    The optimizer state starts fresh each call, as it does on a phone that
    receives a new global model every round.
    """
    started = time.perf_counter()
    inputs = torch.from_numpy(x)
    targets = torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    model.train()
    total_loss, total_seen = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for batch in order.split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            total_loss += loss.item() * len(batch)
            total_seen += len(batch)

    return TrainResult(
        num_examples=len(inputs),
        loss=total_loss / max(total_seen, 1),
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of `model` on (x, y)."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set of windows")

    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH_SIZE):
        inputs = torch.from_numpy(x[start : start + EVAL_BATCH_SIZE])
        targets = torch.from_numpy(y[start : start + EVAL_BATCH_SIZE])
        logits = model(inputs)
        total_loss += loss_fn(logits, targets).item()
        correct += int((logits.argmax(dim=1) == targets).sum())
    return total_loss / len(x), correct / len(x)
