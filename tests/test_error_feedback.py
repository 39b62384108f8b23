"""Error feedback: residuals carry what compression lost into later rounds, late reports included."""

import logging

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from pocketfl.client import app as client_app
from pocketfl.client.instructions import RoundInstructions
from pocketfl.client.residual_store import load_residual, residual_path
from pocketfl.client.sent_report import SENT_REPORT_FILE, SENT_REPORT_KEY, add_discarded_report
from pocketfl.compression import UpdateCodec, decode_update, encode_with_error_feedback
from pocketfl.compression.pruning import compact, compact_shapes, expand


def shapes_of(update):
    return {name: np.shape(array) for name, array in update.items()}


@pytest.mark.parametrize(
    "spec",
    [
        "topk:0.05,q:4",
        "topk:0.01",
        "q:2:16",
        "topk:0.3,q:2",
        "topk:0.05:tensor,q:4",
        "topk:0.01:tensor",
        "topk:0.3:tensor,q:2",
        "sign",
        "topk:0.1,ternary",
        "topk:0.1:tensor,ternary,zstd",
        "thresh:1.5,ternary",
        "thresh:1.0,q:4",
        "q:3:nearest",
        "qsgd:4:16",
        "fp16",
        "bf16,zstd",
    ],
)
def test_sum_telescopes(spec):
    rng = np.random.default_rng(0)
    codec = UpdateCodec(spec)
    shapes = {"w": (30, 20), "b": (20,), "s": ()}
    residual = None
    sent = {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}
    total = {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}

    for round_index in range(25):
        update = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        payload, residual = encode_with_error_feedback(codec, update, residual, seed=round_index)
        decoded = decode_update(payload, shapes)
        for name in shapes:
            sent[name] += decoded[name]
            total[name] += update[name]

    for name in shapes:
        assert residual[name].dtype == np.float32
        assert residual[name].shape == shapes[name]
        np.testing.assert_allclose(sent[name] + residual[name], total[name], atol=1e-4)


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.02,q:4", "topk:0.02,q:3:32"])
def test_model_scope_telescopes_across_scales(spec):
    # Tensor scales differ by up to 10^4, so model-scope top-k sends nothing of
    # the small tensors in some rounds, until their residual has grown.
    rng = np.random.default_rng(11)
    codec = UpdateCodec(spec)
    scales = {"fc.weight": 10.0, "conv.weight": 1.0, "conv.bias": 1e-2, "fc.bias": 1e-3}
    shapes = {"fc.weight": (40, 25), "conv.weight": (6, 3, 5), "conv.bias": (6,), "fc.bias": (25,)}
    residual = None
    sent = {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}
    total = {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}
    rounds_with_empty_tensor = 0

    for round_index in range(30):
        update = {
            name: (rng.standard_normal(shape) * scales[name]).astype(np.float32)
            for name, shape in shapes.items()
        }
        payload, residual = encode_with_error_feedback(codec, update, residual, seed=round_index)
        decoded = decode_update(payload, shapes)
        rounds_with_empty_tensor += any(not decoded[name].any() for name in shapes)
        for name in shapes:
            sent[name] += decoded[name]
            total[name] += update[name]

    assert rounds_with_empty_tensor > 0
    for name in shapes:
        assert residual[name].dtype == np.float32
        # The residual is float32 and the sums reach about 200 in magnitude.
        np.testing.assert_allclose(sent[name] + residual[name], total[name], atol=1e-3, err_msg=name)


def test_model_scope_residual_is_loss_for_empty_tensor():
    update = {"large": np.array([4.0, -5.0, 6.0], np.float32), "small": np.full(7, 0.1, np.float32)}

    payload, residual = encode_with_error_feedback(UpdateCodec("topk:0.2"), update, None, seed=0)

    decoded = decode_update(payload, shapes_of(update))
    assert np.flatnonzero(decoded["large"]).tolist() == [1, 2]
    assert not decoded["small"].any()
    np.testing.assert_array_equal(residual["small"], update["small"])
    np.testing.assert_array_equal(residual["large"], [4.0, 0.0, 0.0])


