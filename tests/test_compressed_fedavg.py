"""CompressedFedAvg on hand-made messages and replies, without a Flower run."""

import json
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from pocketfl.compression import UpdateCodec
from pocketfl.strategies import CompressedFedAvg
from pocketfl.strategies.device_clock import ClientTime
from pocketfl.strategies.compressed_fedavg import MEMORY_LIMIT_KEY
from pocketfl.strategies.discarded_reports import DISCARDED_ROUND_KEY

SHAPES = {"w": (4,)}


def _reply(update: np.ndarray, num_examples: int, node_id: int, spec: str = "none"):
    # Flower's Message needs a running app to be built, so a stand-in carries
    # the parts that aggregate_train reads: content, metadata and has_error.
    payload = UpdateCodec(spec).encode({"w": update}, seed=0)
    metrics = {"num-examples": num_examples, "train-loss": 0.1, "train-seconds": 0.1, "payload-bytes": len(payload)}
    content = RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord(metrics)})
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node_id), has_error=lambda: False)


def _strategy(uplink: str | None = None) -> CompressedFedAvg:
    strategy = CompressedFedAvg(uplink=uplink)
    strategy._global = {"w": np.full(4, 0.5, dtype=np.float32)}
    return strategy


def test_weighted_mean_applied_to_global():
    strategy = _strategy()
    replies = [_reply(np.full(4, 1.0, np.float32), 1, 1), _reply(np.full(4, 4.0, np.float32), 3, 2)]

    arrays, metrics = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 0.5 + 13 / 4))
    assert metrics["train-loss"] == 0.1
    assert strategy.traffic[1].clients == 2


def test_huge_weighted_update_does_not_overflow_sum():
    strategy = _strategy()
    largest = np.finfo(np.float32).max
    reply = _reply(np.array([largest, 0, 0, 0], np.float32), 10_000_000, 1)

    arrays, _ = strategy.aggregate_train(1, [reply])

    assert np.isfinite(arrays["w"].numpy()).all()


def test_non_finite_aggregate_keeps_previous_global():
    strategy = _strategy()
    strategy._global = {"w": np.full(4, np.finfo(np.float32).max, dtype=np.float32)}
    reply = _reply(np.full(4, np.finfo(np.float32).max, np.float32), 5, 1)

    arrays, metrics = strategy.aggregate_train(1, [reply])

    assert arrays is None
    assert metrics is None


def test_other_uplink_pipeline_dropped():
    strategy = _strategy(uplink="topk:0.5,q:8")
    honest = _reply(np.arange(4, dtype=np.float32), 2, 1, spec="topk:0.5,q:8")
    float32 = _reply(np.arange(4, dtype=np.float32), 2, 2, spec="none")

    arrays, _ = strategy.aggregate_train(1, [honest, float32])

    assert arrays is not None
    assert strategy.traffic[1].clients == 1
    assert strategy.traffic[1].failed_clients == 1


# Reports discarded as late, named in the node's next train message.

NODES = [1, 2, 3]


class _SlowNodeClock:
    """Stand-in DeviceClock: no node drops out, and the nodes in `slow` report after 100 s."""

    def __init__(self, slow: set[int]) -> None:
        self.slow = slow

    def drops_out(self, node_id, server_round, elapsed_seconds):
        return False

    def client_time(self, node_id, server_round, downlink_bytes, uplink_bytes, num_examples):
        return ClientTime(0.0, 100.0 if node_id in self.slow else 1.0, 0.0)

    def memory_limit_mb(self, node_id):
        return None


def _stand_in_messages(strategy, record, node_ids, message_type):
    # Stands in for FedAvg's message construction: Flower's Message needs a running app to be built.
    return [
        SimpleNamespace(content=record, metadata=SimpleNamespace(dst_node_id=node, message_type=message_type))
        for node in node_ids
    ]


def _timed_strategy(monkeypatch, clock, error_feedback=True) -> CompressedFedAvg:
    monkeypatch.setattr(FedAvg, "_construct_messages", _stand_in_messages)
    return CompressedFedAvg(clock=clock, round_deadline=10.0, error_feedback=error_feedback)


def _discarded_rounds(strategy, server_round) -> dict[int, int | None]:
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    config = ConfigRecord({"server-round": server_round})
    grid = SimpleNamespace(get_node_ids=lambda: NODES)
    messages = strategy.configure_train(server_round, arrays, config, grid)
    return {
        message.metadata.dst_node_id: message.content["config"].get(DISCARDED_ROUND_KEY) for message in messages
    }


