"""Phones that decline a round: counted as dropouts by reason, never averaged."""

from types import SimpleNamespace

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from pocketfl.client import decline as client_side
from pocketfl.compression import UpdateCodec
from pocketfl.strategies import CompressedFedAvg, replies as server_side
from pocketfl.strategies.compressed_fedavg import MAX_DECLINE_REASONS, OTHER_REASON


def _stand_in(content: RecordDict, node_id: int):
    # Flower's Message needs a running app to be built; aggregate_train reads only these parts.
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node_id), has_error=lambda: False)


def _update_reply(node_id: int):
    payload = UpdateCodec("none").encode({"w": np.ones(4, np.float32)}, seed=0)
    metrics = {"num-examples": 10, "train-loss": 0.1, "train-seconds": 0.1, "payload-bytes": len(payload)}
    content = RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord(metrics)})
    return _stand_in(content, node_id)


def _decline_reply(node_id: int, reason):
    return _stand_in(RecordDict({"declined": ConfigRecord({"reason": reason})}), node_id)


def _strategy() -> CompressedFedAvg:
    strategy = CompressedFedAvg()
    strategy._global = {"w": np.zeros(4, dtype=np.float32)}
    return strategy


def test_declines_are_counted_by_reason_and_left_out_of_the_mean():
    strategy = _strategy()
    replies = [
        _update_reply(1),
        _decline_reply(2, "not charging"),
        _decline_reply(3, "not charging"),
        _decline_reply(4, "needs 90 MB, limit 64 MB"),
    ]

    arrays, _ = strategy.aggregate_train(1, replies)

    traffic = strategy.traffic[1]
    assert traffic.clients == 1
    assert traffic.failed_clients == 0
    assert traffic.declined_clients == 3
    assert traffic.decline_reasons == {"not charging": 2, "needs 90 MB, limit 64 MB": 1}
    np.testing.assert_array_equal(arrays["w"].numpy(), np.ones(4, np.float32))


def test_round_of_only_declines_keeps_the_global_model():
    strategy = _strategy()

    arrays, metrics = strategy.aggregate_train(1, [_decline_reply(1, "on a metered network")])

    assert arrays is None
    assert metrics is None
    assert strategy.traffic[1].declined_clients == 1


def test_hostile_reasons_are_cut_and_bounded():
    strategy = _strategy()
    replies = [_decline_reply(node, f"reason {node}\n" + "x" * 1000) for node in range(40)]
    replies.append(_decline_reply(99, 12345))

    strategy.aggregate_train(1, replies)

    reasons = strategy.traffic[1].decline_reasons
    assert len(reasons) == MAX_DECLINE_REASONS + 1
    assert sum(reasons.values()) == 41
    assert reasons[OTHER_REASON] == 41 - MAX_DECLINE_REASONS
    assert all(len(reason) <= server_side.MAX_REASON_LENGTH and "\n" not in reason for reason in reasons)


def test_client_and_server_use_same_reply_keys():
    # The client may not import the strategies, so each side defines the keys.
    for key in ("DECLINED_KEY", "REASON_KEY", "MAX_REASON_LENGTH"):
        assert getattr(client_side, key) == getattr(server_side, key), key
