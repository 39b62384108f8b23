"""Seeded client sampling: the same phones each round in every run with one seed.

Flower's `FedAvg` samples with Python's unseeded `random.sample` over the
Grid's node ids, and simulated node ids are drawn at random when the nodes
register, so neither the sample nor the order of nodes repeats between runs.
`SeededSampler` orders nodes by a stable key that the server learns from each
node (a simulated phone's partition id), then draws the sample from a
generator seeded with (run seed, round, stage).
"""

import logging
import time
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

# Stage codes for the generator's seed: training and federated evaluation of
# one round draw different samples.
TRAIN = 0
EVALUATE = 1

# Seconds between two checks while too few nodes are connected, as in Flower.
WAIT_SECONDS = 1.0


def stable_order(node_ids: Iterable[int], node_keys: Mapping[int, int]) -> list[int]:
    """Return `node_ids` ordered by stable key, then the nodes without one by node id.

    A node without a key (no usable reply to the server's query) still takes
    part, but its place in the order can differ between runs.
    """
    node_ids = set(node_ids)
    keyed = sorted((node_keys[node], node) for node in node_ids if node in node_keys)
    unkeyed = sorted(node for node in node_ids if node not in node_keys)
    return [node for _, node in keyed] + unkeyed


# Last word of the sampler's seed. Phones seed training with [seed, round,
# partition] and the simulated clock draws dropouts with its own last word, and
# numpy pads a seed with zeros, so a distinct non-zero last word keeps the
# streams apart.
SAMPLING_STREAM = 0x73616D70

def sample_in_order(
    ordered_nodes: list[int], sample_size: int, seed: int, server_round: int, stage: int
) -> list[int]:
    """Draw `sample_size` distinct nodes from `ordered_nodes`, seeded by (seed, round, stage).

    The sample keeps the order of `ordered_nodes`, so the messages built from
    it go out in the same order in every run.
    """
    if not 0 <= sample_size <= len(ordered_nodes):
        raise ValueError(
            f"invalid sample size {sample_size}: must be between 0 and the {len(ordered_nodes)} nodes"
        )
    rng = np.random.default_rng([seed, server_round, stage, SAMPLING_STREAM])
    chosen = np.sort(rng.choice(len(ordered_nodes), size=sample_size, replace=False))
    return [ordered_nodes[index] for index in chosen]


class SeededSampler:
    """Sample nodes as `FedAvg` does, but seeded and in stable-key order.

    The sample size and the wait for nodes follow Flower's `FedAvg` and
    `sample_nodes`: `max(int(fraction * connected), min_nodes)` nodes, after
    waiting until at least `max(min_available_nodes, sample size)` are connected.

    Parameters
    ----------
    seed : int
        Run seed.

    Attributes
    ----------
    node_keys : dict of int to int
        Stable key of each node id that has one; the server fills it from the
        nodes' query replies before the first round. Nodes missing here sort after
        the keyed ones, by node id.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.node_keys: dict[int, int] = {}

    def stable_order(self, node_ids: Iterable[int]) -> list[int]:
        """Return `node_ids` in stable-key order (see `stable_order`)."""
        return stable_order(node_ids, self.node_keys)

    def sample(
        self,
        grid: Grid,
        server_round: int,
        stage: int,
        fraction: float,
        min_nodes: int,
        min_available_nodes: int,
    ) -> tuple[list[int], list[int]]:
        """Return the sampled node ids and all connected node ids, both in stable-key order."""
        sample_size = max(int(len(list(grid.get_node_ids())) * fraction), min_nodes)
        needed = max(min_available_nodes, sample_size)
        while len(all_nodes := list(grid.get_node_ids())) < needed:
            logger.info("waiting for nodes to connect: %d connected, %d needed", len(all_nodes), needed)
            time.sleep(WAIT_SECONDS)

        ordered = self.stable_order(all_nodes)
        return sample_in_order(ordered, sample_size, self.seed, server_round, stage), ordered