def test_first_round_residual_is_loss():
    update = {"w": np.linspace(-1, 1, 50, dtype=np.float32)}
    codec = UpdateCodec("topk:0.1")

    payload, residual = encode_with_error_feedback(codec, update, None, seed=0)

    decoded = decode_update(payload, shapes_of(update))
    np.testing.assert_array_equal(residual["w"], update["w"] - decoded["w"])
    assert np.count_nonzero(residual["w"]) == 50 - 5


def test_residual_added_before_encoding():
    update = {"w": np.zeros(10, np.float32)}
    residual = {"w": np.arange(10, dtype=np.float32)}

    payload, new_residual = encode_with_error_feedback(UpdateCodec("topk:0.1"), update, residual, seed=0)

    decoded = decode_update(payload, shapes_of(update))
    np.testing.assert_array_equal(np.flatnonzero(decoded["w"]), [9])
    assert decoded["w"][9] == 9.0
    assert new_residual["w"][9] == 0.0
    np.testing.assert_array_equal(new_residual["w"][:9], np.arange(9))


def test_topk_sends_every_coordinate_eventually():
    # A constant update with magnitudes spread over two orders of magnitude:
    # without error feedback top-k would send the same 10% every round.
    update = {"w": np.geomspace(0.01, 1.0, 100).astype(np.float32)}
    codec = UpdateCodec("topk:0.1,q:8")
    shapes = shapes_of(update)

    residual = None
    sent_with_feedback = np.zeros(100, bool)
    sent_without_feedback = np.zeros(100, bool)
    for round_index in range(200):
        payload, residual = encode_with_error_feedback(codec, update, residual, seed=round_index)
        sent_with_feedback |= decode_update(payload, shapes)["w"] != 0

        plain = codec.encode(update, round_index)
        sent_without_feedback |= decode_update(plain, shapes)["w"] != 0

    assert sent_with_feedback.all(), f"never sent: {np.flatnonzero(~sent_with_feedback)}"
    assert sent_without_feedback.sum() == 10


def test_none_leaves_zero_residual():
    update = {"w": np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)}

    _, residual = encode_with_error_feedback(UpdateCodec("none"), update, None, seed=0)

    assert not residual["w"].any()


def test_residual_mismatch_rejected():
    codec = UpdateCodec("topk:0.5")
    update = {"w": np.ones(4, np.float32)}

    with pytest.raises(ValueError, match="lacks tensor 'w'"):
        encode_with_error_feedback(codec, update, {"v": np.ones(4, np.float32)}, seed=0)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        encode_with_error_feedback(codec, update, {"w": np.ones(5, np.float32)}, seed=0)
    with pytest.raises(ValueError, match="'extra'"):
        encode_with_error_feedback(
            codec, update, {"w": np.ones(4, np.float32), "extra": np.ones(1, np.float32)}, seed=0
        )


def test_error_feedback_deterministic():
    update = {"w": np.random.default_rng(4).standard_normal(64).astype(np.float32)}
    codec = UpdateCodec("topk:0.2,q:3")

    first = encode_with_error_feedback(codec, update, None, seed=9)
    second = encode_with_error_feedback(codec, update, None, seed=9)

    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1]["w"], second[1]["w"])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_non_float_update_rejected_like_encode(dtype):
    codec = UpdateCodec("topk:0.5,q:4")
    update = {"w": np.ones((2, 3), dtype=dtype)}

    with pytest.raises(ValueError, match="tensor 'w': dtype .* is not a floating-point type"):
        codec.encode(update, seed=0)
    with pytest.raises(ValueError, match="tensor 'w': dtype .* is not a floating-point type"):
        encode_with_error_feedback(codec, update, None, seed=0)


def test_non_float_residual_rejected():
    codec = UpdateCodec("q:4")
    update = {"w": np.ones(3, np.float32)}

    with pytest.raises(ValueError, match="residual for tensor 'w': dtype int64"):
        encode_with_error_feedback(codec, update, {"w": np.zeros(3, np.int64)}, seed=0)


