import numpy as np
import pytest

from pocketfl.tasks.har.partition import local_eval_mask, people_for_partition, split_people


def test_split_is_disjoint_and_complete():
    people = np.repeat(np.arange(1, 31), 5)
    split = split_people(people, num_held_out=6, seed=3)
    assert len(split.held_out_people) == 6
    assert len(split.train_people) == 24
    assert set(split.held_out_people).isdisjoint(split.train_people)
    assert set(split.held_out_people) | set(split.train_people) == set(range(1, 31))


def test_split_depends_on_seed_only():
    people = np.repeat(np.arange(1, 31), 5)
    assert split_people(people, 6, seed=1) == split_people(people, 6, seed=1)
    assert split_people(people, 6, seed=1) != split_people(people, 6, seed=2)


@pytest.mark.parametrize("num_held_out", [0, 30])
def test_split_out_of_range(num_held_out):
    with pytest.raises(ValueError, match="num_held_out"):
        split_people(np.arange(1, 31), num_held_out, seed=0)


def test_one_person_per_partition():
    train = (2, 4, 6, 8)
    assert [people_for_partition(train, i, 4) for i in range(4)] == [(2,), (4,), (6,), (8,)]


def test_fewer_partitions_deal_people_round_robin():
    train = (1, 2, 3, 4, 5)
    assignments = [people_for_partition(train, i, 2) for i in range(2)]
    assert assignments == [(1, 3, 5), (2, 4)]


@pytest.mark.parametrize(("partition_id", "num_partitions"), [(0, 6), (3, 3), (-1, 2)])
def test_partition_out_of_range(partition_id, num_partitions):
    with pytest.raises(ValueError, match="out of range"):
        people_for_partition((1, 2, 3, 4, 5), partition_id, num_partitions)


def test_local_eval_takes_latest_fifth_of_each_activity():
    y = np.array([0] * 10 + [1] * 5 + [0] * 10)
    person = np.array([1] * 15 + [2] * 10)
    mask = local_eval_mask(y, person)

    assert mask[:10].tolist() == [False] * 8 + [True] * 2
    assert mask[10:15].tolist() == [False] * 4 + [True]
    assert mask[15:].sum() == 2
    assert mask[-2:].all()
