"""A client's reply that declines a round: a dropout with a reason, not a failure."""

from flwr.app import ConfigRecord, Message, RecordDict

DECLINED_KEY = "declined"
REASON_KEY = "reason"


def decline_reply(msg: Message, reason: str) -> Message:
    """Reply to `msg` that this client does not train this round, and why."""
    return Message(content=RecordDict({DECLINED_KEY: ConfigRecord({REASON_KEY: reason})}), reply_to=msg)
