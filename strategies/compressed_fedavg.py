"""FedAvg over compressed client updates, aggregated in a stream."""

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pocketfl.compression import DecodeError, parse_compression_spec, payload_float32_bytes
from pocketfl.compression.masked_updates import decode_masked_update
from pocketfl.compression.pruning import Mask, apply_mask

from .device_clock import DeviceClock
from .discarded_reports import DiscardedReports
from .downlink import (
    BASE_VERSION_KEY,
    DEFAULT_MAX_VERSIONS,
    DOWNLINK_KEY,
    FULL_KEY,
    NO_VERSION,
    VERSION_KEY,
    DownlinkEncoder,
)
from .pruning import MASK_RECORD, PruningSchedule, prune_global
from .replies import (
    EVALUATE_METRICS,
    TRAIN_METRICS,
    WeightedMetrics,
    declined_reason,
    optional_count,
    read_metrics,
)
from .round_timer import RoundTimer, target_reports
from .sampling import EVALUATE, TRAIN, SeededSampler
from .streaming import StreamingMean

logger = logging.getLogger(__name__)

# Distinct decline reasons counted per round; any further reason counts as
# "other", so that phones cannot grow the report without bound.
MAX_DECLINE_REASONS = 16
OTHER_REASON = "other"

UPDATE_KEY = "update"
# Key of the round's config that contains the phone's training memory, in MB.
MEMORY_LIMIT_KEY = "memory-limit-mb"
PEAK_MEMORY_METRIC = "peak-memory-bytes"
PAYLOAD_KEY = "payload"


@dataclass
class RoundTraffic:
    """Bytes and clients of one training round, measured from the real messages."""

    sampled_clients: int = 0
    # Stable keys (partition ids) of the sampled nodes that have one, ascending.
    sampled_keys: list[int] = field(default_factory=list)
    clients: int = 0
    failed_clients: int = 0
    declined_clients: int = 0
    decline_reasons: dict[str, int] = field(default_factory=dict)
    downlink_bytes: int = 0
    downlink_payload_bytes: int = 0
    downlink_float32_bytes: int = 0
    uplink_bytes: int = 0
    uplink_message_bytes: int = 0
    uplink_float32_bytes: int = 0
    train_seconds: list[float] = field(default_factory=list)
    # Simulated time (only with a DeviceClock) and the minimum-report rule.
    dropped_clients: int = 0
    late_clients: int = 0
    simulated_seconds: float = 0.0
    round_failed: bool = False
    # Largest "peak-memory-bytes" a client measured for its training, if any did.
    peak_memory_bytes: int | None = None

    def add_decline(self, reason: str) -> None:
        """Count one phone that declined the round, by reason."""
        self.declined_clients += 1
        if reason not in self.decline_reasons and len(self.decline_reasons) >= MAX_DECLINE_REASONS:
            reason = OTHER_REASON
        self.decline_reasons[reason] = self.decline_reasons.get(reason, 0) + 1


