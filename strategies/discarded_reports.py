"""Tell each phone which of its reports the server discarded, so that error feedback can resend it.

An error-feedback client sets its residual as if the server applied every
payload it sends. A report that the simulated clock marks late is discarded,
and so is every report of a round that fails (too few reports, or an
aggregate that is not finite), and its payload would be lost for good. The
server therefore names that round
in the phone's next train message, under `DISCARDED_ROUND_KEY` in the round
config, and the phone adds the payload it kept back into its residual.
"""

from collections.abc import Iterable

from flwr.app import Message

# Key in the round config of one train message; the client reads it as
# `RoundInstructions.discarded_round`.
DISCARDED_ROUND_KEY = "discarded-round"
CHECKPOINT_KEY = "discarded-rounds"


class DiscardedReports:
    """The last round, per node, whose report the server discarded.

    A node's entry goes out with each train message to it and is forgotten
    once the node replies with an update, late or not, because a phone that
    encodes an update has used the notice. A phone that declines, fails or
    drops out has not, so its next train message names the round again. A
    notice that comes twice adds nothing, because the phone adds back only a
    payload of the round named.
    """

    def __init__(self) -> None:
        self._rounds: dict[int, int] = {}

    def add_to_messages(self, messages: Iterable[Message], config_key: str) -> None:
        """Put each node's discarded round into the round config of its train message."""
        for message in messages:
            discarded_round = self._rounds.get(message.metadata.dst_node_id)
            if discarded_round is None:
                continue

            # Each message has its own config (see CompressedFedAvg._sample).
            message.content.config_records[config_key][DISCARDED_ROUND_KEY] = discarded_round

    def settle(self, server_round: int, updated: set[int], discarded: set[int]) -> None:
        """Forget the nodes that sent an update in `server_round`, then record those whose update was discarded.

        `discarded` contains the late nodes and, in a failed round, the on-time ones too.
        """
        for node in updated:
            self._rounds.pop(node, None)
        for node in discarded:
            self._rounds[node] = server_round

    def checkpoint_state(self) -> dict[str, dict[str, int]]:
        """Return the entries as JSON-ready data: node ids as strings, to rounds."""
        return {CHECKPOINT_KEY: {str(node): discarded_round for node, discarded_round in self._rounds.items()}}

    def restore_state(self, state: dict) -> None:
        """Continue from `checkpoint_state()` output (missing in checkpoints of older versions)."""
        entries = state.get(CHECKPOINT_KEY, {})
        self._rounds = {int(node): int(discarded_round) for node, discarded_round in entries.items()}
