"""The simulated clock: phones from a population, seconds from real bytes and examples."""

import math
from collections.abc import Iterable

import numpy as np

from pocketfl.strategies.device_clock import ClientTime

from .profiles import DeviceProfile, Population

SECONDS_PER_HOUR = 3600.0
BITS_PER_BYTE = 8
BITS_PER_MEGABIT = 1_000_000
BYTES_PER_MIB = 2**20
# Last word of the dropout draws' seed, apart from the sampler's and from the
# phones' training seeds (see SAMPLING_STREAM in strategies/sampling.py).
DROPOUT_STREAM = 0x64726F70


class PhoneClock:
    """A `DeviceClock` that gives each node a device profile drawn from a population.

    Profiles are dealt to nodes in exact proportion to their weights (largest
    remainder), in an order drawn from `seed`. Nodes are dealt in the order
    `assign` gets them, which the strategy gives in stable-key order
    (partition id), so with the same seed and number of nodes phone k gets
    the same profile and the same dropouts in every run.

    Parameters
    ----------
    population : Population
        The device profiles and their weights.
    seed : int
        Seed for dealing profiles and for dropouts.
    local_epochs : int
        Passes over the local data per round: training time is
        `local_epochs * num_examples / train_samples_per_second`.
    start_hour : float, default 0.0
        Hour of the simulated day at which round 1 starts, for profiles whose
        availability follows the hour.
    required_memory_mb : float, default 0.0
        Memory one training job needs; phones with less never take part.
    """

    def __init__(
        self,
        population: Population,
        seed: int,
        local_epochs: int,
        start_hour: float = 0.0,
        required_memory_mb: float = 0.0,
    ) -> None:
        self.population = population
        self.seed = seed
        self.local_epochs = local_epochs
        self.start_hour = start_hour
        self.required_memory_mb = required_memory_mb
        self._phones: dict[int, tuple[int, DeviceProfile]] = {}

    def assign(self, node_ids: Iterable[int]) -> None:
        """Deal profiles to `node_ids`, in their order; nodes already dealt keep theirs."""
        new_nodes = [node for node in dict.fromkeys(node_ids) if node not in self._phones]
        if not new_nodes:
            return

        start = len(self._phones)
        profiles = self._deal(len(new_nodes), start)
        for index, (node_id, profile) in enumerate(zip(new_nodes, profiles)):
            self._phones[node_id] = (start + index, profile)

    def profile(self, node_id: int) -> DeviceProfile:
        """Return the profile of `node_id`, dealing one if the node is new."""
        if node_id not in self._phones:
            self.assign([node_id])
        return self._phones[node_id][1]

    def drops_out(self, node_id: int, server_round: int, elapsed_seconds: float) -> bool:
        """Draw whether the node drops out: always if it lacks memory, else with probability 1 - availability."""
        profile = self.profile(node_id)
        if profile.memory_mb < self.required_memory_mb:
            return True

        hour = int((self.start_hour + elapsed_seconds / SECONDS_PER_HOUR) % 24)
        phone_index = self._phones[node_id][0]
        draw = np.random.default_rng([self.seed, server_round, phone_index, DROPOUT_STREAM]).random()
        return bool(draw >= profile.availability_at(hour))

    def client_time(
        self,
        node_id: int,
        server_round: int,
        downlink_bytes: int,
        uplink_bytes: int,
        num_examples: int,
    ) -> ClientTime:
        """Compute the seconds to download, train `local_epochs` passes and upload, at the profile's rates."""
        profile = self.profile(node_id)
        return ClientTime(
            download_seconds=transfer_seconds(downlink_bytes, profile.downlink_mbps),
            train_seconds=self.local_epochs * num_examples / profile.train_samples_per_second,
            upload_seconds=transfer_seconds(uplink_bytes, profile.uplink_mbps),
        )

    def memory_limit_mb(self, node_id: int) -> float | None:
        """Return the profile's memory for training, converted from MiB to MB (10**6 bytes)."""
        return self.profile(node_id).memory_mb * BYTES_PER_MIB / 1e6

    def _deal(self, count: int, offset: int) -> list[DeviceProfile]:
        """Return `count` profiles in weight proportion (largest remainder), shuffled by seed."""
        profiles = self.population.profiles
        weights = np.array([profile.weight for profile in profiles], dtype=np.float64)
        quotas = weights / weights.sum() * count
        counts = np.floor(quotas).astype(int)
        remainders = quotas - counts
        for index in np.argsort(-remainders, kind="stable")[: count - counts.sum()]:
            counts[index] += 1

        dealt = [profile for profile, number in zip(profiles, counts) for _ in range(number)]
        order = np.random.default_rng([self.seed, offset]).permutation(len(dealt))
        return [dealt[index] for index in order]


def transfer_seconds(num_bytes: int, megabits_per_second: float) -> float:
    """Return the seconds to move `num_bytes` at `megabits_per_second` (1 Mbps = 10^6 bit/s)."""
    if num_bytes < 0 or not math.isfinite(megabits_per_second) or megabits_per_second <= 0:
        raise ValueError(
            f"invalid transfer of {num_bytes} bytes at {megabits_per_second} Mbps: "
            "bytes must be >= 0 and the bandwidth a positive number"
        )
    return num_bytes * BITS_PER_BYTE / (megabits_per_second * BITS_PER_MEGABIT)
