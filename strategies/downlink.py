"""Downlink compression: encode the global model for each client against its last copy.

The server keeps, for each version it has broadcast, the model that clients
rebuild from it. Decoding is deterministic and both sides add in float32, so a
client and the server have the same reconstruction bit for bit. A client whose
model is version `v` gets the delta `global - reconstruction[v]` under the
configured pipeline. A client with no known version gets the whole model,
encoded under the same pipeline.

Encoding against the reconstruction is itself error feedback: what one
broadcast leaves out (`global - reconstruction`) is part of the next delta, so
the server keeps no separate residual. The exact global model takes the
averaged updates, and clients train from a compressed copy that follows it.
"""

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pocketfl.compression import UpdateCodec, decode_update

logger = logging.getLogger(__name__)

# Keys of the ConfigRecord "downlink" in train and evaluate messages.
DOWNLINK_KEY = "downlink"
PAYLOAD_KEY = "payload"
BASE_VERSION_KEY = "base-version"
VERSION_KEY = "version"
FULL_KEY = "full"

# A full encoding has no base; version ids start at 1.
NO_VERSION = 0

# Each kept version costs one float32 copy of the model on the server. Clients
# that skip a round still hold a recent version, so 3 covers a client that
# missed one train and one evaluate broadcast. An older version gets a full
# encoding, which costs about as much as one delta under 8-bit quantization.
DEFAULT_MAX_VERSIONS = 3


@dataclass(frozen=True)
class EncodedModel:
    """One downlink payload and the version a client rebuilds from it."""

    payload: bytes
    base_version: int
    version: int

    @property
    def full(self) -> bool:
        """Whether the payload is the whole model, not a delta."""
        return self.base_version == NO_VERSION


class DownlinkEncoder:
    """Encode the global model for clients and remember what each client rebuilt.

    Parameters
    ----------
    spec : str
        Pipeline spec of the downlink, as for the uplink (`"q:8"`, ...). Deltas
        and full encodings use the same pipeline. A sparsifying pipeline such
        as `topk:0.01` makes a poor full encoding (1% of the weights); its
        deltas catch up over a few broadcasts.
    seed : int
        Run seed; version `v` is encoded with a seed drawn from `(seed, v)`, so
        two runs with one seed send the same bytes.
    max_versions : int, default 3
        Reconstructions kept. Memory is `max_versions` float32 copies of the
        model. Raise it if clients often miss several rounds in a row.
    """

    def __init__(self, spec: str, seed: int, max_versions: int = DEFAULT_MAX_VERSIONS) -> None:
        if max_versions < 1:
            raise ValueError(f"max_versions must be at least 1, got {max_versions}")
        self.codec = UpdateCodec(spec)
        self.seed = seed
        self.max_versions = max_versions
        self._versions: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._last_version = NO_VERSION

    @property
    def versions(self) -> tuple[int, ...]:
        """Ids of the kept reconstructions, oldest first."""
        return tuple(self._versions)

    @property
    def last_version(self) -> int:
        """Id of the newest version encoded so far; `NO_VERSION` before the first."""
        return self._last_version

    def continue_after(self, version: int) -> None:
        """Number new versions after `version`, as a server restarted from a checkpoint does.

        No reconstruction is kept, so every client gets a full encoding next:
        a client may have rebuilt a broadcast that the checkpoint predates,
        and a delta against a base the two sides disagree on would rebuild a
        wrong model. Ids keep growing, so no version id (or its seed) repeats.
        """
        self._versions.clear()
        self._last_version = max(self._last_version, version)

    def reconstruction(self, version: int) -> dict[str, np.ndarray]:
        """Return the model that a client holding `version` has; KeyError if not kept."""
        return self._versions[version]

    def encode(
        self, global_model: Mapping[str, np.ndarray], base_versions: set[int]
    ) -> dict[int, EncodedModel]:
        """Encode `global_model` once for each base version that clients hold.

        Clients with the same base get the same payload and rebuild the same
        model, so a broadcast costs one encoding per distinct base, not per
        client. Bases that are not kept (`NO_VERSION`, or dropped) map to the
        one full encoding of this broadcast.

        Returns
        -------
        dict[int, EncodedModel]
            Base version to what clients holding it are sent.
        """
        shapes = {name: np.shape(values) for name, values in global_model.items()}
        global_model = {name: np.asarray(values, dtype=np.float32) for name, values in global_model.items()}

        # Each distinct base gives its own reconstruction of this broadcast,
        # hence its own new version id. The bases are taken before encoding,
        # since keeping the new versions may drop old ones.
        bases = {base: self._versions[base] for base in sorted(base_versions) if base in self._versions}
        encoded: dict[int, EncodedModel] = {}
        if any(base not in bases for base in base_versions):
            full = self._encode_against(global_model, shapes, NO_VERSION, None)
            encoded.update({base: full for base in base_versions if base not in bases})
        for base_version, base in bases.items():
            encoded[base_version] = self._encode_against(global_model, shapes, base_version, base)
        return encoded

    def _encode_against(
        self,
        global_model: dict[str, np.ndarray],
        shapes: dict[str, tuple[int, ...]],
        base_version: int,
        base: dict[str, np.ndarray] | None,
    ) -> EncodedModel:
        if base is None:
            difference = global_model
        else:
            difference = {name: global_model[name] - base[name] for name in global_model}

        self._last_version += 1
        version = self._last_version
        payload = self.codec.encode(difference, self._version_seed(version))

        # The server decodes its own payload exactly as the client will, so
        # the kept reconstruction is the client's model, bit for bit.
        decoded = decode_update(payload, shapes)
        rebuilt = decoded if base is None else apply_delta(base, decoded)
        self._keep(version, rebuilt)
        return EncodedModel(payload=payload, base_version=base_version, version=version)

    def _keep(self, version: int, model: dict[str, np.ndarray]) -> None:
        self._versions[version] = model
        while len(self._versions) > self.max_versions:
            dropped, _ = self._versions.popitem(last=False)
            logger.debug("downlink version %d dropped; its holders get a full encoding", dropped)

    def _version_seed(self, version: int) -> int:
        sequence = np.random.SeedSequence([self.seed, version])
        return int(sequence.generate_state(1)[0])


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return `base + delta` in float32, the one addition that server and clients share.

    Both sides must add in the same dtype and order to agree bit for bit, so
    the client imports nothing of this module but repeats this line exactly.
    """
    return {
        name: np.asarray(base[name] + delta[name], dtype=np.float32).reshape(np.shape(base[name]))
        for name in base
    }
