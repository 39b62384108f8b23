"""The downlink encoder and the client's rebuild, without Flower's engine."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from pocketfl.client.downlink import receive_model
from pocketfl.compression import DecodeError
from pocketfl.strategies.downlink import NO_VERSION, DownlinkEncoder

SHAPES = {"conv.weight": (8, 3, 5), "conv.bias": (8,), "fc.weight": (4, 8)}


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _drift(model: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: values + 0.01 * rng.normal(size=values.shape).astype(np.float32) for name, values in model.items()}


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _message(encoded) -> RecordDict:
    return RecordDict(
        {
            "downlink": ConfigRecord(
                {
                    "payload": encoded.payload,
                    "base-version": encoded.base_version,
                    "version": encoded.version,
                    "full": encoded.full,
                }
            )
        }
    )


def _assert_bitwise_equal(left, right):
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype == np.float32
        assert left[name].tobytes() == right[name].tobytes(), name


def test_client_rebuild_matches_server_bitwise():
    encoder = DownlinkEncoder("q:8", seed=0)
    context = _context()
    global_model = _model(0)
    client_version = NO_VERSION

    for step in range(5):
        encoded = encoder.encode(global_model, {client_version})[client_version]
        assert encoded.full == (step == 0)
        assert encoded.base_version == client_version

        rebuilt = receive_model(_message(encoded), context, SHAPES)
        _assert_bitwise_equal(rebuilt, encoder.reconstruction(encoded.version))
        client_version = encoded.version
        global_model = _drift(global_model, step + 1)


def test_deltas_carry_what_earlier_broadcasts_left_out():
    # Encoding against the reconstruction is error feedback: the gap to the
    # global model stays at one quantization step, it does not grow.
    encoder = DownlinkEncoder("q:4", seed=0)
    global_model = _model(0)
    client_version = NO_VERSION
    gaps = []
    for step in range(20):
        client_version = encoder.encode(global_model, {client_version})[client_version].version
        rebuilt = encoder.reconstruction(client_version)
        gaps.append(max(np.abs(global_model[name] - rebuilt[name]).max() for name in SHAPES))
        global_model = _drift(global_model, step + 1)
    assert max(gaps[5:]) < gaps[0]


def test_unknown_or_dropped_version_gets_a_full_encoding():
    encoder = DownlinkEncoder("q:8", seed=0, max_versions=2)
    global_model = _model(0)
    first = encoder.encode(global_model, {NO_VERSION})[NO_VERSION].version
    second = encoder.encode(global_model, {first})[first].version
    third = encoder.encode(global_model, {second})[second].version

    assert encoder.versions == (second, third)
    encoded = encoder.encode(global_model, {first, 12345, third})
    assert encoded[first].full and encoded[12345].full
    assert encoded[first] is encoded[12345]
    assert not encoded[third].full
    assert encoded[third].base_version == third


def test_kept_versions_stay_bounded():
    encoder = DownlinkEncoder("q:8", seed=0, max_versions=3)
    global_model = _model(0)
    client_versions = {NO_VERSION}
    for step in range(10):
        encoded = encoder.encode(global_model, client_versions)
        client_versions = {model.version for model in encoded.values()} | {NO_VERSION}
        assert len(encoder.versions) <= 3
        global_model = _drift(global_model, step)


def test_many_bases_encode_against_own_base():
    # Keeping the new versions drops old ones mid-broadcast; each delta must
    # still be against the base its message names.
    encoder = DownlinkEncoder("q:8", seed=0, max_versions=3)
    global_model = _model(0)
    contexts = {}
    for _ in range(3):
        encoded = encoder.encode(global_model, {NO_VERSION})[NO_VERSION]
        context = _context()
        receive_model(_message(encoded), context, SHAPES)
        contexts[encoded.version] = context
        global_model = _drift(global_model, encoded.version)

    encoded = encoder.encode(global_model, set(contexts))
    for base, context in contexts.items():
        assert encoded[base].base_version == base
        rebuilt = receive_model(_message(encoded[base]), context, SHAPES)
        for name in SHAPES:
            assert np.abs(rebuilt[name] - global_model[name]).max() < 0.05


def test_same_seed_gives_same_bytes():
    first = DownlinkEncoder("q:8", seed=7).encode(_model(0), {NO_VERSION})[NO_VERSION]
    second = DownlinkEncoder("q:8", seed=7).encode(_model(0), {NO_VERSION})[NO_VERSION]
    assert first.payload == second.payload


def test_delta_against_another_version_is_rejected():
    encoder = DownlinkEncoder("q:8", seed=0)
    context = _context()
    full = encoder.encode(_model(0), {NO_VERSION})[NO_VERSION]
    receive_model(_message(full), context, SHAPES)
    delta = encoder.encode(_model(1), {full.version})[full.version]
    stale = _context()

    with pytest.raises(DecodeError, match="invalid base version"):
        receive_model(_message(delta), stale, SHAPES)


@pytest.mark.parametrize(
    "damage", ["truncate", "missing", "bad-version", "full-with-base", "delta-without-base", "version-not-after-base"]
)
def test_malformed_downlink_raises_decode_error(damage):
    encoded = DownlinkEncoder("q:8", seed=0).encode(_model(0), {NO_VERSION})[NO_VERSION]
    message = _message(encoded)
    record = message.config_records["downlink"]
    if damage == "truncate":
        record["payload"] = encoded.payload[:-5]
    if damage == "missing":
        message = RecordDict({"config": ConfigRecord({})})
    if damage == "bad-version":
        record["version"] = -3
    if damage == "full-with-base":
        record["base-version"] = 5
        record["version"] = 6
    if damage == "delta-without-base":
        record["full"] = False
    if damage == "version-not-after-base":
        record["full"] = False
        record["base-version"] = 4
        record["version"] = 4

    context = _context()
    with pytest.raises(DecodeError):
        receive_model(message, context, SHAPES)
    assert "downlink-model" not in context.state.array_records


def test_float32_arrays_pass_through_unchanged():
    model = _model(3)
    content = RecordDict({"arrays": ArrayRecord({name: Array(values) for name, values in model.items()})})
    _assert_bitwise_equal(receive_model(content, _context(), SHAPES), model)


def test_client_and_server_use_same_message_keys():
    # The client may not import the strategies, so each side defines the keys.
    from pocketfl.client import downlink as client_side
    from pocketfl.strategies import downlink as server_side

    for key in ("DOWNLINK_KEY", "PAYLOAD_KEY", "BASE_VERSION_KEY", "VERSION_KEY", "FULL_KEY", "NO_VERSION"):
        assert getattr(client_side, key) == getattr(server_side, key), key
