"""Rounds on a simulated clock: over-selection, dropouts, a deadline and the first reports that count."""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto

from .device_clock import ClientTime, DeviceClock, close_round

logger = logging.getLogger(__name__)

NUM_EXAMPLES_KEY = "num-examples"
METRICS_KEY = "metrics"


@dataclass
class TimedRound:
    """Dropouts, late reports and simulated length of one round."""

    target_reports: int
    # Position of each node in the round's sample, the tie-break of equal arrivals.
    send_order: dict[int, int] = field(default_factory=dict)
    downlink_bytes: dict[int, int] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    late: set[int] = field(default_factory=set)
    seconds: float = 0.0


class RoundTimer:
    """Run rounds against a `DeviceClock`, as a server with real phones would.

    The server samples `over_selection` times the reports it needs, because
    some phones drop out and some are slow. Phones that drop out are never sent
    the round. When the replies are in, each reply's simulated arrival is its
    download + training + upload time, from its exact message sizes. The round
    keeps the first `target_reports` that arrive before the deadline and counts
    the rest as late.

    Parameters
    ----------
    clock : DeviceClock
        Simulated phones.
    deadline_seconds : float or None
        Simulated seconds after which a report is late; None waits for all.
    over_selection : float
        Phones sampled per report needed. 1.0 samples exactly the target, and
        about 1.3 covers dropout rates up to about 20%.
    """

    def __init__(self, clock: DeviceClock, deadline_seconds: float | None, over_selection: float) -> None:
        self.clock = clock
        self.deadline_seconds = deadline_seconds
        self.over_selection = over_selection
        self.elapsed_seconds = 0.0
        self.rounds: dict[int, TimedRound] = {}

    def sample_fraction(self, fraction_train: float) -> float:
        """Share of nodes to sample so that `fraction_train` of them can report."""
        return min(1.0, fraction_train * self.over_selection)

    def start_round(
        self,
        server_round: int,
        messages: list[Message],
        all_node_ids: Sequence[int],
        target_reports: int,
    ) -> list[Message]:
        """Deal profiles, drop the phones that leave this round, and return the messages to send.

        A clock with an `assign` method deals profiles to `all_node_ids` in
        the order given, so the caller passes them in stable-key order.
        """
        assign = getattr(self.clock, "assign", None)
        if assign is not None:
            assign(all_node_ids)

        timed = TimedRound(target_reports=target_reports)
        self.rounds[server_round] = timed
        to_send = []
        for index, message in enumerate(messages):
            node_id = message.metadata.dst_node_id
            timed.send_order[node_id] = index
            if self.clock.drops_out(node_id, server_round, self.elapsed_seconds):
                timed.dropped.append(node_id)
            else:
                to_send.append(message)
        return to_send

    def record_downlink(self, server_round: int, messages: list[Message], sizes: Sequence[int]) -> None:
        """Remember the exact size of each node's train message."""
        timed = self.rounds[server_round]
        for message, size in zip(messages, sizes):
            timed.downlink_bytes[message.metadata.dst_node_id] = size

    def close(self, server_round: int, replies: Sequence[Message]) -> TimedRound:
        """Time each reply, mark late ones, and advance the simulated clock by the round's length."""
        timed = self.rounds[server_round]
        times: dict[int, ClientTime] = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            num_examples = _num_examples(reply)
            if num_examples is None:
                # An error or malformed reply is left to the strategy to count as failed.
                continue
            times[node_id] = self.clock.client_time(
                node_id,
                server_round,
                downlink_bytes=timed.downlink_bytes.get(node_id, 0),
                uplink_bytes=recorddict_to_proto(reply.content).ByteSize(),
                num_examples=num_examples,
            )

        outcome = close_round(
            times,
            timed.target_reports,
            self.deadline_seconds,
            waited_for_dropouts=bool(timed.dropped),
            send_order=timed.send_order,
        )
        timed.late = set(outcome.late)
        timed.seconds = outcome.seconds
        self.elapsed_seconds += outcome.seconds
        logger.info(
            "round %d: %.1f simulated seconds, %d dropped out, %d late",
            server_round,
            outcome.seconds,
            len(timed.dropped),
            len(timed.late),
        )
        return timed


def target_reports(num_nodes: int, fraction_train: float, min_train_nodes: int) -> int:
    """Reports a round needs: FedAvg's sample size before over-selection."""
    return max(int(num_nodes * fraction_train), min_train_nodes)


def _num_examples(reply: Message) -> int | None:
    if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
        return None
    value = reply.content.metric_records[METRICS_KEY].get(NUM_EXAMPLES_KEY)
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return int(value)
