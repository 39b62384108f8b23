"""HAR prepared for federated learning: normalized windows, people split, per-client arrays."""

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketfl.tasks.base import ClientData

from .data import load_har_windows
from .partition import PeopleSplit, local_eval_mask, people_for_partition, split_people


@dataclass(frozen=True)
class HarFederation:
    """All windows, normalized with statistics of the training people only."""

    x: np.ndarray
    y: np.ndarray
    person: np.ndarray
    local_eval: np.ndarray
    split: PeopleSplit

    def client_arrays(self, partition_id: int, num_partitions: int) -> ClientData:
        """Return the windows of the people that client `partition_id` holds."""
        people = people_for_partition(self.split.train_people, partition_id, num_partitions)
        mine = np.isin(self.person, people)
        train_rows = mine & ~self.local_eval
        eval_rows = mine & self.local_eval
        return ClientData(
            x_train=self.x[train_rows],
            y_train=self.y[train_rows],
            x_eval=self.x[eval_rows],
            y_eval=self.y[eval_rows],
        )

    def held_out_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return every window of the held-out people, for central evaluation."""
        rows = np.isin(self.person, self.split.held_out_people)
        return self.x[rows], self.y[rows]


@functools.lru_cache(maxsize=4)
def load_federation(
    num_held_out: int, seed: int, cache_dir: str | None = None
) -> HarFederation:
    """Load HAR windows once per process and split them by person.

    Channels are standardized with the mean and standard deviation of the
    training people's windows, so nothing about held-out people leaks into the
    inputs. Every process computes the same statistics from the same cache.
    """
    windows = load_har_windows(Path(cache_dir) if cache_dir else None)
    split = split_people(windows.person, num_held_out, seed)

    train_rows = np.isin(windows.person, split.train_people)
    mean = windows.x[train_rows].mean(axis=(0, 2), keepdims=True)
    std = windows.x[train_rows].std(axis=(0, 2), keepdims=True) + 1e-6
    x = ((windows.x - mean) / std).astype(np.float32)

    return HarFederation(
        x=x,
        y=windows.y.astype(np.int64),
        person=windows.person,
        local_eval=local_eval_mask(windows.y, windows.person),
        split=split,
    )
