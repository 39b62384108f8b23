"""Device policy: a phone trains only while it is idle, charging and on an unmetered network.

The app that embeds the client knows the phone's state, so it sets the inputs,
in one of two ways:

- node config keys `device-idle`, `device-charging` and `device-unmetered`
  (booleans), fixed when the SuperNode starts;
- node config key `device-status-file`: the path of a JSON object
  `{"idle": true, "charging": true, "unmetered": true}` that the app rewrites
  whenever the state changes. The client reads it at each train request.

With neither, the policy allows training, as in simulation or on a host that
may always train. A phone that may not train declines the round with one of
the reasons below, and the server counts a dropout.

A node config key that looks like a policy key but is not one of them (it starts
with `device-`, or is a near miss such as `devce-charging`) declines too: a
typo such as `device-charing=false` would otherwise leave the phone training
on battery.
"""

import difflib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STATUS_FILE_KEY = "device-status-file"
# Node config key of each condition, and its key in the status file.
CONDITION_KEYS = {"idle": "device-idle", "charging": "device-charging", "unmetered": "device-unmetered"}
POLICY_KEYS = (STATUS_FILE_KEY, *CONDITION_KEYS.values())
POLICY_KEY_PREFIX = "device-"
# difflib similarity above which a key counts as a misspelt policy key.
TYPO_SIMILARITY = 0.8

# Decline reasons, short and stable because the server counts rounds per reason.
NOT_IDLE = "device-not-idle"
NOT_CHARGING = "device-not-charging"
METERED_NETWORK = "metered-network"
STATUS_UNAVAILABLE = "device-status-unavailable"
UNKNOWN_POLICY_KEY = "unknown device policy key"


class DeviceStatusError(Exception):
    """The device status inputs are missing, unreadable or malformed."""


@dataclass(frozen=True)
class DeviceStatus:
    """Phone state as the embedding app reports it."""

    idle: bool
    charging: bool
    unmetered: bool


def unknown_policy_keys(node_config: Mapping[str, Any]) -> list[str]:
    """Return the node config keys that look like device policy keys but are not, sorted."""
    return sorted(
        key
        for key in node_config
        if key not in POLICY_KEYS
        and (
            key.startswith(POLICY_KEY_PREFIX)
            or difflib.get_close_matches(key, POLICY_KEYS, n=1, cutoff=TYPO_SIMILARITY)
        )
    )


def read_device_status(node_config: Mapping[str, Any]) -> DeviceStatus | None:
    """Return the device status the app set, or None if the node config sets no policy input.

    Raises DeviceStatusError if the inputs are set but incomplete or unreadable.
    """
    if STATUS_FILE_KEY in node_config:
        return _read_status_file(Path(str(node_config[STATUS_FILE_KEY])))

    present = {condition: key for condition, key in CONDITION_KEYS.items() if key in node_config}
    if not present:
        return None
    missing = [key for key in CONDITION_KEYS.values() if key not in node_config]
    if missing:
        raise DeviceStatusError(
            f"node config sets {sorted(present.values())} but not {missing}: set all three keys"
        )
    values = {condition: _boolean(node_config[key], key) for condition, key in CONDITION_KEYS.items()}
    return DeviceStatus(**values)


def decline_reason(status: DeviceStatus | None) -> str | None:
    """Return why the phone may not train now, or None if it may.

    When several conditions fail, the first of idle, charging and network is
    reported, so that each declined round counts under one reason.
    """
    if status is None:
        return None
    if not status.idle:
        return NOT_IDLE
    if not status.charging:
        return NOT_CHARGING
    if not status.unmetered:
        return METERED_NETWORK
    return None


def training_decline_reason(node_config: Mapping[str, Any]) -> str | None:
    """Return why this node should decline a train request now, or None to train.

    Unreadable inputs and unknown policy keys decline too: a phone whose
    state is unknown might be on battery or mobile data.
    """
    unknown = unknown_policy_keys(node_config)
    if unknown:
        logger.warning(
            "declining to train: node config key(s) %s are not device policy keys; the known ones are %s",
            unknown,
            list(POLICY_KEYS),
        )
        return f"{UNKNOWN_POLICY_KEY} '{unknown[0]}'"

    try:
        status = read_device_status(node_config)
    except DeviceStatusError as error:
        logger.warning("declining to train: %s", error)
        return STATUS_UNAVAILABLE
    return decline_reason(status)


def _read_status_file(path: Path) -> DeviceStatus:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeviceStatusError(f"device status file {path} not found; the app must create it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DeviceStatusError(f"cannot read device status file {path}: {error}") from None

    if not isinstance(document, dict):
        raise DeviceStatusError(
            f"device status file {path} must hold a JSON object such as "
            '{"idle": true, "charging": true, "unmetered": true}'
        )
    missing = [condition for condition in CONDITION_KEYS if condition not in document]
    if missing:
        raise DeviceStatusError(f"device status file {path} lacks {missing}")
    values = {condition: _boolean(document[condition], f"{path}:{condition}") for condition in CONDITION_KEYS}
    return DeviceStatus(**values)


def _boolean(value: Any, name: str) -> bool:
    # JSON and Flower's node config both carry real booleans, so a string
    # "true" is a typo in the app or the command line. Guessing could drain a battery.
    if not isinstance(value, bool):
        raise DeviceStatusError(f"invalid value {value!r} for {name}: expected true or false")
    return value
