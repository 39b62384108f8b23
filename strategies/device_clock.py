"""Simulated time of a round: the device model a strategy calls, and the rules that close a round.

The strategy measures the exact bytes of every message but has no model of phones.
A `DeviceClock` (the simulations package provides one) turns a node's bytes
and examples into seconds. `close_round` then applies the round's rules,
as a production server would: a phone that dropped out never reports, a
report after the deadline is late, and the round closes as soon as it has the
number of reports it needs; later reports are discarded as late too.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ClientTime:
    """Simulated seconds one phone spends on one round."""

    download_seconds: float
    train_seconds: float
    upload_seconds: float

    @property
    def total_seconds(self) -> float:
        """Seconds from the start of the round until the report reaches the server."""
        return self.download_seconds + self.train_seconds + self.upload_seconds


class DeviceClock(Protocol):
    """Simulated phones, as seen by the server's strategy."""

    def drops_out(self, node_id: int, server_round: int, elapsed_seconds: float) -> bool:
        """Return whether the sampled node leaves this round before reporting.

        `elapsed_seconds` is the simulated time before the round starts, so an
        implementation can follow the hour of day.
        """
        ...

    def client_time(
        self,
        node_id: int,
        server_round: int,
        downlink_bytes: int,
        uplink_bytes: int,
        num_examples: int,
    ) -> ClientTime:
        """Return the node's simulated download, training and upload seconds."""
        ...

    def memory_limit_mb(self, node_id: int) -> float | None:
        """Return the memory the node's phone has for training, in MB (10**6 bytes), or None.

        The strategy sends it with the round, and a phone whose training
        would need more declines the round.
        """
        ...


@dataclass
class RoundOutcome:
    """Accepted and late reports of a round, and its length in simulated seconds."""

    accepted: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    seconds: float = 0.0


def close_round(
    times: Mapping[int, ClientTime],
    target_reports: int,
    deadline_seconds: float | None,
    waited_for_dropouts: bool = False,
    send_order: Mapping[int, int] | None = None,
) -> RoundOutcome:
    """Keep the first `target_reports` reports that arrive before the deadline.

    Parameters
    ----------
    times : mapping of node id to ClientTime
        Every node that reported (dropouts are not in it).
    target_reports : int
        Reports the server needs; it closes the round when the last of them
        arrives.
    deadline_seconds : float or None
        Reports after this many seconds are late. None waits for everyone.
    waited_for_dropouts : bool, default False
        Whether some sampled nodes dropped out. A server cannot tell a dropout
        from a slow phone, so when the target is not met it waits until the
        deadline.
    send_order : mapping of node id to int, optional
        Position of each node in the round's sample. Reports that arrive at
        the same simulated second are taken in this order, then by node id.
        Simulated node ids change between runs, so a seeded run passes it to
        keep equal phones in the same order.

    Returns
    -------
    RoundOutcome
        Accepted and late node ids in order of arrival, and the round's
        length: the arrival of the last accepted report when the target is
        met; otherwise the deadline (or, without one, the last arrival).
    """
    send_order = send_order or {}
    arrivals = sorted(
        times, key=lambda node: (times[node].total_seconds, send_order.get(node, len(send_order)), node)
    )
    on_time = [node for node in arrivals if _in_time(times[node], deadline_seconds)]
    outcome = RoundOutcome(accepted=on_time[:target_reports])
    outcome.late = [node for node in arrivals if node not in set(outcome.accepted)]

    if len(outcome.accepted) >= target_reports and outcome.accepted:
        outcome.seconds = times[outcome.accepted[-1]].total_seconds
    elif deadline_seconds is not None and (outcome.late or waited_for_dropouts):
        outcome.seconds = deadline_seconds
    else:
        outcome.seconds = max(_totals(times.values()), default=0.0)
    return outcome


def _in_time(time: ClientTime, deadline_seconds: float | None) -> bool:
    return deadline_seconds is None or time.total_seconds <= deadline_seconds


def _totals(times: Iterable[ClientTime]) -> list[float]:
    return [time.total_seconds for time in times]
