"""The Flower ClientApp that runs on each phone: train locally, send a compressed update."""

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pocketfl.compression import DecodeError, UpdateCodec, encode_with_error_feedback
from pocketfl.compression.pruning import Mask, compact, expand
from pocketfl.tasks.har.federation import ClientArrays, load_federation
from pocketfl.tasks.har.model import build_model
from pocketfl.tasks.har.training import evaluate as evaluate_model
from pocketfl.tasks.har.training import train as train_model

from .downlink import receive_model
from .decline import decline_reply
from .instructions import RoundInstructions
from .memory import memory_limit_bytes, training_peak_bytes
from .pruned_training import compressed_training, read_mask

logger = logging.getLogger(__name__)

RESIDUAL_KEY = "residual"
MEMORY_KEY = "memory"

# Error code of a reply whose downlink did not decode. Flower's own codes end
# at 8; the server treats any error reply the same way.
DOWNLINK_DECODE_ERROR = 100

# A phone trains on one core; in simulation, each Ray worker gets one CPU.
TORCH_THREADS = 1

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on local data and reply with the encoded update `local - global`.

    "global" is the model this client rebuilt from the downlink, the one it
    trained from. With error feedback on, the residual (what the encoding
    dropped) lives in `context.state`, which Flower keeps for this node across
    rounds. A downlink that does not decode gets an error reply.
    """
    torch.set_num_threads(TORCH_THREADS)
    instructions = RoundInstructions.from_config_record(msg.content["config"])
    model = build_model()
    try:
        _load_downlink(model, msg, context)
    except DecodeError as error:
        return _downlink_error(msg, error)

    data = _client_arrays(context, instructions)
    partition_id = int(context.node_config["partition-id"])
    global_state = {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}
    mask = read_mask(msg.content, {name: values.shape for name, values in global_state.items()})
    seed = _round_seed(instructions, partition_id)

    def run_training(trained: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int):
        with compressed_training(trained, mask, instructions.qat):
            return train_model(
                trained,
                x,
                y,
                epochs=epochs,
                learning_rate=instructions.learning_rate,
                batch_size=instructions.batch_size,
                seed=seed,
            )

    peak_bytes = _training_peak_bytes(model, data, instructions, context, run_training)
    limit = memory_limit_bytes(context.node_config, instructions.memory_limit_mb)
    if limit is not None and peak_bytes > limit:
        reason = (
            f"out of memory: training needs {peak_bytes / 1e6:.1f} MB, "
            f"above the device limit of {limit / 1e6:.1f} MB"
        )
        logger.info("declining the round: %s", reason)
        return decline_reply(msg, reason)

    result = run_training(model, data.x_train, data.y_train, instructions.local_epochs)

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


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the model rebuilt from the downlink on this client's local evaluation split."""
    torch.set_num_threads(TORCH_THREADS)
    instructions = RoundInstructions.from_config_record(msg.content["config"])
    model = build_model()
    try:
        _load_downlink(model, msg, context)
    except DecodeError as error:
        return _downlink_error(msg, error)

    data = _client_arrays(context, instructions)
    loss, accuracy = evaluate_model(model, data.x_eval, data.y_eval)

    metrics = MetricRecord({"num-examples": len(data.y_eval), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _load_downlink(model: torch.nn.Module, msg: Message, context: Context) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    received = receive_model(msg.content, context, shapes)
    model.load_state_dict({name: torch.from_numpy(values.copy()) for name, values in received.items()})


def _downlink_error(msg: Message, error: DecodeError) -> Message:
    logger.warning("downlink did not decode: %s", error)
    return Message(Error(code=DOWNLINK_DECODE_ERROR, reason=f"downlink did not decode: {error}"), reply_to=msg)


def _client_arrays(context: Context, instructions: RoundInstructions) -> ClientArrays:
    federation = load_federation(
        instructions.held_out_people, instructions.seed, instructions.cache_dir or None
    )
    return federation.client_arrays(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )


def _round_seed(instructions: RoundInstructions, partition_id: int) -> int:
    # One stream per (run seed, round, client): reruns with one seed give the same bytes.
    sequence = np.random.SeedSequence([instructions.seed, instructions.server_round, partition_id])
    return int(sequence.generate_state(1)[0])


def _training_peak_bytes(model, data, instructions, context, run_training) -> int:
    # The peak depends on the batch size, the data and QAT, not on the
    # weights, so it is measured once per node and setting.
    setting = f"{instructions.batch_size}/{len(data.y_train)}/{instructions.qat}"
    if MEMORY_KEY in context.state.config_records:
        record = context.state.config_records[MEMORY_KEY]
        if record.get("setting") == setting:
            return int(record["peak-bytes"])

    peak = training_peak_bytes(
        model,
        data.x_train,
        data.y_train,
        instructions.batch_size,
        lambda probe, x, y: run_training(probe, x, y, epochs=1),
    )
    context.state[MEMORY_KEY] = ConfigRecord({"setting": setting, "peak-bytes": peak})
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
    delta = compact(delta, mask)
    if not instructions.error_feedback:
        return codec.encode(delta, seed)

    residual = None
    if RESIDUAL_KEY in context.state.array_records:
        residual = {
            name: array.numpy() for name, array in context.state.array_records[RESIDUAL_KEY].items()
        }
    if residual is not None:
        residual = compact(residual, mask)
    payload, residual = encode_with_error_feedback(codec, delta, residual, seed)
    # The residual is kept at full shape, so it survives a mask that changes
    # between rounds; what a pruned entry had left is dropped with it.
    residual = expand(residual, mask, shapes)

    # Error feedback costs one extra float32 copy of the model per client.
    context.state[RESIDUAL_KEY] = ArrayRecord({name: Array(values) for name, values in residual.items()})
    return payload