@pytest.mark.parametrize("update", [[("w", np.ones(3, np.float32))], np.ones(3, np.float32), None])
def test_non_mapping_update_rejected(update):
    with pytest.raises(ValueError, match="update must be a mapping"):
        encode_with_error_feedback(UpdateCodec("q:4"), update, None, seed=0)


def test_non_mapping_residual_rejected():
    update = {"w": np.ones(3, np.float32)}

    with pytest.raises(ValueError, match="residual must be None or a mapping"):
        encode_with_error_feedback(UpdateCodec("q:4"), update, [np.zeros(3, np.float32)], seed=0)


@pytest.mark.parametrize("spec", ["topk:0.5,q:4", "q:2", "none"])
def test_residual_keeps_shapes_and_float32(spec):
    update = {
        "s": np.array(0.7, np.float64),
        "v": np.linspace(-1, 1, 5),
        "m": np.ones((2, 3), np.float32),
    }

    _, residual = encode_with_error_feedback(UpdateCodec(spec), update, None, seed=1)
    _, residual = encode_with_error_feedback(UpdateCodec(spec), update, residual, seed=2)

    for name, array in update.items():
        assert isinstance(residual[name], np.ndarray), name
        assert residual[name].dtype == np.float32, name
        assert residual[name].shape == np.shape(array), name


def _gaussian_residual_norms(spec, shape, rounds, seed):
    """Return the residual's norm after each round of fresh standard Gaussian updates."""
    rng = np.random.default_rng(seed)
    codec = UpdateCodec(spec)
    residual = None
    norms = []

    for round_index in range(rounds):
        update = {"w": rng.standard_normal(shape).astype(np.float32)}
        _, residual = encode_with_error_feedback(codec, update, residual, seed=round_index)
        norms.append(float(np.linalg.norm(residual["w"])))
    return norms


@pytest.mark.parametrize("spec", ["sign", "topk:0.05,ternary", "thresh:2.0,ternary"])
def test_sign_and_ternary_residual_stays_bounded(spec):
    # Scaled sign and sparse ternary are biased; with error feedback the
    # residual must settle instead of growing with the number of rounds
    # (Karimireddy et al. 2019; Sattler et al. 2019).
    norms = _gaussian_residual_norms(spec, (400,), rounds=60, seed=3)

    update_norm = np.sqrt(400)
    assert max(norms[30:]) < 20 * update_norm
    assert np.mean(norms[45:]) < 2 * np.mean(norms[15:30])


def test_sign_residual_is_exact_loss():
    update = {"v": np.array([1.0, -2.0, 3.0, 0.0], np.float32)}

    payload, residual = encode_with_error_feedback(UpdateCodec("sign"), update, None, seed=0)

    np.testing.assert_array_equal(residual["v"], [-0.5, -0.5, 1.5, -1.5])
    second, _ = encode_with_error_feedback(UpdateCodec("sign"), update, residual, seed=1)
    # The second round codes update + residual = [0.5, -2.5, 4.5, -1.5], mean magnitude 2.25.
    np.testing.assert_array_equal(decode_update(second, {"v": (4,)})["v"], [2.25, -2.25, 2.25, -2.25])


def test_ternary_sends_every_coordinate_eventually():
    rng = np.random.default_rng(5)
    codec = UpdateCodec("topk:0.02,ternary")
    residual = None
    sent = np.zeros(500, bool)

    # 10 entries a round: plain top-k needs about 400 rounds here too.
    for round_index in range(400):
        update = {"w": (rng.standard_normal(500) * 0.1).astype(np.float32)}
        payload, residual = encode_with_error_feedback(codec, update, residual, seed=round_index)
        sent |= decode_update(payload, {"w": (500,)})["w"] != 0

    assert sent.all()


