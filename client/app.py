"""The Flower ClientApp that runs on each phone: train locally, send a compressed update."""

import dataclasses
import functools
import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pocketfl.compression import DecodeError, UpdateCodec, encode_with_error_feedback
from pocketfl.compression.masked_updates import compact_for_uplink, expand_from_uplink
from pocketfl.compression.pruning import Mask
from pocketfl.tasks.base import ClientData, Task, TaskFactory, TaskSettings, TrainSettings
from pocketfl.tasks.har.task import HarTask

from .decline import decline_reply
from .downlink import receive_model
from .identity import identity_reply
from .instructions import RoundInstructions
from .memory import memory_limit_bytes, training_peak_bytes
from .pruned_training import compressed_training, read_mask
from .policy import training_decline_reason
from .residual_store import load_residual, residual_path, save_residual
from .sent_report import SentReport, add_discarded_report, keep_sent_report

logger = logging.getLogger(__name__)

RESIDUAL_KEY = "residual"
# Measured training peaks in bytes, by setting (see `_training_peak_bytes`),
# bounded because a long simulation meets many data sizes.
_PEAKS_BY_SETTING: dict[tuple, int] = {}
_MAX_PEAK_SETTINGS = 1024

# Decline reason of a phone whose training round would exceed its memory
# limit; short and stable because the server counts rounds per reason.
INSUFFICIENT_MEMORY = "insufficient-memory"

# Error code of a reply whose downlink did not decode. Flower's own codes end
# at 8; the server treats any error reply the same way.
DOWNLINK_DECODE_ERROR = 100

# Error code of a reply to a round of another task than this phone's.
WRONG_TASK_ERROR = 101

# A phone trains on one core; in simulation, each Ray worker gets one CPU.
TORCH_THREADS = 1


def build_client_app(task_factory: TaskFactory) -> ClientApp:
    """Return a ClientApp that trains the task `task_factory` builds.

    The phone builds its task from the run's seed and cache folder, once per
    process, and rejects rounds of any other task. It replies to the
    server's query for its stable key from the node config alone.
    """
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train on local data and reply with the encoded update `local - global`."""
        return train_round(task_factory, msg, context)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the model rebuilt from the downlink on this phone's local evaluation split."""
        return evaluate_round(task_factory, msg, context)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        """Reply with this phone's stable key (see pocketfl.client.identity)."""
        return identity_reply(msg, context)

    return client_app


