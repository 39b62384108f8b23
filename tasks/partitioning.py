"""Split a data set over many virtual phones with flwr-datasets partitioners.

A task whose data has natural owners (HAR: people) gives each phone one
owner, which caps the phones at the number of owners. To simulate hundreds
or thousands of phones, a task can pool its training examples and split them
by one of these specs:

| spec | partitioner | skew |
| --- | --- | --- |
| `people` | none: the task's own split by owner | natural |
| `iid` | `IidPartitioner` | none |
| `dirichlet:ALPHA` | `InnerDirichletPartitioner` by label, equal sizes | label skew, stronger for small ALPHA |
| `size:SIGMA` | `SizePartitioner`, sizes log-normal with shape SIGMA | size skew |

`DirichletPartitioner` is not used for label skew: with a thousand phones
and a few examples each, its rejection sampling for a minimum phone size
fails after its 10 attempts (flwr-datasets 0.6.1). The inner variant fixes
the sizes and draws each phone's label mix from Dirichlet(ALPHA).

Within each virtual phone, the last `LOCAL_EVAL_FRACTION` of its examples in
data set order are its local evaluation split.
"""

import re
from dataclasses import dataclass

import numpy as np

# Share of each phone's examples kept for its local evaluation, the latest in
# data set order (HAR: in recording order, as for people).
LOCAL_EVAL_FRACTION = 0.2

# Each virtual phone gets at least one example to train on and one to evaluate.
MIN_EXAMPLES_PER_PHONE = 2

_SPEC = re.compile(r"^(people|iid|dirichlet:(?P<alpha>[0-9.eE+-]+)|size:(?P<sigma>[0-9.eE+-]+))$")


@dataclass(frozen=True)
class Partitioning:
    """A parsed partitioning spec: its kind and its one parameter (alpha or sigma)."""

    kind: str
    parameter: float | None = None

    def __str__(self) -> str:
        return self.kind if self.parameter is None else f"{self.kind}:{self.parameter:g}"


def parse_partitioning(spec: str) -> Partitioning:
    """Parse 'people', 'iid', 'dirichlet:ALPHA' or 'size:SIGMA', or raise ValueError with the fix."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ValueError(
            f"unknown partitioning {spec!r}; use 'people', 'iid', 'dirichlet:ALPHA' "
            "(label skew, for example 'dirichlet:0.5') or 'size:SIGMA' (size skew, for example 'size:1')"
        )

    kind = spec.strip().split(":")[0]
    text = match.group("alpha") or match.group("sigma")
    if text is None:
        return Partitioning(kind)
    try:
        parameter = float(text)
    except ValueError:
        parameter = float("nan")
    if not np.isfinite(parameter) or parameter <= 0:
        raise ValueError(f"invalid value {text!r} in partitioning {spec!r}: it must be a positive number")
    return Partitioning(kind, parameter)


def partition_rows(
    labels: np.ndarray, partitioning: Partitioning, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Return, for each of `num_partitions` phones, the sorted indices into `labels` it holds.

    Raises ValueError when there are too few examples for each phone to hold
    `MIN_EXAMPLES_PER_PHONE`.
    """
    if partitioning.kind == "people":
        raise ValueError("'people' partitioning splits by person; use people_for_partition")
    if len(labels) < MIN_EXAMPLES_PER_PHONE * num_partitions:
        raise ValueError(
            f"{len(labels)} training examples cannot give {num_partitions} phones "
            f"{MIN_EXAMPLES_PER_PHONE} examples each; simulate at most "
            f"{len(labels) // MIN_EXAMPLES_PER_PHONE} phones"
        )

    # Imported here because `datasets` takes about a second to import and the
    # default people split does not need it.
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner, InnerDirichletPartitioner, SizePartitioner

    if partitioning.kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partitioning.kind == "dirichlet":
        partitioner = InnerDirichletPartitioner(
            partition_sizes=_equal_sizes(len(labels), num_partitions),
            partition_by="label",
            alpha=partitioning.parameter,
            seed=seed,
        )
    else:
        sizes = _log_normal_sizes(len(labels), num_partitions, partitioning.parameter, seed)
        partitioner = SizePartitioner(partition_sizes=sizes)

    # The partitioners split a Hugging Face Dataset. Only the labels and each
    # example's row go into it, never the inputs themselves.
    order = np.random.default_rng(seed).permutation(len(labels))
    partitioner.dataset = Dataset.from_dict(
        {"label": labels[order].tolist(), "row": order.tolist()}
    )
    return [
        np.sort(np.asarray(partitioner.load_partition(partition_id)["row"], dtype=np.int64))
        for partition_id in range(num_partitions)
    ]


def local_eval_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a phone's sorted rows into (train, eval): the last share in recording order evaluates."""
    num_eval = min(len(rows) - 1, max(1, int(round(len(rows) * LOCAL_EVAL_FRACTION))))
    return rows[: len(rows) - num_eval], rows[len(rows) - num_eval :]


def _equal_sizes(total: int, num_partitions: int) -> list[int]:
    base, remainder = divmod(total, num_partitions)
    return [base + 1 if index < remainder else base for index in range(num_partitions)]


def _log_normal_sizes(total: int, num_partitions: int, sigma: float, seed: int) -> list[int]:
    """Draw phone sizes from a log-normal with shape `sigma`, each >= the minimum, summing to `total`."""
    weights = np.random.default_rng(seed).lognormal(mean=0.0, sigma=sigma, size=num_partitions)
    spare = total - MIN_EXAMPLES_PER_PHONE * num_partitions
    extra = np.floor(weights / weights.sum() * spare).astype(int)
    # Hand the rounding leftovers to the largest phones, one example each.
    leftover = spare - int(extra.sum())
    extra[np.argsort(-weights)[:leftover]] += 1
    return [int(size) for size in extra + MIN_EXAMPLES_PER_PHONE]
