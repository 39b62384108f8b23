"""Checks on what a client reply carries besides its payload: the metrics record.

Any phone can send anything, so every value that reaches the report or the
weighted averages is checked here first. A failed check raises DecodeError,
which costs that reply only.
"""

import math
from collections.abc import Mapping

from flwr.app import MetricRecord, RecordDict

from pocketfl.compression import DecodeError

METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"

# A phone that will not take part replies with ConfigRecord "declined" holding
# a short text "reason" (the client writes these keys in its own module).
DECLINED_KEY = "declined"
REASON_KEY = "reason"
MAX_REASON_LENGTH = 200

# A phone reports its own example count, which weights its update. Counts above
# this bound are rejected so that one reply cannot dominate the average.
MAX_NUM_EXAMPLES = 10_000_000

# Metrics each reply must carry, with their allowed closed range.
TRAIN_METRICS = {
    "train-loss": (0.0, math.inf),
    "train-seconds": (0.0, math.inf),
    "payload-bytes": (0.0, math.inf),
}
EVALUATE_METRICS = {
    "loss": (0.0, math.inf),
    "accuracy": (0.0, 1.0),
}


def read_metrics(
    content: RecordDict, required: Mapping[str, tuple[float, float]]
) -> tuple[int, dict[str, float]]:
    """Return (num-examples, the required metrics) of one reply, or raise DecodeError.

    Metrics other than `required` and num-examples are ignored, so a client
    may report more without affecting the round's averages.
    """
    if METRICS_KEY not in content.metric_records:
        raise DecodeError(f"reply has no MetricRecord '{METRICS_KEY}'")
    metrics = content.metric_records[METRICS_KEY]

    weight = metrics.get(NUM_EXAMPLES_KEY)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_NUM_EXAMPLES:
        raise DecodeError(
            f"metric '{NUM_EXAMPLES_KEY}'={weight!r} must be an integer from 1 to {MAX_NUM_EXAMPLES}"
        )

    values = {}
    for key, (low, high) in required.items():
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DecodeError(f"metric '{key}'={value!r} must be a finite number")
        if not low <= value <= high:
            raise DecodeError(f"metric '{key}'={value!r} is outside [{low}, {high}]")
        values[key] = float(value)
    return weight, values


def declined_reason(content: RecordDict) -> str | None:
    """Return the reason of a reply that declines the round, or None if it does not decline.

    The reason is cut to `MAX_REASON_LENGTH` printable characters, since it
    comes from the phone and ends up in logs and the report.
    """
    if DECLINED_KEY not in content.config_records:
        return None

    reason = content.config_records[DECLINED_KEY].get(REASON_KEY)
    if not isinstance(reason, str):
        return "unspecified"
    reason = "".join(character for character in reason if character.isprintable())
    return reason.strip()[:MAX_REASON_LENGTH] or "unspecified"


def optional_count(content: RecordDict, key: str) -> int | None:
    """Return the metric `key` of a reply as a non-negative integer, or None if absent or invalid.

    For metrics a client may leave out, such as "peak-memory-bytes": a bad
    value is ignored rather than costing the reply its update.
    """
    value = content.metric_records[METRICS_KEY].get(key) if METRICS_KEY in content.metric_records else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return int(value)


class WeightedMetrics:
    """Weighted mean of per-client metrics, weighted by num-examples."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self.total_weight = 0

    def add(self, values: Mapping[str, float], weight: int) -> None:
        """Add one client's metrics with its example count as weight."""
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + weight * value
        self.total_weight += weight

    def mean(self) -> MetricRecord | None:
        """Return the weighted means, or None if no client was added."""
        if self.total_weight == 0:
            return None
        return MetricRecord({key: total / self.total_weight for key, total in self._sums.items()})
