"""Seeded client sampling and the identity query, without a Flower run."""

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from pocketfl.client import identity
from pocketfl.server import node_keys
from pocketfl.server.node_keys import partition_id_of
from pocketfl.strategies.sampling import EVALUATE, TRAIN, SeededSampler, sample_in_order, stable_order


class _Grid:
    """The part of a Flower Grid that sampling reads."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def _run(seed: int, num_nodes: int, rng: np.random.Generator) -> tuple[SeededSampler, _Grid]:
    """A sampler and grid as a simulation sets them up: random node ids, keys 0..num_nodes-1."""
    node_ids = [int(node) for node in rng.choice(2**62, size=num_nodes, replace=False)]
    sampler = SeededSampler(seed)
    sampler.node_keys = {node: partition for partition, node in enumerate(node_ids)}
    return sampler, _Grid(rng.permutation(node_ids).tolist())


def _sampled_keys(sampler: SeededSampler, grid: _Grid, server_round: int, stage: int = TRAIN, fraction=0.5):
    sampled, _ = sampler.sample(grid, server_round, stage, fraction, min_nodes=1, min_available_nodes=1)
    return [sampler.node_keys[node] for node in sampled]


def test_same_seed_same_sample_new_node_ids():
    rng = np.random.default_rng(0)
    first, first_grid = _run(7, 24, rng)
    second, second_grid = _run(7, 24, rng)
    assert set(first_grid.node_ids).isdisjoint(second_grid.node_ids)

    for server_round in range(1, 6):
        assert _sampled_keys(first, first_grid, server_round) == _sampled_keys(second, second_grid, server_round)


def test_rounds_stages_and_seeds_draw_different_samples():
    first, grid = _run(7, 100, np.random.default_rng(1))
    other_seed = SeededSampler(8)
    other_seed.node_keys = first.node_keys

    round_one = _sampled_keys(first, grid, 1)
    assert round_one != _sampled_keys(first, grid, 2)
    assert round_one != _sampled_keys(first, grid, 1, stage=EVALUATE)
    assert round_one != _sampled_keys(other_seed, grid, 1)


@pytest.mark.parametrize(("num_nodes", "fraction", "min_nodes"), [(24, 0.5, 1), (1000, 0.1, 2), (7, 0.3, 1), (5, 0.1, 3)])
def test_sample_size_is_fedavgs(num_nodes, fraction, min_nodes):
    sampler, grid = _run(0, num_nodes, np.random.default_rng(2))

    sampled, all_nodes = sampler.sample(grid, 1, TRAIN, fraction, min_nodes, min_available_nodes=1)

    # flwr.serverapp.strategy.FedAvg.configure_train
    assert len(sampled) == max(int(num_nodes * fraction), min_nodes)
    assert len(set(sampled)) == len(sampled)
    assert set(sampled) <= set(all_nodes) == set(grid.node_ids)


def test_unkeyed_nodes_sort_last_by_node_id():
    keys = {50: 1, 40: 0, 10: 2}

    assert stable_order([99, 10, 5, 40, 50], keys) == [40, 50, 10, 5, 99]


def test_sample_keeps_the_stable_order():
    ordered = list(range(200, 100, -1))

    sampled = sample_in_order(ordered, 30, seed=0, server_round=1, stage=TRAIN)

    positions = [ordered.index(node) for node in sampled]
    assert positions == sorted(positions)
    with pytest.raises(ValueError, match="invalid sample size 101"):
        sample_in_order(ordered, 101, seed=0, server_round=1, stage=TRAIN)


def _query_reply(content=None, error=False):
    return SimpleNamespace(content=content or RecordDict(), has_error=lambda: error)


@pytest.mark.parametrize(
    "reply",
    [
        _query_reply(error=True),
        _query_reply(),
        _query_reply(RecordDict({"identity": ConfigRecord({})})),
        _query_reply(RecordDict({"identity": ConfigRecord({"partition-id": "3"})})),
        _query_reply(RecordDict({"identity": ConfigRecord({"partition-id": -1})})),
        _query_reply(RecordDict({"identity": ConfigRecord({"partition-id": 2.0})})),
        _query_reply(RecordDict({"identity": ConfigRecord({"partition-id": True})})),
        _query_reply(RecordDict({"identity": ConfigRecord({"partition-id": [1, 2]})})),
    ],
)
def test_unusable_query_replies_give_no_key(reply):
    assert partition_id_of(reply) is None


def test_query_reply_gives_the_partition_id():
    assert partition_id_of(_query_reply(RecordDict({"identity": ConfigRecord({"partition-id": 3})}))) == 3


def test_identity_keys_agree_on_both_sides():
    assert node_keys.IDENTITY_KEY == identity.IDENTITY_KEY
    assert node_keys.PARTITION_ID_KEY == identity.PARTITION_ID_KEY
