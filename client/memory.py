"""Peak memory of local training, measured, and the device limit a round must fit in."""

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

# Key of Flower's node config that sets a device's memory for training, in MB
# (10**6 bytes). The run config's memory-limit-mb applies where it is unset.
MEMORY_LIMIT_KEY = "memory-limit-mb"

TrainStep = Callable[[nn.Module, np.ndarray, np.ndarray], object]


def training_peak_bytes(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int, train_step: TrainStep
) -> int:
    """Measure the peak memory of a training round of `model` on (x, y), in bytes.

    Runs `train_step` (the task's training on a copy of the model, for one
    epoch) on one mini-batch under the PyTorch profiler, which records every
    CPU tensor allocation and free. The peak of live bytes during that step
    (activations, gradients, optimizer state, temporaries) repeats in every
    step of the round, so the round's peak is that plus what lives
    throughout: the model's parameters and the local data set.

    NOTE: this counts tensor memory, not the interpreter or the runtime
    libraries, which an app loads once; on a phone those are part of the
    app's footprint, not of a round.
    """
    probe = copy.deepcopy(model)
    batch = slice(0, min(batch_size, len(x)))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        train_step(probe, x[batch], y[batch])

    # Self memory counts each allocation (positive) and free (negative) once.
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in profiler.events()
        if event.self_cpu_memory_usage != 0
    )
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)

    resident = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    return int(peak + resident + x.nbytes + y.nbytes)


def memory_limit_bytes(node_config: dict, run_limit_mb: float) -> int | None:
    """Return the device's training memory limit in bytes, or None without one.

    The node's own `memory-limit-mb` (a phone's profile) wins over the run's.
    """
    value = node_config.get(MEMORY_LIMIT_KEY, run_limit_mb)
    try:
        limit_mb = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid node config {MEMORY_LIMIT_KEY}={value!r}; use a number of megabytes") from None
    return int(limit_mb * 1e6) if limit_mb > 0 else None