@pytest.mark.parametrize(
    "spec",
    ["lowrank:1", "lowrank:2,q:8", "lowrank:4,fp16,zstd", "topk:0.05,q:4;bias=none;bn.*=q:8", "lowrank:2;vector=none"],
)
def test_lowrank_and_rules_telescope(spec):
    rng = np.random.default_rng(3)
    shapes = {"conv.weight": (32, 6, 5), "conv.bias": (32,), "bn.weight": (32,), "fc.weight": (6, 64)}
    codec = UpdateCodec(spec)
    residual = None
    sent = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
    total = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}

    for round_number in range(8):
        update = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        payload, residual = encode_with_error_feedback(codec, update, residual, seed=round_number)
        decoded = decode_update(payload, shapes)
        for name in shapes:
            sent[name] += decoded[name]
            total[name] += update[name]

    for name in shapes:
        np.testing.assert_allclose(sent[name] + residual[name], total[name], atol=1e-4)


def test_lowrank_residual_stays_bounded_and_shrinks_error():
    # PowerSGD relies on error feedback: a fixed low-rank signal plus noise is
    # recovered in the running sum, and the residual does not grow.
    rng = np.random.default_rng(4)
    signal = (rng.standard_normal((64, 1)) @ rng.standard_normal((1, 160))).astype(np.float32)
    codec = UpdateCodec("lowrank:2")
    residual = None
    norms = []
    for round_number in range(30):
        update = {"w": signal + 0.3 * rng.standard_normal(signal.shape).astype(np.float32)}
        _, residual = encode_with_error_feedback(codec, update, residual, seed=round_number)
        norms.append(float(np.linalg.norm(residual["w"])))

    assert max(norms[10:]) < 3 * max(norms[:10])
    assert norms[-1] < np.linalg.norm(30 * signal) * 0.1


@pytest.mark.parametrize("spec", ["lowrank:2,q:4", "lowrank:2,q:3", "lowrank:4,q:3"])
def test_quantized_lowrank_residual_stays_bounded(spec):
    # Full-rank Gaussian updates: rank-2 factors keep little of each, so the
    # residual grows at first, then levels off (about 4 times the update's
    # norm for lowrank:2,q:4). 2-bit factors do not level off.
    norms = _gaussian_residual_norms(spec, (64, 320), rounds=40, seed=0)

    update_norm = np.sqrt(64 * 320)
    assert max(norms[20:]) < 1.5 * max(norms[:20])
    assert norms[-1] < 10 * update_norm


# Client side: reports that the server discards as late.


def _phone(node_config=None) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config or {}, state=RecordDict(), run_config={})


def _instructions(server_round: int, discarded_round: int = 0, spec: str = "topk:0.05,q:4") -> RoundInstructions:
    return RoundInstructions(
        server_round=server_round,
        compression=spec,
        error_feedback=True,
        local_epochs=1,
        learning_rate=0.1,
        batch_size=32,
        held_out_people=1,
        seed=0,
        discarded_round=discarded_round,
    )


def _run_phone(context, rounds, late_rounds, mask, send_notice=True):
    """Encode `rounds` random updates as the ClientApp does; return (applied sum, update sum, residual).

    The server applies every payload except those of `late_rounds`, and names
    the last discarded round in the phone's next round when `send_notice`.
    """
    rng = np.random.default_rng(5)
    shapes = {"conv.weight": (6, 4), "conv.bias": (6,)}
    applied = {name: np.zeros(shape) for name, shape in shapes.items()}
    total = {name: np.zeros(shape) for name, shape in shapes.items()}
    discarded = 0

    for server_round in range(1, rounds + 1):
        update = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        # Training under a mask leaves masked entries of the update at zero.
        update = expand(compact(update, mask), mask, shapes)
        instructions = _instructions(server_round, discarded if send_notice else 0)

        payload = client_app._encode(update, instructions, context, seed=server_round, mask=mask)

        for name in shapes:
            total[name] += update[name]
        if server_round in late_rounds:
            discarded = server_round
            continue
        discarded = 0
        decoded = expand(decode_update(payload, compact_shapes(shapes, mask)), mask, shapes)
        for name in shapes:
            applied[name] += decoded[name]

    if "state-dir" in context.node_config:
        residual = load_residual(residual_path(context.node_config), shapes)
    else:
        residual = {name: array.numpy() for name, array in context.state.array_records["residual"].items()}
    return applied, total, residual