class CompressedFedAvg(FedAvg):
    """Federated Averaging of updates that clients send as wire-format payloads.

    Each client replies with one payload that encodes `local - global`. The
    strategy decodes a reply under the shapes of the global model, adds it to a
    running weighted sum and drops it, so server memory stays at the global model
    plus one float64 sum however many clients reply. A reply that fails to
    decode costs that reply only: it is logged with its node id and left out of
    the average.

    With a downlink pipeline other than "none", train and evaluate messages
    carry no ArrayRecord but a ConfigRecord "downlink": the payload, its base
    version and the new version (see `DownlinkEncoder`). Clients train from
    their reconstruction and send `local - reconstruction`, and the strategy
    adds the mean of those deltas to the exact global model, not to a
    reconstruction: the global model then never takes on downlink
    quantization noise, and what a reconstruction misses goes out with the
    next delta. The central evaluation and the final model are the exact
    global model.

    Parameters
    ----------
    uplink : str or None, default None
        Uplink pipeline spec that clients must encode with, as sent in the
        round instructions. A payload under any other spec is dropped like an
        undecodable one, so a client cannot, say, send float32 where top-k was
        asked for. None accepts any valid spec.
    downlink : str, default "none"
        Downlink pipeline spec. "none" sends the float32 ArrayRecord, as
        `FedAvg` does.
    seed : int, default 0
        Run seed, for client sampling and the downlink's stochastic rounding.
    max_downlink_versions : int, default 3
        Reconstructions the server keeps, one float32 model copy each.
    min_reports : int, default 1
        A round with fewer aggregated reports fails: the global model is kept
        and the round is recorded as failed, not averaged over too few phones.
    clock : DeviceClock or None, default None
        Simulated phones. With one, the strategy samples `over_selection`
        times the reports it needs, leaves out phones that drop out, keeps the
        first reports that arrive before `round_deadline` on the simulated
        clock, and records each round's simulated seconds (see `RoundTimer`).
    round_deadline : float or None, default None
        Simulated seconds after which a report is late; None waits for all.
    over_selection : float, default 1.0
        Phones sampled per report needed, with a clock.
    pruning : PruningSchedule or None, default None
        Federated pruning. Each round the mask is decided from the global
        model, masked entries are zeroed, and the mask travels in the
        ConfigRecord "pruning-mask" of every train message; replies then
        encode only the kept entries (in C order, tensor by tensor) and
        masked entries of the aggregate stay zero.
    error_feedback : bool, default False
        Whether clients keep an error-feedback residual. With a clock, the
        train messages to a node whose report was discarded as late then
        name that round, so that the node can add the payload back into its
        residual (see `DiscardedReports`).
    **kwargs
        Those of `flwr.serverapp.strategy.FedAvg`.

    Clients are sampled with FedAvg's sample size and wait for
    `min_available_nodes`, but by `SeededSampler`. Before the first round the
    server stores each node's stable key (a simulated phone's partition id)
    in `sampler.node_keys`, so two runs with one seed sample the same phones
    every round.

    A phone may decline a round with a ConfigRecord "declined" holding a
    "reason"; it is counted in `RoundTraffic.declined_clients` by reason, as a
    dropout rather than a failure.

    Train replies must carry a ConfigRecord "update" with the bytes entry
    "payload" and a MetricRecord "metrics" with "num-examples" and the keys of
    `TRAIN_METRICS`.
    Evaluate replies carry "num-examples" and the keys of `EVALUATE_METRICS`.
    The round's metrics are weighted means of those keys only.
    """

    def __init__(
        self,
        uplink: str | None = None,
        downlink: str = "none",
        seed: int = 0,
        max_downlink_versions: int = DEFAULT_MAX_VERSIONS,
        min_reports: int = 1,
        clock: DeviceClock | None = None,
        round_deadline: float | None = None,
        over_selection: float = 1.0,
        pruning: PruningSchedule | None = None,
        error_feedback: bool = False,
        **kwargs,
    ) -> None:
        self.min_reports = min_reports
        self.timer = RoundTimer(clock, round_deadline, over_selection) if clock is not None else None
        self.target_fraction = kwargs.get("fraction_train", 1.0)
        if self.timer is not None:
            kwargs["fraction_train"] = self.timer.sample_fraction(self.target_fraction)
        super().__init__(**kwargs)
        self.sampler = SeededSampler(seed)
        self.uplink = parse_compression_spec(uplink) if uplink is not None else None
        self.traffic: dict[int, RoundTraffic] = {}
        self._global: dict[str, np.ndarray] = {}
        self.pruning = pruning
        self._mask: Mask = {}

        self.downlink: DownlinkEncoder | None = None
        if downlink != "none":
            self.downlink = DownlinkEncoder(downlink, seed, max_downlink_versions)
        # Version of each node's model as last confirmed by a reply, and the
        # version sent in the broadcast whose replies are still pending.
        self._held_versions: dict[int, int] = {}
        self._sent_versions: dict[int, int] = {}
        self.discarded = DiscardedReports() if error_feedback and self.timer is not None else None

    def checkpoint_state(self) -> dict:
        """Return what a restarted server needs to continue this strategy, as JSON-ready data."""
        state = {"downlink-last-version": self.downlink.last_version if self.downlink else NO_VERSION}
        if self.discarded is not None:
            state.update(self.discarded.checkpoint_state())
        return state

    def restore_state(self, state: dict) -> None:
        """Continue from `checkpoint_state()`; every node gets a full downlink next."""
        self._held_versions = {}
        self._sent_versions = {}
        if self.downlink is not None:
            self.downlink.continue_after(int(state.get("downlink-last-version", NO_VERSION)))
        if self.discarded is not None:
            self.discarded.restore_state(state)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients (seeded), encode the downlink and record its bytes."""
        self._global = {name: array.numpy() for name, array in arrays.items()}
        mask_record = None
        if self.pruning is not None:
            self._mask, self._global, mask_record = prune_global(self.pruning, server_round, self._global)
            arrays = ArrayRecord({name: Array(values) for name, values in self._global.items()})
        messages = self._sample(server_round, arrays, config, grid, TRAIN)
        sampled_clients = len(messages)
        sampled_keys = self._sampled_keys(messages)
        if self.timer is not None:
            # In stable-key order, so that the clock deals the same profile to the same phone.
            node_ids = self.sampler.stable_order(grid.get_node_ids())
            target = target_reports(len(node_ids), self.target_fraction, self.min_train_nodes)
            messages = self.timer.start_round(server_round, messages, node_ids, target)
        messages, payload_bytes = self._encode_downlink(messages)
        if mask_record is not None:
            for message in messages:
                message.content[MASK_RECORD] = mask_record
        if self.timer is not None:
            for message in messages:
                self._send_memory_limit(message, self.timer.clock)
        if self.discarded is not None:
            self.discarded.add_to_messages(messages, self.configrecord_key)

        traffic = RoundTraffic(sampled_clients=sampled_clients, sampled_keys=sampled_keys)
        message_sizes = [recorddict_to_proto(message.content).ByteSize() for message in messages]
        traffic.downlink_bytes = sum(message_sizes)
        if self.timer is not None:
            self.timer.record_downlink(server_round, messages, message_sizes)
            traffic.dropped_clients = sampled_clients - len(messages)
        traffic.downlink_payload_bytes = payload_bytes
        traffic.downlink_float32_bytes = len(messages) * payload_float32_bytes(self._shapes())
        self.traffic[server_round] = traffic
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients (seeded) and encode the downlink as for training."""
        self._global = {name: array.numpy() for name, array in arrays.items()}
        messages = self._sample(server_round, arrays, config, grid, EVALUATE)
        messages, _ = self._encode_downlink(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode each reply into a running weighted sum, then apply the average."""
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        expected_shapes = {name: array.shape for name, array in self._global.items()}
        running_mean = StreamingMean(expected_shapes)
        train_metrics = WeightedMetrics()

        replies = list(replies)
        late = set()
        if self.timer is not None:
            timed = self.timer.close(server_round, replies)
            late = timed.late
            traffic.late_clients = len(late)
            traffic.simulated_seconds = timed.seconds

        answered = set()
        aggregated = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if node_id in late:
                # The phone trained and rebuilt its downlink model; its report is discarded.
                answered.add(node_id)
                continue
            if reply.has_error():
                traffic.failed_clients += 1
                logger.warning(
                    "round %d: node %d failed to train: %s", server_round, node_id, reply.error.reason
                )
                continue

            # A phone that declined did not rebuild the downlink, so it stays
            # out of `answered` and gets a full model next time.
            reason = declined_reason(reply.content)
            if reason is not None:
                traffic.add_decline(reason)
                logger.debug("round %d: node %d declined to train: %s", server_round, node_id, reason)
                continue

            # Any other reply without an error means the node rebuilt its downlink model.
            answered.add(node_id)

            try:
                delta, weight, metrics = self._decode_reply(reply, expected_shapes)
            except DecodeError as error:
                traffic.failed_clients += 1
                logger.warning("round %d: dropped reply from node %d: %s", server_round, node_id, error)
                continue

            running_mean.add(delta, weight)
            train_metrics.add(metrics, weight)
            aggregated.add(node_id)

            traffic.clients += 1
            traffic.uplink_bytes += len(reply.content[UPDATE_KEY][PAYLOAD_KEY])
            traffic.uplink_message_bytes += recorddict_to_proto(reply.content).ByteSize()
            traffic.uplink_float32_bytes += payload_float32_bytes(expected_shapes)
            traffic.train_seconds.append(metrics["train-seconds"])
            peak = optional_count(reply.content, PEAK_MEMORY_METRIC)
            if peak is not None:
                traffic.peak_memory_bytes = max(peak, traffic.peak_memory_bytes or 0)

        self._settle_versions(answered)
        logger.info(
            "round %d: aggregated %d of %d replies (%d dropped, %d declined)",
            server_round,
            traffic.clients,
            traffic.sampled_clients,
            traffic.failed_clients,
            traffic.declined_clients,
        )
        if traffic.declined_clients:
            logger.info("round %d: declines by reason: %s", server_round, _reason_counts(traffic.decline_reasons))
        if running_mean.count < self.min_reports:
            traffic.round_failed = True
            logger.warning(
                "round %d failed: %d reports, fewer than the minimum of %d; the global model is kept",
                server_round,
                running_mean.count,
                self.min_reports,
            )
            self._settle_discarded(server_round, answered, late | aggregated)
            return None, None

        # Clients sent `local - reconstruction`. The mean goes onto the exact
        # global model (see the class docstring), as in plain FedAvg.
        with np.errstate(over="ignore"):
            mean_delta = running_mean.mean()
            new_global = {name: self._global[name] + mean_delta[name] for name in self._global}
            new_global = apply_mask(new_global, self._mask)

        # Each decoded update is finite, but a few huge ones can still push the
        # float32 model to inf, which would end every later round.
        if not all(np.isfinite(values).all() for values in new_global.values()):
            logger.error(
                "round %d: the aggregated model is not finite, so the round's updates are "
                "discarded and the previous global model is kept",
                server_round,
            )
            self._settle_discarded(server_round, answered, late | aggregated)
            return None, None

        self._settle_discarded(server_round, answered, late)
        arrays = ArrayRecord({name: Array(values) for name, values in new_global.items()})
        return arrays, train_metrics.mean()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the clients' local evaluation metrics, leaving out invalid replies."""
        evaluate_metrics = WeightedMetrics()
        answered = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning(
                    "round %d: node %d failed to evaluate: %s", server_round, node_id, reply.error.reason
                )
                continue

            reason = declined_reason(reply.content)
            if reason is not None:
                logger.info("round %d: node %d declined to evaluate: %s", server_round, node_id, reason)
                continue
            answered.add(node_id)

            try:
                weight, metrics = read_metrics(reply.content, EVALUATE_METRICS)
            except DecodeError as error:
                logger.warning(
                    "round %d: dropped evaluate reply from node %d: %s", server_round, node_id, error
                )
                continue
            evaluate_metrics.add(metrics, weight)

        self._settle_versions(answered)
        return evaluate_metrics.mean()

    def _sample(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, stage: int
    ) -> list[Message]:
        """Build FedAvg's train or evaluate messages for a seeded sample of nodes."""
        if stage == TRAIN:
            fraction, min_nodes, message_type = self.fraction_train, self.min_train_nodes, MessageType.TRAIN
        else:
            fraction, min_nodes, message_type = (
                self.fraction_evaluate,
                self.min_evaluate_nodes,
                MessageType.EVALUATE,
            )
        if fraction == 0.0:
            return []

        node_ids, all_nodes = self.sampler.sample(
            grid, server_round, stage, fraction, min_nodes, self.min_available_nodes
        )
        logger.info(
            "round %d: sampled %d of %d nodes for %s", server_round, len(node_ids), len(all_nodes), message_type
        )
        config["server-round"] = server_round

        # FedAvg shares one RecordDict among a round's messages. Each gets its own
        # config, so a per-node value (memory limit, discarded round) stays with its node.
        messages = []
        for node_id in node_ids:
            record = RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord(dict(config))}
            )
            messages.extend(self._construct_messages(record, [node_id], message_type))
        return messages

    def _sampled_keys(self, messages: list[Message]) -> list[int]:
        """Return the stable keys of the nodes that `messages` go to, ascending, leaving out nodes without one."""
        keys = self.sampler.node_keys
        nodes = [message.metadata.dst_node_id for message in messages]
        return sorted(keys[node] for node in nodes if node in keys)

    def _send_memory_limit(self, message: Message, clock: DeviceClock) -> None:
        """Tell the simulated phone its memory for training, in the round's config.

        The phone measures what its training needs and declines the round if
        that is more. A run-wide limit, when set, still applies if it is lower.
        """
        limit_mb = clock.memory_limit_mb(message.metadata.dst_node_id)
        if limit_mb is None:
            return

        config = message.content.config_records[self.configrecord_key]
        run_limit_mb = float(config.get(MEMORY_LIMIT_KEY, 0.0))
        config[MEMORY_LIMIT_KEY] = min(limit_mb, run_limit_mb) if run_limit_mb > 0 else limit_mb

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: array.shape for name, array in self._global.items()}

    def _encode_downlink(self, messages: list[Message]) -> tuple[list[Message], int]:
        """Replace the float32 model in each message by its downlink payload.

        Returns the messages and the sum of their payload lengths. With the
        downlink "none" the messages are left as FedAvg built them, and the
        payload is the float32 model, 4 bytes per parameter.
        """
        if self.downlink is None:
            return messages, len(messages) * payload_float32_bytes(self._shapes())

        nodes = [message.metadata.dst_node_id for message in messages]
        bases = {node: self._held_versions.get(node, NO_VERSION) for node in nodes}
        try:
            encoded = self.downlink.encode(self._global, set(bases.values()))
        except ValueError as error:
            # For example fp16 and a weight beyond its range. The float32 model
            # always encodes, and the nodes then hold no downlink version.
            logger.warning("downlink encoding failed, sending the float32 model this round: %s", error)
            for node in nodes:
                self._held_versions.pop(node, None)
            self._sent_versions = {}
            return messages, len(messages) * payload_float32_bytes(self._shapes())

        compressed = []
        payload_bytes = 0
        self._sent_versions = {}
        for message, node in zip(messages, nodes):
            model = encoded[bases[node]]
            downlink = ConfigRecord(
                {
                    PAYLOAD_KEY: model.payload,
                    BASE_VERSION_KEY: model.base_version,
                    VERSION_KEY: model.version,
                    FULL_KEY: model.full,
                }
            )
            config = message.content.config_records[self.configrecord_key]
            content = RecordDict({self.configrecord_key: config, DOWNLINK_KEY: downlink})
            compressed.append(
                Message(content=content, message_type=message.metadata.message_type, dst_node_id=node)
            )
            payload_bytes += len(model.payload)
            self._sent_versions[node] = model.version
        return compressed, payload_bytes

    def _settle_discarded(self, server_round: int, answered: set[int], discarded: set[int]) -> None:
        """Record the nodes whose update the server dropped, so that their phones add it back."""
        # With error feedback a phone counts its payload as applied once sent,
        # so a late report and every report of a failed round must be named back.
        if self.discarded is not None:
            self.discarded.settle(server_round, answered, discarded)

    def _settle_versions(self, answered: set[int]) -> None:
        """Record the version of each node that replied; forget the others.

        A node that replied without an error has rebuilt the version it was
        sent. A node that failed or sent no reply may have either version, so
        it gets a full encoding next time, because a delta against the wrong
        base would rebuild a wrong model.
        """
        for node, version in self._sent_versions.items():
            if node in answered:
                self._held_versions[node] = version
            else:
                self._held_versions.pop(node, None)
        self._sent_versions = {}

    def _decode_reply(
        self, reply: Message, expected_shapes: dict[str, tuple[int, ...]]
    ) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
        """Return (delta, weight, metrics) of one reply, or raise DecodeError naming what is wrong."""
        content = reply.content
        if UPDATE_KEY not in content.config_records:
            raise DecodeError(f"reply has no ConfigRecord '{UPDATE_KEY}'")

        payload = content.config_records[UPDATE_KEY].get(PAYLOAD_KEY)
        if not isinstance(payload, bytes):
            raise DecodeError(f"'{UPDATE_KEY}.{PAYLOAD_KEY}' must be bytes, got {type(payload).__name__}")

        weight, metrics = read_metrics(content, TRAIN_METRICS)
        # With pruning, masked tensors arrive compacted unless a low-rank pipeline factors them.
        delta = decode_masked_update(payload, expected_shapes, self._mask, self.uplink)
        return delta, weight, metrics


def _reason_counts(reasons: dict[str, int]) -> str:
    """Return "reason x count" pairs, most frequent first, for one log line."""
    ordered = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{reason} x{count}" for reason, count in ordered)
