"""The Flower ClientApp that runs on each phone: train locally, send a compressed update."""

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pocketfl.compression import DecodeError, UpdateCodec, encode_with_error_feedback
from pocketfl.tasks.har.federation import ClientArrays, load_federation
from pocketfl.tasks.har.model import build_model
from pocketfl.tasks.har.training import evaluate as evaluate_model
from pocketfl.tasks.har.training import train as train_model

from .downlink import receive_model
from .instructions import RoundInstructions
from .node_data import node_partition
from .policy import training_decline_reason
from .residual_store import load_residual, residual_path, save_residual

logger = logging.getLogger(__name__)

RESIDUAL_KEY = "residual"

# Error code of a reply whose downlink did not decode. Flower's own codes end
# at 8; the server treats any error reply the same way.
DOWNLINK_DECODE_ERROR = 100

# Temporary error code of a train request declined by the device policy.
DEVICE_POLICY_DECLINE = 101

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
    decline = training_decline_reason(context.node_config)
    if decline is not None:
        return _decline(msg, decline)

    torch.set_num_threads(TORCH_THREADS)
    instructions = RoundInstructions.from_config_record(msg.content["config"])
    model = build_model()
    try:
        _load_downlink(model, msg, context)
    except DecodeError as error:
        return _downlink_error(msg, error)

    data = _client_arrays(context, instructions)
    partition_id, _ = _partition(context, instructions)
    global_state = {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}

    seed = _round_seed(instructions, partition_id)
    result = train_model(
        model,
        data.x_train,
        data.y_train,
        epochs=instructions.local_epochs,
        learning_rate=instructions.learning_rate,
        batch_size=instructions.batch_size,
        seed=seed,
    )

    delta = {
        name: tensor.numpy() - global_state[name] for name, tensor in model.state_dict().items()
    }
    payload = _encode(delta, instructions, context, seed)

    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "train-seconds": result.seconds,
            "payload-bytes": len(payload),
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
    return federation.client_arrays(*_partition(context, instructions))


def _partition(context: Context, instructions: RoundInstructions) -> tuple[int, int]:
    federation = load_federation(
        instructions.held_out_people, instructions.seed, instructions.cache_dir or None
    )
    return node_partition(context.node_config, federation.split.train_people)


def _round_seed(instructions: RoundInstructions, partition_id: int) -> int:
    # One stream per (run seed, round, client): reruns with one seed give the same bytes.
    sequence = np.random.SeedSequence([instructions.seed, instructions.server_round, partition_id])
    return int(sequence.generate_state(1)[0])


def _encode(
    delta: dict[str, np.ndarray],
    instructions: RoundInstructions,
    context: Context,
    seed: int,
) -> bytes:
    codec = UpdateCodec(instructions.compression)
    if not instructions.error_feedback:
        return codec.encode(delta, seed)

    stored_at = residual_path(context.node_config)
    residual = None
    if stored_at is not None:
        residual = load_residual(stored_at, {name: values.shape for name, values in delta.items()})
    elif RESIDUAL_KEY in context.state.array_records:
        residual = {
            name: array.numpy() for name, array in context.state.array_records[RESIDUAL_KEY].items()
        }
    payload, residual = encode_with_error_feedback(codec, delta, residual, seed)

    # Error feedback costs one extra float32 copy of the model per client.
    if stored_at is not None:
        save_residual(stored_at, residual)
    else:
        context.state[RESIDUAL_KEY] = ArrayRecord({name: Array(values) for name, values in residual.items()})
    return payload


def _decline(msg: Message, reason: str) -> Message:
    # TODO: reply through the shared decline contract once it is on this branch.
    logger.info("declining to train: %s", reason)
    return Message(Error(code=DEVICE_POLICY_DECLINE, reason=reason), reply_to=msg)
