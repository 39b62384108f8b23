"""The Task interface: what pocketfl needs to know about a model and its data.

A task bundles a model, the data each phone holds, the data the server keeps
for central evaluation, and how to train and evaluate. pocketfl's ClientApp
and ServerApp only go through this interface, so a user plugs in their own
model and data by writing one subclass and passing it to
`pocketfl.client.app.build_client_app` and `pocketfl.server.app.build_server_app`,
or by naming it as `--task package.module:ClassName`.

The built-in task is `har` (phone activity recognition, `pocketfl.tasks.har`).
`tests/example_task.py` is a small task on synthetic data.
"""

import importlib
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

BUILTIN_TASK = "har"

# `package.module:attribute`, as in Python entry points.
_IMPORT_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class ClientData:
    """One phone's local training split and local evaluation split.

    Inputs are float32 arrays with the batch on axis 0; labels are int64 class indices.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings of one round, as the server sent them."""

    epochs: int
    learning_rate: float
    batch_size: int
    seed: int


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one local training run: examples seen, mean loss, wall time in seconds."""

    num_examples: int
    loss: float
    seconds: float


@dataclass(frozen=True)
class TaskSettings:
    """What the run config tells a task when it is created, on the server and on each phone.

    Attributes
    ----------
    seed : int
        Run seed: a task that splits or shuffles its data must do so from it,
        so that every process sees the same split.
    cache_dir : Path or None
        Folder for prepared data; None means the task's default.
    held_out_people : int
        Data owners (people, users) whose data the server keeps for central
        evaluation. A task without owners may ignore it.
    partitioning : str
        How the training examples are split over phones: "people" (the task's
        own split by owner) or a spec of `pocketfl.tasks.partitioning` for
        virtual phones. A task that supports only its own split may ignore it.
    """

    seed: int = 0
    cache_dir: Path | None = None
    held_out_people: int = 6
    partitioning: str = "people"


class Task(ABC):
    """A model, its federated data, and how to train and evaluate it.

    Subclasses set `name` and implement the abstract methods. They may also
    set `central_data_name`. Every method
    must be deterministic given the `TaskSettings` the task was built with:
    the server and each phone build their own instance.
    """

    name: str = ""
    # Name of the data that `central_data()` returns, as the run's summary prints it.
    central_data_name: str = "the central test data"

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings

    @abstractmethod
    def build_model(self, seed: int | None = None) -> nn.Module:
        """Return a fresh model; with a seed, its initial weights are drawn from it."""

    @abstractmethod
    def default_num_clients(self) -> int:
        """Return the number of phones when the run config sets none."""

    @abstractmethod
    def load_partition(self, partition_id: int, num_partitions: int) -> ClientData:
        """Return the data of phone `partition_id` out of `num_partitions`."""

    @abstractmethod
    def central_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the (inputs, labels) the server evaluates the global model on."""

    @abstractmethod
    def train(self, model: nn.Module, data: ClientData, settings: TrainSettings) -> TrainResult:
        """Train `model` in place on `data.x_train` and `data.y_train`."""

    @abstractmethod
    def evaluate(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Return (loss, accuracy) of `model` on (x, y)."""

    def max_clients(self) -> int | None:
        """Return the most phones the data can be split over, or None for no limit."""
        return None

    def client_data(self, node_config: Mapping[str, object]) -> ClientData:
        """Return the data of the phone that has this Flower node config.

        The Simulation Engine gives each node "partition-id" and
        "num-partitions"; a task whose phones read their own data on a device
        overrides this to read other keys.
        """
        try:
            partition_id = int(node_config["partition-id"])
            num_partitions = int(node_config["num-partitions"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"task '{self.name}' needs the node config keys 'partition-id' and "
                f"'num-partitions' (integers), got {dict(node_config)!r}"
            ) from None
        return self.load_partition(partition_id, num_partitions)

    def channel_chain(self) -> tuple[str, ...]:
        """Return the layers that channel pruning may narrow, in order, or () if none.

        Each is a Conv or Linear module whose output channels feed the next
        one's input channels through channel-wise layers only (ReLU, pooling).
        """
        return ()

    def data_owners(self) -> tuple[list[int], list[int]]:
        """Return the ids of the owners that train and of those held out, for the report."""
        return [], []


TaskFactory = Callable[[TaskSettings], Task]


def resolve_task(spec: str) -> TaskFactory:
    """Return the task class that `spec` names: "har", or "package.module:ClassName".

    The class must be a concrete subclass of `Task`; it is imported on this
    machine. Phones never import a task by a name the server sends: their
    ClientApp is built with its task.
    """
    if spec == BUILTIN_TASK:
        from pocketfl.tasks.har.task import HarTask

        return HarTask

    if not _IMPORT_SPEC.fullmatch(spec):
        raise ValueError(
            f"invalid task {spec!r}: use '{BUILTIN_TASK}' or an import path such as "
            "'mypackage.tasks:MyTask'"
        )
    module_name, attribute = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"invalid task {spec!r}: cannot import module '{module_name}' ({error}); "
            "check that it is installed or on PYTHONPATH"
        ) from None

    factory = getattr(module, attribute, None)
    if factory is None:
        raise ValueError(f"invalid task {spec!r}: module '{module_name}' has no class '{attribute}'")
    # Only a Task subclass is run: any other callable would be called with
    # TaskSettings, whatever it does.
    if not (isinstance(factory, type) and issubclass(factory, Task)) or inspect.isabstract(factory):
        raise ValueError(
            f"invalid task {spec!r}: '{attribute}' is not a concrete subclass of "
            "pocketfl.tasks.base.Task; see docs/tasks.md"
        )
    return factory