def _replies(nodes=NODES):
    return [_reply(np.ones(4, np.float32), 10, node) for node in nodes]


def test_late_node_gets_round_until_it_reports(monkeypatch):
    clock = _SlowNodeClock(slow={3})
    strategy = _timed_strategy(monkeypatch, clock)

    assert _discarded_rounds(strategy, 1) == {1: None, 2: None, 3: None}
    strategy.aggregate_train(1, _replies())
    assert strategy.traffic[1].late_clients == 1

    clock.slow = set()
    assert _discarded_rounds(strategy, 2) == {1: None, 2: None, 3: 1}
    strategy.aggregate_train(2, _replies())

    assert _discarded_rounds(strategy, 3) == {1: None, 2: None, 3: None}


def test_declining_node_gets_round_again(monkeypatch):
    clock = _SlowNodeClock(slow={3})
    strategy = _timed_strategy(monkeypatch, clock)
    _discarded_rounds(strategy, 1)
    strategy.aggregate_train(1, _replies())

    clock.slow = set()
    _discarded_rounds(strategy, 2)
    declined = RecordDict({"declined": ConfigRecord({"reason": "not charging"})})
    decline = SimpleNamespace(content=declined, metadata=SimpleNamespace(src_node_id=3), has_error=lambda: False)
    strategy.aggregate_train(2, [*_replies([1, 2]), decline])

    assert _discarded_rounds(strategy, 3)[3] == 1


def test_twice_late_node_gets_later_round(monkeypatch):
    strategy = _timed_strategy(monkeypatch, _SlowNodeClock(slow={2}))

    for server_round in (1, 2):
        _discarded_rounds(strategy, server_round)
        strategy.aggregate_train(server_round, _replies())

    assert _discarded_rounds(strategy, 3) == {1: None, 2: 2, 3: None}


def test_failed_round_names_every_report(monkeypatch):
    # Two on-time reports are fewer than the minimum of 3, so the round fails
    # and drops them as well as the late one.
    monkeypatch.setattr(FedAvg, "_construct_messages", _stand_in_messages)
    strategy = CompressedFedAvg(
        clock=_SlowNodeClock(slow={3}), round_deadline=10.0, error_feedback=True, min_reports=3
    )
    _discarded_rounds(strategy, 1)

    arrays, _ = strategy.aggregate_train(1, _replies())

    assert arrays is None
    assert _discarded_rounds(strategy, 2) == {1: 1, 2: 1, 3: 1}


def test_without_error_feedback_no_round_is_named(monkeypatch):
    strategy = _timed_strategy(monkeypatch, _SlowNodeClock(slow={3}), error_feedback=False)
    _discarded_rounds(strategy, 1)
    strategy.aggregate_train(1, _replies())

    assert _discarded_rounds(strategy, 2) == {1: None, 2: None, 3: None}


def test_discarded_rounds_survive_a_checkpoint(monkeypatch):
    strategy = _timed_strategy(monkeypatch, _SlowNodeClock(slow={3}))
    _discarded_rounds(strategy, 1)
    strategy.aggregate_train(1, _replies())

    state = json.loads(json.dumps(strategy.checkpoint_state()))
    restarted = _timed_strategy(monkeypatch, _SlowNodeClock(slow=set()))
    restarted.restore_state(state)

    assert _discarded_rounds(restarted, 2)[3] == 1


class _MemoryClock(_SlowNodeClock):
    """Stand-in DeviceClock whose node n has n MB for training."""

    def __init__(self) -> None:
        super().__init__(slow=set())

    def memory_limit_mb(self, node_id):
        return float(node_id)


def test_each_node_gets_own_memory_limit(monkeypatch):
    # With the downlink "none" the messages keep the config FedAvg built, so a
    # config shared among them would give every node the last node's limit.
    monkeypatch.setattr(FedAvg, "_construct_messages", _stand_in_messages)
    strategy = CompressedFedAvg(clock=_MemoryClock(), downlink="none")
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    grid = SimpleNamespace(get_node_ids=lambda: NODES)

    messages = strategy.configure_train(1, arrays, ConfigRecord({}), grid)

    limits = {message.metadata.dst_node_id: message.content["config"][MEMORY_LIMIT_KEY] for message in messages}
    assert limits == {1: 1.0, 2: 2.0, 3: 3.0}
