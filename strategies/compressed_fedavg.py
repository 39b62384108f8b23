"""FedAvg over compressed client updates, aggregated in a stream."""

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pocketfl.compression import DecodeError, decode_update, payload_float32_bytes

from .replies import EVALUATE_METRICS, TRAIN_METRICS, WeightedMetrics, read_metrics
from .streaming import StreamingMean

logger = logging.getLogger(__name__)

UPDATE_KEY = "update"
PAYLOAD_KEY = "payload"


@dataclass
class RoundTraffic:
    """Bytes and clients of one training round, measured from the real messages."""

    sampled_clients: int = 0
    clients: int = 0
    failed_clients: int = 0
    downlink_bytes: int = 0
    uplink_bytes: int = 0
    uplink_message_bytes: int = 0
    uplink_float32_bytes: int = 0
    train_seconds: list[float] = field(default_factory=list)


class CompressedFedAvg(FedAvg):
    """Federated Averaging of updates that clients send as wire-format payloads.

    Each client replies with one payload that encodes `local - global`. The
    strategy decodes a reply under the shapes of the global model, adds it to a
    running weighted sum and drops it, so server memory stays at the global model
    plus one float64 sum however many clients reply. A reply that fails to
    decode costs that reply only: it is logged with its node id and left out of
    the average.

    Parameters are those of `flwr.serverapp.strategy.FedAvg`. Train replies must
    carry a ConfigRecord "update" with the bytes entry "payload" and a
    MetricRecord "metrics" with "num-examples" and the keys of `TRAIN_METRICS`.
    Evaluate replies carry "num-examples" and the keys of `EVALUATE_METRICS`.
    The round's metrics are weighted means of those keys only.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.traffic: dict[int, RoundTraffic] = {}
        self._global: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does and record the downlink bytes of the messages."""
        self._global = {name: array.numpy() for name, array in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))

        traffic = RoundTraffic(sampled_clients=len(messages))
        traffic.downlink_bytes = sum(
            recorddict_to_proto(message.content).ByteSize() for message in messages
        )
        self.traffic[server_round] = traffic
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode each reply into a running weighted sum, then apply the average."""
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        expected_shapes = {name: array.shape for name, array in self._global.items()}
        running_mean = StreamingMean(expected_shapes)
        train_metrics = WeightedMetrics()

        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                traffic.failed_clients += 1
                logger.warning(
                    "round %d: node %d failed to train: %s", server_round, node_id, reply.error.reason
                )
                continue

            try:
                delta, weight, metrics = self._decode_reply(reply, expected_shapes)
            except DecodeError as error:
                traffic.failed_clients += 1
                logger.warning("round %d: dropped reply from node %d: %s", server_round, node_id, error)
                continue

            running_mean.add(delta, weight)
            train_metrics.add(metrics, weight)

            traffic.clients += 1
            traffic.uplink_bytes += len(reply.content[UPDATE_KEY][PAYLOAD_KEY])
            traffic.uplink_message_bytes += recorddict_to_proto(reply.content).ByteSize()
            traffic.uplink_float32_bytes += payload_float32_bytes(expected_shapes)
            traffic.train_seconds.append(metrics["train-seconds"])

        logger.info(
            "round %d: aggregated %d of %d replies (%d dropped)",
            server_round,
            traffic.clients,
            traffic.sampled_clients,
            traffic.failed_clients,
        )
        if running_mean.count == 0:
            return None, None

        mean_delta = running_mean.mean()
        new_global = {name: self._global[name] + mean_delta[name] for name in self._global}
        arrays = ArrayRecord({name: Array(values) for name, values in new_global.items()})
        return arrays, train_metrics.mean()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the clients' local evaluation metrics, leaving out invalid replies."""
        evaluate_metrics = WeightedMetrics()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning(
                    "round %d: node %d failed to evaluate: %s", server_round, node_id, reply.error.reason
                )
                continue

            try:
                weight, metrics = read_metrics(reply.content, EVALUATE_METRICS)
            except DecodeError as error:
                logger.warning(
                    "round %d: dropped evaluate reply from node %d: %s", server_round, node_id, error
                )
                continue
            evaluate_metrics.add(metrics, weight)

        return evaluate_metrics.mean()

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
        return decode_update(payload, expected_shapes), weight, metrics