def test_discarded_reports_rejoin_the_residual():
    # Two late rounds in a row, then one more later on.
    applied, total, residual = _run_phone(_phone(), rounds=12, late_rounds={3, 4, 8}, mask={})

    for name in total:
        np.testing.assert_allclose(applied[name] + residual[name], total[name], atol=1e-4, err_msg=name)


def test_discarded_reports_are_lost_without_the_notice():
    applied, total, residual = _run_phone(_phone(), rounds=12, late_rounds={3, 4, 8}, mask={}, send_notice=False)

    lost = np.abs(applied["conv.weight"] + residual["conv.weight"] - total["conv.weight"]).max()
    assert lost > 0.1


def test_discarded_report_in_state_dir_under_a_mask(tmp_path):
    mask = {"conv.weight": np.arange(24).reshape(6, 4) % 3 != 0}
    context = _phone({"state-dir": str(tmp_path / "state")})

    applied, total, residual = _run_phone(context, rounds=10, late_rounds={2, 6}, mask=mask)

    assert (tmp_path / "state" / SENT_REPORT_FILE).exists()
    assert SENT_REPORT_KEY not in context.state.config_records
    for name in total:
        np.testing.assert_allclose(applied[name] + residual[name], total[name], atol=1e-4, err_msg=name)


def _encode_ramp(context, instructions):
    update = {"w": np.linspace(-1.0, 1.0, 40, dtype=np.float32)}
    client_app._encode(update, instructions, context, seed=instructions.server_round, mask={})


def _residual_after(context, instructions):
    _encode_ramp(context, instructions)
    return context.state.array_records["residual"]["w"].numpy()


def test_notice_of_another_round_adds_nothing(caplog):
    context = _phone()
    _residual_after(context, _instructions(1))
    control = _phone()
    _residual_after(control, _instructions(1))

    with caplog.at_level(logging.DEBUG, logger="pocketfl.client.sent_report"):
        with_notice = _residual_after(context, _instructions(2, discarded_round=7))
    without_notice = _residual_after(control, _instructions(2))

    np.testing.assert_array_equal(with_notice, without_notice)
    assert "kept report is of round 1" in caplog.text


def test_notice_without_kept_report_is_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="pocketfl.client.sent_report"):
        residual = _residual_after(_phone(), _instructions(3, discarded_round=2))

    assert residual.shape == (40,)
    assert "no longer keeps" in caplog.text


def test_damaged_kept_report_is_ignored(caplog):
    context = _phone()
    _residual_after(context, _instructions(1))
    sent_report = context.state.config_records[SENT_REPORT_KEY]
    sent_report["payload"] = sent_report["payload"][:10]

    with caplog.at_level(logging.WARNING, logger="pocketfl.client.sent_report"):
        _residual_after(context, _instructions(2, discarded_round=1))

    assert "ignoring the kept report of round 1" in caplog.text
    assert context.state.config_records[SENT_REPORT_KEY]["round"] == 2


def test_kept_report_of_another_model_is_ignored(tmp_path, caplog):
    context = _phone({"state-dir": str(tmp_path)})
    _encode_ramp(context, _instructions(1))
    shapes = {"w": (41,)}

    with caplog.at_level(logging.WARNING, logger="pocketfl.client.sent_report"):
        residual = add_discarded_report(None, 1, context, shapes)

    assert residual is None
    assert "ignoring the kept report of round 1" in caplog.text


def test_unreadable_kept_report_file_is_ignored(tmp_path, caplog):
    context = _phone({"state-dir": str(tmp_path)})
    (tmp_path / SENT_REPORT_FILE).write_bytes(b"not a zip file")

    with caplog.at_level(logging.WARNING, logger="pocketfl.client.sent_report"):
        residual = add_discarded_report(None, 1, context, {"w": (40,)})

    assert residual is None
    assert "unreadable kept report" in caplog.text


def test_round_config_has_no_discarded_round():
    # The key is per message, and only error-feedback runs with a clock send it.
    record = _instructions(5, discarded_round=4).to_config_record()

    assert "discarded-round" not in record
