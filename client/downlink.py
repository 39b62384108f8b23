"""Phone side of the downlink: rebuild the global model from what the server sent.

A message carries either the float32 model (ArrayRecord "arrays", downlink
"none") or a ConfigRecord "downlink" with a payload, its base version and the
new version. A full payload is the model itself. A delta is added to the
model this phone rebuilt last time, kept in `Context.state` with its version.
The addition is float32, exactly as on the server, so both sides hold the same
model bit for bit.
"""

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from pocketfl.compression import DecodeError, decode_update

# Keys of the message, as the server's strategy writes them.
ARRAYS_KEY = "arrays"
DOWNLINK_KEY = "downlink"
PAYLOAD_KEY = "payload"
BASE_VERSION_KEY = "base-version"
VERSION_KEY = "version"
FULL_KEY = "full"

# Base version of a full model; the server numbers versions from 1.
NO_VERSION = 0

# Keys in Context.state: the rebuilt model (one float32 copy) and its version.
MODEL_STATE_KEY = "downlink-model"
VERSION_STATE_KEY = "downlink-version"


def receive_model(
    content: RecordDict, context: Context, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Return the model the server sent, rebuilt under `shapes`, and keep it in `context.state`.

    Raises
    ------
    DecodeError
        If the message carries neither form, the payload does not decode under
        `shapes`, or a delta's base is not the version this phone holds.
    """
    if ARRAYS_KEY in content.array_records:
        return _float32_model(content.array_records[ARRAYS_KEY], shapes)
    if DOWNLINK_KEY not in content.config_records:
        raise DecodeError(f"message has neither ArrayRecord '{ARRAYS_KEY}' nor ConfigRecord '{DOWNLINK_KEY}'")

    payload, base_version, version, full = _read_downlink(content.config_records[DOWNLINK_KEY])
    decoded = decode_update(payload, shapes)
    if full:
        model = decoded
    else:
        base = _held_model(context, base_version, shapes)
        # The same float32 addition as the server's `apply_delta`.
        model = {
            name: np.asarray(base[name] + decoded[name], dtype=np.float32).reshape(shapes[name])
            for name in shapes
        }

    context.state[MODEL_STATE_KEY] = ArrayRecord({name: Array(values) for name, values in model.items()})
    context.state[VERSION_STATE_KEY] = ConfigRecord({VERSION_KEY: version})
    return model


def _read_downlink(record: ConfigRecord) -> tuple[bytes, int, int, bool]:
    payload = record.get(PAYLOAD_KEY)
    if not isinstance(payload, bytes):
        raise DecodeError(f"'{DOWNLINK_KEY}.{PAYLOAD_KEY}' must be bytes, got {type(payload).__name__}")

    versions = []
    for key in (BASE_VERSION_KEY, VERSION_KEY):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DecodeError(f"'{DOWNLINK_KEY}.{key}'={value!r} must be a non-negative integer")
        versions.append(value)

    full = record.get(FULL_KEY)
    if not isinstance(full, bool):
        raise DecodeError(f"'{DOWNLINK_KEY}.{FULL_KEY}'={full!r} must be a bool")

    # A full model has no base and a delta has one, and versions only grow.
    base_version, version = versions
    if full != (base_version == NO_VERSION):
        raise DecodeError(
            f"'{DOWNLINK_KEY}.{FULL_KEY}'={full} contradicts base version {base_version}: "
            f"a full model has base version {NO_VERSION}, a delta a later one"
        )
    if version <= base_version:
        raise DecodeError(f"new version {version} must be greater than base version {base_version}")
    return payload, base_version, version, full


def _held_model(
    context: Context, base_version: int, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    held_version = None
    if VERSION_STATE_KEY in context.state.config_records:
        held_version = context.state.config_records[VERSION_STATE_KEY].get(VERSION_KEY)
    if held_version != base_version or MODEL_STATE_KEY not in context.state.array_records:
        # After a failed reply the server drops this phone's version, so the
        # next message is a full model and this error does not repeat.
        raise DecodeError(
            f"invalid base version {base_version}: this client has version {held_version}; "
            "the server sends a full model after this failed reply"
        )
    return _float32_model(context.state.array_records[MODEL_STATE_KEY], shapes)


def _float32_model(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    if set(record.keys()) != set(shapes):
        raise DecodeError(f"model tensors {sorted(record.keys())} do not match the model's {sorted(shapes)}")

    model = {}
    for name, shape in shapes.items():
        values = record[name].numpy()
        if values.dtype != np.float32 or values.shape != tuple(shape):
            raise DecodeError(
                f"tensor {name!r} is {values.dtype} {values.shape}, expected float32 {tuple(shape)}"
            )
        model[name] = values
    return model
