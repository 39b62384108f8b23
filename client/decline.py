"""Declining a round: the reply a phone sends when it will not train or evaluate now.

A phone declines when the embedding app reports that it is busy, on battery or on a
metered network, or when the round would not fit in its memory. A decline is
a normal reply, not an error: the server counts it as a dropout with its
reason and samples around it.
"""

import logging

from flwr.app import ConfigRecord, Message, RecordDict

logger = logging.getLogger(__name__)

# Keys of the reply, as the server's strategy reads them.
DECLINED_KEY = "declined"
REASON_KEY = "reason"

# Reasons are short labels that the server counts; longer text is cut.
MAX_REASON_LENGTH = 200


def decline_reply(msg: Message, reason: str) -> Message:
    """Return the reply that declines `msg`, with a short reason such as "not charging"."""
    reason = reason.strip()[:MAX_REASON_LENGTH] or "unspecified"
    logger.info("declining round: %s", reason)
    content = RecordDict({DECLINED_KEY: ConfigRecord({REASON_KEY: reason})})
    return Message(content=content, reply_to=msg)
