"""The last payload a phone sent, kept so that error feedback can take it back if the server discards it.

Error feedback sets the new residual to `(update + residual) - decoded(payload)`
as soon as the phone encodes, as if the server applied the payload. A server
that closes a round before a report arrives discards it as late, and with it
the payload's entries, for top-k the largest of the update. The server then
names that round in the phone's next train message, and the phone adds the
payload it kept back into its residual, so those entries go out again. The
decoded payloads that the server applied plus the residual then equal the sum
of the updates once more.

The payload is kept with its round and the pruning mask it was encoded under,
which places the entries of masked tensors: in `Context.state`, or with node
config `state-dir` in `<state-dir>/sent-report.npz` next to the residual. This
costs the payload (about 1.2 kB for the default `lowrank:2,q:4` on the HAR
model) plus one bit per entry of each masked tensor.
"""

import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from pocketfl.compression import DecodeError
from pocketfl.compression.masked_updates import decode_masked_update
from pocketfl.compression.pruning import MASK_BITS, MASK_TENSORS, Mask, mask_from_fields, pack_mask

from .residual_store import STATE_DIR_KEY, save_arrays

logger = logging.getLogger(__name__)

# Key of the report in `Context.state`, and its file in the node's state-dir.
SENT_REPORT_KEY = "sent-report"
SENT_REPORT_FILE = "sent-report.npz"

ROUND_FIELD = "round"
PAYLOAD_FIELD = "payload"
# The file stores mask bit fields one array each, as "mask-bits-0", "mask-bits-1", ...
MASK_TENSORS_ARRAY = "mask-tensors"
MASK_BITS_ARRAY = "mask-bits-{}"


@dataclass(frozen=True)
class SentReport:
    """One payload as sent, with its round and the pruning mask it was encoded under (empty without pruning)."""

    server_round: int
    payload: bytes
    mask: Mask


def keep_sent_report(context: Context, report: SentReport) -> None:
    """Keep `report` in place of the one kept before, in the node's state-dir or its `Context.state`."""
    names, blobs = pack_mask(report.mask)
    path = sent_report_path(context.node_config)
    if path is None:
        fields = {
            ROUND_FIELD: report.server_round,
            PAYLOAD_FIELD: report.payload,
            MASK_TENSORS: names,
            MASK_BITS: blobs,
        }
        context.state[SENT_REPORT_KEY] = ConfigRecord(fields)
        return

    arrays = {
        ROUND_FIELD: np.int64(report.server_round),
        PAYLOAD_FIELD: np.frombuffer(report.payload, dtype=np.uint8),
        MASK_TENSORS_ARRAY: np.array(names, dtype=str),
    }
    for index, blob in enumerate(blobs):
        arrays[MASK_BITS_ARRAY.format(index)] = np.frombuffer(blob, dtype=np.uint8)
    save_arrays(path, arrays)


def add_discarded_report(
    residual: dict[str, np.ndarray] | None,
    discarded_round: int,
    context: Context,
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray] | None:
    """Add the kept payload back into `residual` when the server discarded it in `discarded_round`.

    `residual` and the result hold full-shape tensors of `shapes` (not
    compacted by a pruning mask); None stands for a zero residual. The payload
    is added only if it is the one of `discarded_round`, so a notice that
    comes twice, or after a later report, adds nothing. Any other mismatch
    also leaves `residual` as it is, with a warning: the payload is then lost,
    as it would be without this step, while a wrong one would corrupt every
    later update.
    """
    fields = _kept_fields(context)
    if fields is None:
        logger.warning(
            "the server discarded this phone's report of round %d, which it no longer keeps", discarded_round
        )
        return residual
    if fields[ROUND_FIELD] != discarded_round:
        logger.debug(
            "the server discarded this phone's report of round %d, but the kept report is of round %d",
            discarded_round,
            fields[ROUND_FIELD],
        )
        return residual

    try:
        mask = mask_from_fields(fields, shapes)
        decoded = decode_masked_update(fields[PAYLOAD_FIELD], shapes, mask)
    except (DecodeError, ValueError) as error:
        logger.warning("ignoring the kept report of round %d: %s", discarded_round, error)
        return residual

    if residual is None:
        residual = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
    if set(residual) != set(shapes) or any(residual[name].shape != tuple(shapes[name]) for name in shapes):
        logger.warning("ignoring the kept report of round %d: the residual does not fit the model", discarded_round)
        return residual

    logger.debug("adding the discarded report of round %d back into the residual", discarded_round)
    return {name: np.asarray(residual[name] + decoded[name], dtype=np.float32) for name in shapes}


def sent_report_path(node_config: Mapping) -> Path | None:
    """Return the kept report's file of this node, or None if the node config sets no `state-dir`."""
    if STATE_DIR_KEY not in node_config:
        return None
    return Path(str(node_config[STATE_DIR_KEY])) / SENT_REPORT_FILE


def _kept_fields(context: Context) -> dict | None:
    """Return the kept report as record fields, or None if there is none or its file is unreadable."""
    path = sent_report_path(context.node_config)
    if path is None:
        if SENT_REPORT_KEY not in context.state.config_records:
            return None
        return dict(context.state.config_records[SENT_REPORT_KEY])

    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = [str(name) for name in archive[MASK_TENSORS_ARRAY]]
            return {
                ROUND_FIELD: int(archive[ROUND_FIELD]),
                PAYLOAD_FIELD: archive[PAYLOAD_FIELD].tobytes(),
                MASK_TENSORS: names,
                MASK_BITS: [archive[MASK_BITS_ARRAY.format(index)].tobytes() for index in range(len(names))],
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("ignoring unreadable kept report %s: %s", path, error)
        return None
