"""The phone's reply to the server's identity query: its stable key, from the node config only.

Node ids change every time a simulation starts, so the server queries each
node once for a key that does not change: a simulated phone's partition id. The reply
comes from the node config alone, without loading data or building the
task. A phone without a partition id replies with an empty record and is
sampled after the keyed ones.
"""

from flwr.app import ConfigRecord, Context, Message, RecordDict

# Keys of the query reply. pocketfl.server.node_keys defines them again,
# because the server does not import client code.
IDENTITY_KEY = "identity"
PARTITION_ID_KEY = "partition-id"


def identity_reply(msg: Message, context: Context) -> Message:
    """Reply to the server's query with this node's partition id, if its node config has one."""
    identity = ConfigRecord()
    partition_id = context.node_config.get(PARTITION_ID_KEY)
    if isinstance(partition_id, int) and not isinstance(partition_id, bool):
        identity[PARTITION_ID_KEY] = partition_id
    return Message(content=RecordDict({IDENTITY_KEY: identity}), reply_to=msg)