def train_round(task_factory: TaskFactory, msg: Message, context: Context) -> Message:
    """Train on local data and reply with the encoded update `local - global`.

    "global" is the model this client rebuilt from the downlink, the one it
    trained from. With error feedback on, the residual (what the encoding
    dropped) lives in `context.state`, which Flower keeps for this node across
    rounds, or in the node config's `state-dir` on a device. A downlink that
    does not decode gets an error reply; a phone that the device policy keeps
    from training declines.
    """
    decline = training_decline_reason(context.node_config)
    if decline is not None:
        return decline_reply(msg, decline)

    started = _start_round(task_factory, msg, context)
    if isinstance(started, Message):
        return started
    instructions, task, model, data = started

    global_state = {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}
    mask = read_mask(msg.content, {name: values.shape for name, values in global_state.items()})
    seed = _round_seed(instructions, context)

    def run_training(trained: torch.nn.Module, local_data: ClientData, settings: TrainSettings):
        with compressed_training(trained, mask, instructions.qat):
            return task.train(trained, local_data, settings)

    settings = instructions.train_settings(seed)
    peak_bytes = _training_peak_bytes(model, data, settings, instructions.qat, mask, run_training)
    limit = memory_limit_bytes(context.node_config, instructions.memory_limit_mb)
    if limit is not None and peak_bytes > limit:
        # The reason is a label the server counts, so it names the limit only.
        logger.info("training needs %.1f MB, above the limit of %.1f MB", peak_bytes / 1e6, limit / 1e6)
        return decline_reply(msg, INSUFFICIENT_MEMORY)

    result = run_training(model, data, settings)

    delta = {
        name: tensor.numpy() - global_state[name] for name, tensor in model.state_dict().items()
    }
    payload = _encode(delta, instructions, context, seed, mask)

    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "train-seconds": result.seconds,
            "payload-bytes": len(payload),
            "peak-memory-bytes": peak_bytes,
        }
    )
    content = RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def evaluate_round(task_factory: TaskFactory, msg: Message, context: Context) -> Message:
    """Evaluate the model rebuilt from the downlink on this phone's local evaluation split."""
    started = _start_round(task_factory, msg, context)
    if isinstance(started, Message):
        return started
    instructions, task, model, data = started

    loss, accuracy = task.evaluate(model, data.x_eval, data.y_eval)

    metrics = MetricRecord({"num-examples": len(data.y_eval), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _start_round(
    task_factory: TaskFactory, msg: Message, context: Context
) -> tuple[RoundInstructions, Task, torch.nn.Module, ClientData] | Message:
    """Read the round's instructions, build the task, rebuild the model and load this phone's data.

    Returns the error reply instead when the round is of another task or the
    downlink does not decode.
    """
    torch.set_num_threads(TORCH_THREADS)
    instructions = RoundInstructions.from_config_record(msg.content["config"])
    task = _task(task_factory, instructions.task_settings())
    if task.name != instructions.task:
        return _wrong_task(msg, task, instructions)

    model = task.build_model()
    try:
        _load_downlink(model, msg, context)
    except DecodeError as error:
        return _downlink_error(msg, error)

    return instructions, task, model, _client_data(task, context)


@functools.lru_cache(maxsize=4)
def _task(task_factory: TaskFactory, settings: TaskSettings) -> Task:
    # A task may load its data when built; one instance per process serves every round.
    return task_factory(settings)


def _wrong_task(msg: Message, task: Task, instructions: RoundInstructions) -> Message:
    reason = (
        f"this phone runs task '{task.name}' but the server sent a round of task "
        f"'{instructions.task}'; start the SuperNode with the ClientApp of that task"
    )
    logger.warning("%s", reason)
    return Message(Error(code=WRONG_TASK_ERROR, reason=reason), reply_to=msg)


def _load_downlink(model: torch.nn.Module, msg: Message, context: Context) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    received = receive_model(msg.content, context, shapes)
    model.load_state_dict({name: torch.from_numpy(values.copy()) for name, values in received.items()})


def _downlink_error(msg: Message, error: DecodeError) -> Message:
    logger.warning("downlink did not decode: %s", error)
    return Message(Error(code=DOWNLINK_DECODE_ERROR, reason=f"downlink did not decode: {error}"), reply_to=msg)


def _client_data(task: Task, context: Context) -> ClientData:
    return task.client_data(context.node_config)


def _round_seed(instructions: RoundInstructions, context: Context) -> int:
    # One stream per (run seed, round, phone): reruns with one seed give the
    # same bytes. Simulated node ids change between runs, partition ids do not.
    phone = int(context.node_config.get("partition-id", context.node_id))
    sequence = np.random.SeedSequence([instructions.seed, instructions.server_round, phone])
    return int(sequence.generate_state(1)[0])


def _training_peak_bytes(
    model: torch.nn.Module,
    data: ClientData,
    settings: TrainSettings,
    qat: bool,
    mask: Mask,
    run_training,
) -> int:
    # The peak depends on the model's layout, the pruned tensors, the batch size,
    # the data's shape and QAT, not on the weights or the phone. So one
    # measurement serves every phone of a process: the profiler costs about
    # four training rounds of a phone with 8 windows.
    setting = (
        tuple((name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()),
        tuple(sorted(mask)),
        settings.batch_size,
        data.x_train.shape,
        qat,
    )
    if setting in _PEAKS_BY_SETTING:
        return _PEAKS_BY_SETTING[setting]

    one_epoch = dataclasses.replace(settings, epochs=1)
    peak = training_peak_bytes(
        model,
        data.x_train,
        data.y_train,
        settings.batch_size,
        lambda probe, x, y: run_training(probe, ClientData(x, y, x[:0], y[:0]), one_epoch),
    )
    if len(_PEAKS_BY_SETTING) >= _MAX_PEAK_SETTINGS:
        _PEAKS_BY_SETTING.clear()
    _PEAKS_BY_SETTING[setting] = peak
    return peak


def _encode(
    delta: dict[str, np.ndarray],
    instructions: RoundInstructions,
    context: Context,
    seed: int,
    mask: Mask,
) -> bytes:
    """Encode `delta`, with only the kept entries of masked tensors, and keep the residual."""
    codec = UpdateCodec(instructions.compression)
    shapes = {name: values.shape for name, values in delta.items()}
    delta = compact_for_uplink(delta, mask, codec.spec)
    if not instructions.error_feedback:
        return codec.encode(delta, seed)

    stored_at = residual_path(context.node_config)
    residual = None
    if stored_at is not None:
        residual = load_residual(stored_at, shapes)
    elif RESIDUAL_KEY in context.state.array_records:
        residual = {
            name: array.numpy() for name, array in context.state.array_records[RESIDUAL_KEY].items()
        }
    if instructions.discarded_round:
        residual = add_discarded_report(residual, instructions.discarded_round, context, shapes)
    if residual is not None:
        residual = compact_for_uplink(residual, mask, codec.spec)
    payload, residual = encode_with_error_feedback(codec, delta, residual, seed)
    # The residual is kept at full shape, so it survives a mask that changes
    # between rounds; what a pruned entry had left is dropped with it.
    residual = expand_from_uplink(residual, mask, codec.spec, shapes)

    # Kept before the residual is saved, so that a crash in between can lose
    # this payload but never add one back into a residual twice.
    keep_sent_report(context, SentReport(instructions.server_round, payload, mask))

    # Error feedback costs one extra float32 copy of the model per client.
    if stored_at is not None:
        save_residual(stored_at, residual)
    else:
        context.state[RESIDUAL_KEY] = ArrayRecord({name: Array(values) for name, values in residual.items()})
    return payload


# The HAR ClientApp that `flwr run` and `pocketfl simulate` start by default.
app = build_client_app(HarTask)
