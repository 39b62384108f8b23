"""Golden wire-format vectors: fixed inputs, seed, payload bytes and decoded tensors.

The vectors in tests/vectors/ pin the wire format byte for byte. A failure here
means that the encoder or the decoder changed its output. If that change is
intended, it is a wire-format change: regenerate with
``python tests/vectors/generate.py --force`` and tell client ports (see
tests/vectors/README.md).
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pocketfl.compression import UpdateCodec, decode_update

VECTOR_FOLDER = Path(__file__).resolve().parent / "vectors"


def _load_generator():
    spec = importlib.util.spec_from_file_location("golden_generate", VECTOR_FOLDER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()
VECTOR_PATHS = sorted(VECTOR_FOLDER.glob("*.json"))


def _tensors(entries: list[dict]) -> dict[str, np.ndarray]:
    return {
        entry["name"]: np.frombuffer(bytes.fromhex(entry["float32_le_hex"]), dtype="<f4")
        .astype(np.float32)
        .reshape(entry["shape"])
        for entry in entries
    }


def _load(path: Path) -> dict:
    vector = json.loads(path.read_text())
    assert vector["vector_format"] == GENERATOR.VECTOR_FORMAT
    return vector


def test_every_listed_pipeline_has_a_vector():
    missing = [spec for spec in GENERATOR.PIPELINES if not GENERATOR.vector_path(spec).exists()]
    assert not missing, f"run `python tests/vectors/generate.py` to write vectors for {missing}"

    listed = {GENERATOR.vector_path(spec) for spec in GENERATOR.PIPELINES}
    unlisted = [path.name for path in VECTOR_PATHS if path not in listed]
    assert not unlisted, f"vectors without a pipeline in generate.PIPELINES: {unlisted}"


@pytest.mark.parametrize("path", VECTOR_PATHS, ids=lambda path: path.stem)
def test_encoding_the_inputs_gives_the_payload(path):
    vector = _load(path)
    inputs = _tensors(vector["inputs"])

    payload = UpdateCodec(vector["pipeline"]).encode(inputs, seed=vector["seed"])

    assert len(payload) == vector["payload_size"]
    assert payload.hex() == vector["payload_hex"]


@pytest.mark.parametrize("path", VECTOR_PATHS, ids=lambda path: path.stem)
def test_decoding_the_payload_gives_the_decoded_tensors(path):
    vector = _load(path)
    inputs = _tensors(vector["inputs"])
    shapes = {name: array.shape for name, array in inputs.items()}

    decoded = decode_update(bytes.fromhex(vector["payload_hex"]), shapes)

    expected = vector["decoded"]
    assert [entry["name"] for entry in expected] == list(decoded)
    for entry in expected:
        array = decoded[entry["name"]]
        assert array.dtype == np.float32
        assert list(array.shape) == entry["shape"]
        assert GENERATOR.float32_hex(array) == entry["float32_le_hex"], entry["name"]


@pytest.mark.parametrize("path", VECTOR_PATHS, ids=lambda path: path.stem)
def test_payload_names_its_canonical_pipeline(path):
    vector = _load(path)
    payload = bytes.fromhex(vector["payload_hex"])
    spec = vector["canonical_pipeline"].encode("utf-8")

    # magic, version, spec length (u16 little-endian), spec text
    assert payload[:4] == b"PFLU"
    assert int.from_bytes(payload[5:7], "little") == len(spec)
    assert payload[7 : 7 + len(spec)] == spec


def test_vector_inputs_are_what_the_generator_makes():
    # The inputs come from Python's random module, stable across platforms, so
    # a mismatch means someone edited the JSON or the generator by hand.
    expected = GENERATOR.tensor_entries(GENERATOR.make_inputs())
    for path in VECTOR_PATHS:
        assert _load(path)["inputs"] == expected, path.name
