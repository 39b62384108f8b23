"""Server checkpoints: everything a run needs to continue after the server process dies.

After each completed round the server writes one file, `checkpoint.npz`, into
the run folder: the global model, the round number, the strategy's state, the
server's random number generator states and the report so far. The file is
written to a temporary name, flushed to disk and renamed over the old one, so
after a crash at any moment the folder contains either the previous checkpoint or
the new one, never a torn file.

The format is a NumPy `.npz` archive read with `allow_pickle=False`: arrays
under `model/<tensor name>` and `rng/...`, and the rest as one UTF-8 JSON
document in the uint8 array `meta`. Nothing in it can execute code on load.
"""

import hashlib
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_FORMAT_VERSION = 1

MODEL_PREFIX = "model/"
META_KEY = "meta"
NUMPY_RNG_KEY = "rng/numpy-keys"
TORCH_RNG_KEY = "rng/torch"


class CheckpointError(Exception):
    """A checkpoint file that is missing parts, malformed or of another format version."""


@dataclass
class Checkpoint:
    """State of a run after `completed_rounds` rounds.

    `report` is the report as JSON-ready data, `initial_accuracy` the central
    accuracy of the initial model, `strategy_state` whatever the
    strategy needs to continue (JSON-ready), and `rng_state` the states of
    Python's `random`, NumPy's global generator and torch's CPU generator.
    """

    completed_rounds: int
    model: dict[str, np.ndarray]
    report: dict[str, Any]
    initial_accuracy: float = 0.0
    strategy_state: dict[str, Any] = field(default_factory=dict)
    rng_state: dict[str, Any] = field(default_factory=dict)


def capture_rng_state() -> dict[str, Any]:
    """Return the states of the server's global random number generators.

    Flower's node sampling draws from Python's `random`; NumPy's and torch's
    global generators are kept too, so that nothing that draws from them
    later in the run depends on whether the server restarted.
    """
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": np.asarray(keys, dtype=np.uint32),
            "position": int(position),
            "has-gauss": int(has_gauss),
            "cached-gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state().numpy(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators to a state from `capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))

    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["position"],
            numpy_state["has-gauss"],
            numpy_state["cached-gaussian"],
        )
    )
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8).copy()))


def save_checkpoint(checkpoint: Checkpoint, run_dir: Path) -> Path:
    """Write `checkpoint` to `run_dir/checkpoint.npz` atomically and return the path."""
    arrays: dict[str, np.ndarray] = {
        MODEL_PREFIX + name: np.asarray(values) for name, values in checkpoint.model.items()
    }
    meta: dict[str, Any] = {
        "format-version": CHECKPOINT_FORMAT_VERSION,
        "completed-rounds": checkpoint.completed_rounds,
        "report": checkpoint.report,
        "initial-accuracy": checkpoint.initial_accuracy,
        "strategy-state": checkpoint.strategy_state,
    }
    if checkpoint.rng_state:
        rng = checkpoint.rng_state
        arrays[NUMPY_RNG_KEY] = np.asarray(rng["numpy"]["keys"], dtype=np.uint32)
        arrays[TORCH_RNG_KEY] = np.asarray(rng["torch"], dtype=np.uint8)
        numpy_rest = {key: value for key, value in rng["numpy"].items() if key != "keys"}
        meta["rng"] = {"python": rng["python"], "numpy": numpy_rest}
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)

    path = run_dir / CHECKPOINT_FILE
    _replace_atomically(path, lambda file: np.savez(file, **arrays))
    return path


def save_model(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """Write a model's state dict with `torch.save`, atomically and owner-only like the checkpoint."""
    _replace_atomically(path, lambda file: torch.save(state_dict, file))
    return path


def _replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    # mkstemp creates the file with mode 0600, which the rename keeps: run
    # files hold the model, so they are as private as the checkpoint.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    _sync_folder(path.parent)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """Read `run_dir/checkpoint.npz`; None if there is none, CheckpointError if it is unreadable."""
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return None

    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}; delete it to start over") from None

    if META_KEY not in contents:
        raise CheckpointError(f"checkpoint {path} has no '{META_KEY}' entry; delete it to start over")
    try:
        meta = json.loads(contents[META_KEY].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} has malformed metadata: {error}") from None
    if meta.get("format-version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format-version')!r}, "
            f"this pocketfl reads version {CHECKPOINT_FORMAT_VERSION}; delete it to start over"
        )

    model = {
        name.removeprefix(MODEL_PREFIX): values
        for name, values in contents.items()
        if name.startswith(MODEL_PREFIX)
    }
    rng_state: dict[str, Any] = {}
    if "rng" in meta:
        rng_state = {
            "python": meta["rng"]["python"],
            "numpy": {**meta["rng"]["numpy"], "keys": contents[NUMPY_RNG_KEY]},
            "torch": contents[TORCH_RNG_KEY],
        }
    return Checkpoint(
        completed_rounds=int(meta["completed-rounds"]),
        model=model,
        report=meta["report"],
        initial_accuracy=float(meta.get("initial-accuracy", 0.0)),
        strategy_state=meta.get("strategy-state", {}),
        rng_state=rng_state,
    )


def remove_checkpoint(run_dir: Path) -> None:
    """Delete the run folder's checkpoint, if any, so that a fresh run cannot resume a stale one."""
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def model_digest(model: dict[str, np.ndarray]) -> str:
    """Return the SHA-256 of a model's tensors: names, dtypes, shapes and bytes, in name order.

    Two models have the same digest only if they are equal bit for bit.
    """
    digest = hashlib.sha256()
    for name in sorted(model):
        values = np.ascontiguousarray(model[name])
        header = f"{name}|{values.dtype.str}|{values.shape}\n"
        digest.update(header.encode("utf-8"))
        digest.update(values.tobytes())
    return digest.hexdigest()


def _sync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk; some file
    # systems cannot open folders, which then costs durability, not atomicity.
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
