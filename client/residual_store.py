"""Error-feedback residual kept in a folder on the device, so that it outlives a restart.

Flower's `Context.state` lives in the SuperNode process and is lost when the
app or the phone restarts, and with it the part of past updates that the
server never received. With node config `state-dir`, the client keeps the residual
in `<state-dir>/residual.npz` instead, written atomically (temporary file,
then rename), so a crash leaves the previous residual or the new one.
"""

import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

STATE_DIR_KEY = "state-dir"
RESIDUAL_FILE = "residual.npz"


def residual_path(node_config: Mapping[str, Any]) -> Path | None:
    """Return the residual file of this node, or None if the node config sets no `state-dir`."""
    if STATE_DIR_KEY not in node_config:
        return None
    return Path(str(node_config[STATE_DIR_KEY])) / RESIDUAL_FILE


def load_residual(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """Read the residual at `path`; None if there is none or it does not fit `shapes`.

    A residual that is unreadable or of another model is dropped with a
    warning: starting error feedback from zero costs accuracy for a round or
    two, while a wrong residual would corrupt every later update.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            residual = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        logger.warning("ignoring unreadable residual %s: %s", path, error)
        return None

    fits = set(residual) == set(shapes) and all(
        residual[name].shape == tuple(shape) and residual[name].dtype == np.float32
        for name, shape in shapes.items()
    )
    if not fits:
        logger.warning("ignoring residual %s: its tensors do not match the model", path)
        return None
    return residual


def save_residual(path: Path, residual: Mapping[str, np.ndarray]) -> None:
    """Write `residual` to `path` atomically, creating the folder if needed."""
    save_arrays(path, {name: np.asarray(values, dtype=np.float32) for name, values in residual.items()})


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` to the `.npz` file `path` atomically, creating the folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
