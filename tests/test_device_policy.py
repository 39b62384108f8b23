"""Device policy, per-node data selection and the on-device residual store."""

import json

import numpy as np
import pytest

from pocketfl.client.policy import (
    METERED_NETWORK,
    NOT_CHARGING,
    NOT_IDLE,
    STATUS_UNAVAILABLE,
    UNKNOWN_POLICY_KEY,
    DeviceStatus,
    decline_reason,
    read_device_status,
    training_decline_reason,
)
from pocketfl.client.residual_store import load_residual, residual_path, save_residual
from pocketfl.tasks.har.node_data import node_partition


def _flags(idle=True, charging=True, unmetered=True):
    return {"device-idle": idle, "device-charging": charging, "device-unmetered": unmetered}


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (_flags(), None),
        (_flags(idle=False), NOT_IDLE),
        (_flags(charging=False), NOT_CHARGING),
        (_flags(unmetered=False), METERED_NETWORK),
        (_flags(idle=False, charging=False, unmetered=False), NOT_IDLE),
    ],
)
def test_policy_from_node_config(flags, reason):
    assert training_decline_reason(flags) == reason


@pytest.mark.parametrize("typo", ["device-charing", "devce-charging", "device-status", "device-unmeterd"])
def test_unknown_policy_key_declines(typo, caplog):
    config = {"person-id": 4, typo: False}

    with caplog.at_level("WARNING"):
        reason = training_decline_reason(config)

    assert reason == f"{UNKNOWN_POLICY_KEY} '{typo}'"
    assert typo in caplog.text
    assert "device-charging" in caplog.text


def test_unknown_policy_key_declines_even_with_valid_flags():
    assert training_decline_reason({**_flags(), "device-charing": False}).startswith(UNKNOWN_POLICY_KEY)


def test_other_node_config_keys_are_not_policy_keys():
    config = {"person-id": 4, "partition-id": 0, "num-partitions": 3, "state-dir": "/tmp/x", **_flags()}

    assert training_decline_reason(config) is None


def test_policy_without_inputs_trains():
    assert read_device_status({"person-id": 3}) is None
    assert training_decline_reason({"person-id": 3}) is None


def test_policy_from_status_file(tmp_path):
    status_file = tmp_path / "status.json"
    config = {"device-status-file": str(status_file)}

    status_file.write_text(json.dumps({"idle": True, "charging": True, "unmetered": True}))
    assert training_decline_reason(config) is None

    # The app rewrites the file; the next request sees the new state.
    status_file.write_text(json.dumps({"idle": True, "charging": False, "unmetered": True}))
    assert training_decline_reason(config) == NOT_CHARGING


@pytest.mark.parametrize(
    "contents",
    [None, "not json", "[1, 2]", '{"idle": true, "charging": true}', '{"idle": "yes", "charging": true, "unmetered": true}'],
)
def test_unreadable_status_file_declines(tmp_path, contents):
    status_file = tmp_path / "status.json"
    if contents is not None:
        status_file.write_text(contents)

    assert training_decline_reason({"device-status-file": str(status_file)}) == STATUS_UNAVAILABLE


def test_partial_node_config_declines():
    assert training_decline_reason({"device-idle": True}) == STATUS_UNAVAILABLE


def test_string_flag_declines():
    assert training_decline_reason(_flags(idle="true")) == STATUS_UNAVAILABLE


def test_decline_reason_of_status():
    assert decline_reason(DeviceStatus(idle=True, charging=True, unmetered=False)) == METERED_NETWORK
    assert decline_reason(None) is None


def test_person_id_selects_own_partition():
    train_people = (2, 5, 7, 11)

    assert node_partition({"person-id": 7}, train_people) == (2, 4)
    assert node_partition({"partition-id": 1, "num-partitions": 3}, train_people) == (1, 3)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"person-id": 3}, "held out"),
        ({"person-id": "7"}, "expected an integer"),
        ({}, "neither person-id"),
        ({"persn-id": 4, "state-dir": "/data"}, r"its keys: \['persn-id', 'state-dir'\]"),
    ],
)
def test_person_id_errors(config, message):
    with pytest.raises(ValueError, match=message):
        node_partition(config, (2, 5, 7, 11))


def test_residual_store_round_trip(tmp_path):
    path = residual_path({"state-dir": str(tmp_path / "state")})
    residual = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, dtype=np.float32)}
    save_residual(path, residual)

    loaded = load_residual(path, {"w": (2, 3), "b": (2,)})

    assert set(loaded) == {"w", "b"}
    np.testing.assert_array_equal(loaded["w"], residual["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["residual.npz"]


def test_residual_store_drops_other_model(tmp_path):
    path = tmp_path / "residual.npz"
    save_residual(path, {"w": np.zeros((2, 3), dtype=np.float32)})

    assert load_residual(path, {"w": (3, 2)}) is None
    assert load_residual(path, {"w": (2, 3), "b": (2,)}) is None


def test_residual_store_drops_torn_file(tmp_path):
    path = tmp_path / "residual.npz"
    path.write_bytes(b"PK\x03\x04 torn")

    assert load_residual(path, {"w": (2, 3)}) is None


def test_residual_store_needs_state_dir():
    assert residual_path({"person-id": 3}) is None


def test_train_round_declines_before_training(monkeypatch):
    from types import SimpleNamespace

    from pocketfl.client import app as client_app

    def fake_reply(msg, reason):
        return ("declined", msg, reason)

    def no_task(settings):
        raise AssertionError("a declining phone must not build its task")

    monkeypatch.setattr(client_app, "decline_reply", fake_reply)
    context = SimpleNamespace(node_config=_flags(charging=False))

    assert client_app.train_round(no_task, "message", context) == ("declined", "message", NOT_CHARGING)
