"""The Task interface: resolving a task by name, and what a task needs from a node."""

import sys
from pathlib import Path

import numpy as np
import pytest

from pocketfl.tasks.base import Task, TaskSettings, TrainSettings, resolve_task
from pocketfl.tasks.har.task import HarTask

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def blobs_task(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    yield resolve_task("blobs_task:BlobsTask")
    sys.modules.pop("blobs_task", None)


def test_builtin_name_resolves_to_har():
    assert resolve_task("har") is HarTask


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("blobs", "use 'har' or an import path"),
        ("os.path:join:x", "use 'har' or an import path"),
        ("no_such_module_here:Task", "cannot import module 'no_such_module_here'"),
        ("json:NoSuchClass", "has no class 'NoSuchClass'"),
        ("json:loads", "is not a concrete subclass"),
        ("os:system", "is not a concrete subclass"),
        ("pocketfl.tasks.base:Task", "is not a concrete subclass"),
    ],
)
def test_bad_task_names_fail_with_the_reason(spec, expected):
    with pytest.raises(ValueError, match=expected):
        resolve_task(spec)


def test_client_data_needs_partition_keys(blobs_task):
    task = blobs_task(TaskSettings(seed=0))

    with pytest.raises(ValueError, match="'partition-id' and 'num-partitions'"):
        task.client_data({"person-id": 3})

    data = task.client_data({"partition-id": 1, "num-partitions": 4})
    assert len(data.x_train) + len(data.x_eval) == 200


def test_example_task_is_deterministic_and_learns(blobs_task):
    task = blobs_task(TaskSettings(seed=3))
    again = blobs_task(TaskSettings(seed=3))
    first, second = task.load_partition(2, 8), again.load_partition(2, 8)
    np.testing.assert_array_equal(first.x_train, second.x_train)

    model = task.build_model(seed=0)
    x, y = task.central_data()
    _, before = task.evaluate(model, x, y)
    result = task.train(model, first, TrainSettings(epochs=20, learning_rate=0.1, batch_size=32, seed=0))
    _, after = task.evaluate(model, x, y)

    assert isinstance(task, Task)
    assert result.num_examples == len(first.y_train)
    assert after > before
