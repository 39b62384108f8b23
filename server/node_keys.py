"""Learn each node's stable key with one Flower query message per node.

Sampling and the simulated clock order nodes by this key, because node ids
are drawn anew whenever a simulation starts (see
pocketfl.strategies.sampling). A node still takes part when it does not
reply within the timeout, replies with an error (as a ClientApp without a
query handler does), or replies with anything but a non-negative integer
partition id. It then has no key and is sampled after the keyed nodes.
"""

import logging
import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

# Keys of the phone's query reply. The server does not import client code, so
# they are defined on both sides (see pocketfl.client.identity), and a test
# checks that they agree.
IDENTITY_KEY = "identity"
PARTITION_ID_KEY = "partition-id"

# Seconds between two checks while too few nodes are connected, as in Flower.
WAIT_SECONDS = 1.0

# Maximum wait for the replies, in seconds. They need no data or training, and
# a node that has not replied by then must not hold up the first round.
MAX_QUERY_SECONDS = 120.0


def query_node_keys(grid: Grid, min_nodes: int, timeout: float) -> dict[int, int]:
    """Return the partition id of every connected node that gives a usable one.

    Waits until `min_nodes` nodes are connected, as sampling would, so that
    the nodes of the first round receive the query. Then waits for the replies
    at most `timeout` seconds, and at most `MAX_QUERY_SECONDS`. The first
    message to a simulated phone also starts its Ray worker, so in simulation
    this wait includes that start-up, which round 1 would pay otherwise.

    NOTE: nodes that connect after the query never receive it and have no key.
    """
    while len(node_ids := list(grid.get_node_ids())) < min_nodes:
        logger.info("waiting for nodes to connect: %d connected, %d needed", len(node_ids), min_nodes)
        time.sleep(WAIT_SECONDS)

    started = time.perf_counter()
    queries = [
        Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in node_ids
    ]
    keys = {}
    replies = list(grid.send_and_receive(queries, timeout=min(timeout, MAX_QUERY_SECONDS)))
    for reply in replies:
        node_id = reply.metadata.src_node_id
        key = partition_id_of(reply)
        if key is None:
            logger.debug("node %d gave no usable partition id, so it is sampled after the others", node_id)
        else:
            keys[node_id] = key

    logger.info(
        "%d of %d nodes gave a partition id in %.1f s", len(keys), len(node_ids), time.perf_counter() - started
    )
    errors = sum(reply.has_error() for reply in replies)
    missing = len(node_ids) - len(replies)
    if errors or missing:
        # One line for all of them, because Flower has already logged each node's error.
        logger.warning(
            "%d nodes replied to the identity query with an error (as a ClientApp without a query "
            "handler does) and %d did not reply. They are sampled after the nodes with a partition id.",
            errors,
            missing,
        )
    return keys


def partition_id_of(reply: Message) -> int | None:
    """Return the partition id in a query reply, or None for an error or anything unusable."""
    if reply.has_error() or IDENTITY_KEY not in reply.content.config_records:
        return None
    value = reply.content.config_records[IDENTITY_KEY].get(PARTITION_ID_KEY)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value
