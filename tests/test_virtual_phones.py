"""Virtual phones: the training windows split over many phones by flwr-datasets partitioners."""

import numpy as np
import pytest

from pocketfl.tasks.partitioning import (
    MIN_EXAMPLES_PER_PHONE,
    local_eval_rows,
    parse_partitioning,
    partition_rows,
)

LABELS = np.random.default_rng(0).integers(0, 6, size=3001)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "size:1.5"])
def test_every_window_goes_to_one_phone(spec):
    parts = partition_rows(LABELS, parse_partitioning(spec), 300, seed=1)

    assert len(parts) == 300
    rows = np.concatenate(parts)
    assert len(rows) == len(LABELS)
    assert len(np.unique(rows)) == len(LABELS)
    assert min(len(part) for part in parts) >= MIN_EXAMPLES_PER_PHONE


def test_partitions_repeat_with_seed():
    first = partition_rows(LABELS, parse_partitioning("dirichlet:0.5"), 50, seed=4)
    second = partition_rows(LABELS, parse_partitioning("dirichlet:0.5"), 50, seed=4)

    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def _mean_label_share(parts: list[np.ndarray]) -> float:
    # Share of each phone's windows that its most common label takes.
    return float(np.mean([np.bincount(LABELS[part]).max() / len(part) for part in parts]))


def test_small_alpha_skews_labels_more():
    skewed = partition_rows(LABELS, parse_partitioning("dirichlet:0.1"), 100, seed=0)
    mild = partition_rows(LABELS, parse_partitioning("dirichlet:100"), 100, seed=0)

    assert _mean_label_share(skewed) > _mean_label_share(mild) + 0.2


def test_size_skew_spreads_phone_sizes():
    sizes = [len(part) for part in partition_rows(LABELS, parse_partitioning("size:1.5"), 100, seed=0)]

    assert max(sizes) > 5 * np.median(sizes)


def test_too_many_phones_fail_with_the_limit():
    with pytest.raises(ValueError, match="simulate at most 1500 phones"):
        partition_rows(LABELS, parse_partitioning("iid"), 2000, seed=0)


@pytest.mark.parametrize("spec", ["dirichlet:0", "size:-1", "dirichlet:nan", "shards:3", "iid:2"])
def test_bad_spec_is_rejected(spec):
    with pytest.raises(ValueError, match="partitioning"):
        parse_partitioning(spec)


def test_local_eval_keeps_a_train_and_an_eval_window():
    train, evaluation = local_eval_rows(np.array([3, 8]))
    assert list(train) == [3]
    assert list(evaluation) == [8]

    train, evaluation = local_eval_rows(np.arange(10))
    assert list(train) == list(range(8))
    assert list(evaluation) == [8, 9]
