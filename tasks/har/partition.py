"""People-level splits of HAR: one client per person, some people held out."""

from dataclasses import dataclass

import numpy as np

# Share of each person's windows of each activity kept for the client's local
# evaluation. The held-out block is the last one in time, so overlapping windows
# leak across the boundary by at most one window per activity and session.
LOCAL_EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class PeopleSplit:
    """Split of people into clients and the held-out set for central evaluation."""

    train_people: tuple[int, ...]
    held_out_people: tuple[int, ...]


def split_people(people: np.ndarray, num_held_out: int, seed: int) -> PeopleSplit:
    """Hold out `num_held_out` people, drawn with `seed`; the rest are clients."""
    unique_people = np.unique(people)
    if not 1 <= num_held_out < len(unique_people):
        raise ValueError(
            f"num_held_out={num_held_out} is out of range: the data set has "
            f"{len(unique_people)} people, so hold out between 1 and {len(unique_people) - 1}."
        )

    shuffled = np.random.default_rng(seed).permutation(unique_people)
    held_out = tuple(sorted(int(p) for p in shuffled[:num_held_out]))
    train = tuple(sorted(int(p) for p in shuffled[num_held_out:]))
    return PeopleSplit(train_people=train, held_out_people=held_out)


def people_for_partition(
    train_people: tuple[int, ...], partition_id: int, num_partitions: int
) -> tuple[int, ...]:
    """Return the people whose data the client `partition_id` of `num_partitions` holds.

    With one partition per training person this is the natural non-IID split.
    With fewer partitions, people are dealt round-robin, so a client may hold
    several people.
    """
    if not 1 <= num_partitions <= len(train_people):
        raise ValueError(
            f"num_partitions={num_partitions} is out of range: there are "
            f"{len(train_people)} training people, so run 1 to {len(train_people)} clients."
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id={partition_id} is out of range 0 to {num_partitions - 1}."
        )
    return tuple(train_people[partition_id::num_partitions])


def local_eval_mask(y: np.ndarray, person: np.ndarray) -> np.ndarray:
    """Mark the last `LOCAL_EVAL_FRACTION` of each person's windows of each activity.

    Windows are in recording order, so the marked block is the latest in time.
    """
    mask = np.zeros(len(y), dtype=bool)
    for p in np.unique(person):
        for label in np.unique(y[person == p]):
            indices = np.flatnonzero((person == p) & (y == label))
            num_eval = int(round(len(indices) * LOCAL_EVAL_FRACTION))
            if num_eval > 0:
                mask[indices[-num_eval:]] = True
    return mask
