"""Selection of a node's training data from its node config.

In simulation Flower sets `partition-id` and `num-partitions` on each
simulated node. A deployed phone instead names its own data: for the HAR
task, node config `person-id=3` selects that person's recordings. A person
is then the partition of that person alone among the training people, so
the same data loading and seeding serve both.
"""

from collections.abc import Mapping, Sequence
from typing import Any

PERSON_ID_KEY = "person-id"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"


def node_partition(node_config: Mapping[str, Any], train_people: Sequence[int]) -> tuple[int, int]:
    """Return (partition_id, num_partitions) of this node, or raise ValueError naming the fix.

    `train_people` are the people that train, in the order that the task
    deals them to partitions. Dealt one per partition, person `person-id`
    lands in the partition of its index in that order.
    """
    if PERSON_ID_KEY in node_config:
        person = node_config[PERSON_ID_KEY]
        if isinstance(person, bool) or not isinstance(person, int):
            raise ValueError(f"invalid node config {PERSON_ID_KEY}={person!r}: expected an integer")
        if person not in train_people:
            raise ValueError(
                f"invalid node config {PERSON_ID_KEY}={person}: this run trains on people "
                f"{sorted(train_people)}, the others are held out for central evaluation"
            )
        return list(train_people).index(person), len(train_people)

    if PARTITION_ID_KEY in node_config and NUM_PARTITIONS_KEY in node_config:
        return int(node_config[PARTITION_ID_KEY]), int(node_config[NUM_PARTITIONS_KEY])

    # The keys received make a typo such as `persn-id` visible.
    raise ValueError(
        f"node config has neither {PERSON_ID_KEY} nor {PARTITION_ID_KEY} and {NUM_PARTITIONS_KEY} "
        f"(its keys: {sorted(node_config)}): start the SuperNode with --node-config '{PERSON_ID_KEY}=N'"
    )
