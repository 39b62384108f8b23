"""A ClientApp whose clients misbehave in different ways, by partition id.

The Simulation Engine's workers import this module by name, so the test puts
this folder on PYTHONPATH.

| partition | train reply | evaluate reply |
| --- | --- | --- |
| 0 | payload with one byte flipped | num-examples 0 |
| 1 | negative train-seconds | honest |
| 2 | honest, behind an extra MetricRecord | an extra metric key |
| 3 | raises an exception | raises an exception |
| 4 | honest update, re-encoded as float32 (`none`) | honest |
| 5 | declines: "not charging" | honest |
| 6 and up | honest | honest |

Every partition replies honestly to the identity query, except 2, whose reply
is garbage, and 3, which raises. Both still train as the table says.
"""

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pocketfl.client.app import evaluate_round, train_round
from pocketfl.client.decline import decline_reply
from pocketfl.client.identity import IDENTITY_KEY, PARTITION_ID_KEY, identity_reply
from pocketfl.compression import UpdateCodec, decode_update
from pocketfl.tasks.har.model import build_model
from pocketfl.tasks.har.task import HarTask

CORRUPT_PAYLOAD = 0
NEGATIVE_SECONDS = 1
EXTRA_RECORDS = 2
RAISES = 3
WRONG_SPEC = 4
DECLINES = 5
DECLINE_REASON = "not charging"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train honestly, then damage the reply as the table above describes."""
    partition_id = int(context.node_config["partition-id"])
    if partition_id == RAISES:
        raise RuntimeError("simulated crash during training")
    if partition_id == DECLINES:
        return decline_reply(msg, DECLINE_REASON)

    reply = train_round(HarTask, msg, context)
    payload = reply.content["update"]["payload"]
    metrics = dict(reply.content["metrics"])

    if partition_id == CORRUPT_PAYLOAD:
        damaged = bytearray(payload)
        damaged[len(damaged) // 2] ^= 0xFF
        payload = bytes(damaged)
    if partition_id == NEGATIVE_SECONDS:
        metrics["train-seconds"] = -100.0
    if partition_id == WRONG_SPEC:
        shapes = {name: tuple(tensor.shape) for name, tensor in build_model().state_dict().items()}
        payload = UpdateCodec("none").encode(decode_update(payload, shapes), seed=0)

    records = {}
    if partition_id == EXTRA_RECORDS:
        records["aaa"] = MetricRecord({"battery": 0.5})
    records["update"] = ConfigRecord({"payload": payload})
    records["metrics"] = MetricRecord(metrics)
    return Message(content=RecordDict(records), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate honestly, then damage the reply as the table above describes."""
    partition_id = int(context.node_config["partition-id"])
    if partition_id == RAISES:
        raise RuntimeError("simulated crash during evaluation")

    reply = evaluate_round(HarTask, msg, context)
    metrics = dict(reply.content["metrics"])
    if partition_id == CORRUPT_PAYLOAD:
        metrics["num-examples"] = 0
    if partition_id == EXTRA_RECORDS:
        metrics["battery"] = 0.5
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply to the identity query, with garbage or a crash for partitions 2 and 3."""
    partition_id = int(context.node_config["partition-id"])
    if partition_id == RAISES:
        raise RuntimeError("simulated crash during the identity query")
    if partition_id == EXTRA_RECORDS:
        garbage = ConfigRecord({PARTITION_ID_KEY: "two", "x": b"\xff" * 8})
        return Message(content=RecordDict({IDENTITY_KEY: garbage}), reply_to=msg)
    return identity_reply(msg, context)
