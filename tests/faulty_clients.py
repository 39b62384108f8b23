"""ClientApps that misbehave on purpose, importable by the Simulation Engine's workers."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pocketfl.client import app as honest

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train honestly, then corrupt the payload of partition 0 by flipping one byte."""
    reply = honest.train(msg, context)
    if int(context.node_config["partition-id"]) != 0:
        return reply

    payload = bytearray(reply.content["update"]["payload"])
    payload[len(payload) // 2] ^= 0xFF
    content = RecordDict(
        {"update": ConfigRecord({"payload": bytes(payload)}), "metrics": reply.content["metrics"]}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate honestly."""
    return honest.evaluate(msg, context)
