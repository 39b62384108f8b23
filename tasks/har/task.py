"""HAR as a pocketfl Task: the HarCNN, one phone per person, held-out people on the server."""

from collections.abc import Mapping

import numpy as np
from torch import nn

from pocketfl.tasks.base import ClientData, Task, TaskSettings, TrainResult, TrainSettings
from pocketfl.tasks.partitioning import MIN_EXAMPLES_PER_PHONE

from .federation import HarFederation, load_federation
from .model import CHANNEL_CHAIN, build_model
from .node_data import node_partition
from .training import evaluate, train


class HarTask(Task):
    """Phone activity recognition on HAPT: 6 activities from 2.56 s accelerometer and gyroscope windows.

    `settings.held_out_people` people are kept for central evaluation, drawn
    with `settings.seed`; the others train as phones, one person's recordings
    per phone by default, or pooled and split over virtual phones by
    `settings.partitioning` (see `pocketfl.tasks.partitioning`).
    """

    name = "har"
    central_data_name = "the held-out people"

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self._federation: HarFederation | None = None

    @property
    def federation(self) -> HarFederation:
        """The normalized windows and the people split, loaded on first use."""
        if self._federation is None:
            cache_dir = str(self.settings.cache_dir) if self.settings.cache_dir else None
            self._federation = load_federation(
                self.settings.held_out_people, self.settings.seed, cache_dir
            )
        return self._federation

    def build_model(self, seed: int | None = None) -> nn.Module:
        return build_model(seed)

    def default_num_clients(self) -> int:
        return len(self.federation.split.train_people)

    def max_clients(self) -> int | None:
        if self.settings.partitioning == "people":
            return len(self.federation.split.train_people)
        num_train_windows = int(np.isin(self.federation.person, self.federation.split.train_people).sum())
        return num_train_windows // MIN_EXAMPLES_PER_PHONE

    def load_partition(self, partition_id: int, num_partitions: int) -> ClientData:
        return self.federation.client_arrays(partition_id, num_partitions, self.settings.partitioning)

    def client_data(self, node_config: Mapping[str, object]) -> ClientData:
        """Return this phone's data: node config `person-id` on a device, partitions in simulation."""
        partition_id, num_partitions = node_partition(node_config, self.federation.split.train_people)
        return self.load_partition(partition_id, num_partitions)

    def central_data(self) -> tuple[np.ndarray, np.ndarray]:
        return self.federation.held_out_arrays()

    def train(self, model: nn.Module, data: ClientData, settings: TrainSettings) -> TrainResult:
        return train(
            model,
            data.x_train,
            data.y_train,
            epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            batch_size=settings.batch_size,
            seed=settings.seed,
        )

    def evaluate(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return evaluate(model, x, y)

    def channel_chain(self) -> tuple[str, ...]:
        return CHANNEL_CHAIN

    def data_owners(self) -> tuple[list[int], list[int]]:
        split = self.federation.split
        return list(split.train_people), list(split.held_out_people)
