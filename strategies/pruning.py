"""Server side of federated pruning: the round's mask, sent with the train messages.

The server decides each round's mask from the aggregated model, with the
sparsity that the schedule gives for the round, and zeroes the masked
entries of the global model before sending it. Clients train under the
mask and send only the kept entries of their update; the strategy expands
them and the aggregate keeps masked entries at zero.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord

from pocketfl.compression.pruning import (
    MASK_RECORD,
    Mask,
    apply_mask,
    decide_mask,
    mask_fields,
    mask_sparsity,
    scheduled_sparsity,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruningSchedule:
    """How the mask grows over rounds.

    Parameters
    ----------
    kind : str
        "global" (magnitude, one threshold over all weights), "layer"
        (magnitude, the same share in each weight tensor) or "channel" (whole
        output channels of `chain`, removable at export).
    target_sparsity : float
        Share of pruned entries reached at `end_round` and kept after it.
    end_round : int
        Round at which the cubic schedule reaches the target. Leave a few
        rounds after it for the model to recover at full sparsity.
    chain : sequence of str
        Layers that channel pruning narrows, in order (see
        `pocketfl.compression.pruning.channel_mask`).
    """

    kind: str
    target_sparsity: float
    end_round: int
    chain: Sequence[str] = ()

    def mask_for_round(self, server_round: int, weights: dict[str, np.ndarray]) -> Mask:
        """Decide the mask of `server_round` from the aggregated model `weights`."""
        sparsity = scheduled_sparsity(server_round, self.target_sparsity, self.end_round)
        mask = decide_mask(weights, self.kind, sparsity, self.chain)
        logger.info(
            "round %d: %s pruning at sparsity %.3f (%.3f of masked entries)",
            server_round,
            self.kind,
            sparsity,
            mask_sparsity(mask),
        )
        return mask


def prune_global(
    schedule: PruningSchedule, server_round: int, weights: dict[str, np.ndarray]
) -> tuple[Mask, dict[str, np.ndarray], ConfigRecord]:
    """Return the round's mask, the masked global model and the mask's record for train messages."""
    mask = schedule.mask_for_round(server_round, weights)
    return mask, apply_mask(weights, mask), ConfigRecord(mask_fields(mask))


__all__ = ["MASK_RECORD", "PruningSchedule", "prune_global"]
