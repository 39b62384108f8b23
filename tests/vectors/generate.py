"""Write the golden wire-format vectors in this folder, one JSON file per pipeline.

Each vector contains a pipeline spec, a seed, the input tensors, the payload that
`UpdateCodec.encode` writes for them and the tensors that `decode_update`
reads back, all floats as hex of their little-endian float32 bytes.
tests/test_golden_vectors.py checks both directions, and clients in other
languages can check their encoder and decoder against the same files.

Usage, from the repository root:

    python tests/vectors/generate.py           # write vectors that are missing
    python tests/vectors/generate.py --force   # also rewrite changed ones

A vector that exists and would change is rejected without ``--force``: a changed
vector means a change of the wire format (or of the encoder's rounding), which
every client port must follow. See README.md in this folder for the format.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from pocketfl.compression import UpdateCodec, decode_update

# One vector per pipeline. Adding a stage to the tests is adding one line here
# and running this script.
PIPELINES = (
    "none",
    "q:8",
    "q:4:64",
    "q:1",
    "q:3:5",
    "topk:0.1",
    "topk:0.1:tensor",
    "topk:0.05,q:4",
    "topk:0.3,q:2:4",
    "topk:0.01,q:8",
    "q:4:nearest",
    "qsgd:8",
    "qsgd:4:64",
    "sign",
    "topk:0.1,ternary",
    "fp16",
    "bf16",
    "randk:0.1,q:8",
    "thresh:0.5,q:4",
    "topk:0.1,q:8;vector=none",
)
# NOTE: zstd and lowrank have no vectors. zstd's compressed bytes may change
# between zstandard releases, and lowrank's QR runs in LAPACK, whose float64
# results differ between BLAS builds, so neither encoder is byte-stable.

VECTOR_FORMAT = 1
SEED = 20240601
FOLDER = Path(__file__).resolve().parent


def vector_path(spec: str) -> Path:
    """Return the file of a pipeline's vector: ``topk:0.05,q:4`` is ``topk_0.05+q_4.json``."""
    return FOLDER / (spec.replace(":", "_").replace(",", "+") + ".json")


def make_inputs() -> dict[str, np.ndarray]:
    """Return the input tensors, the same for every pipeline.

    Python's `random.Random` gives the same stream on every platform and
    version, so the inputs do not depend on numpy's distributions. Values are
    rounded to float32 before they are written.
    """
    rng = random.Random(SEED)

    def uniform(count: int, scale: float) -> list[float]:
        return [(2.0 * rng.random() - 1.0) * scale for _ in range(count)]

    # Mostly small values with a few large ones, as in a real update.
    heavy = [rng.gauss(0.0, 0.01) for _ in range(96)]
    for position in rng.sample(range(96), 5):
        heavy[position] = rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 3.0)

    tensors = {
        "scalar": np.array(0.7312, dtype=np.float32),
        "constant": np.full((7,), -0.125, dtype=np.float32),
        "tiny": np.array(uniform(12, 1e-6), dtype=np.float32).reshape(3, 4),
        "large": np.array(uniform(120, 40.0), dtype=np.float32).reshape(4, 5, 6),
        "heavy_tailed": np.array(heavy, dtype=np.float32).reshape(2, 48),
        # Repeated magnitudes exercise top-k's tie rule (lower position first).
        "ties": np.array([0.5, -0.5, 0.25, 0.5, 0.0, -0.25, 0.5, 0.0], dtype=np.float32),
        "empty": np.zeros((2, 0, 3), dtype=np.float32),
    }
    return tensors


def float32_hex(array: np.ndarray) -> str:
    return np.ascontiguousarray(array, dtype="<f4").tobytes().hex()


def tensor_entries(tensors: dict[str, np.ndarray]) -> list[dict]:
    return [
        {"name": name, "shape": list(array.shape), "float32_le_hex": float32_hex(array)}
        for name, array in tensors.items()
    ]


def make_vector(spec: str) -> dict:
    """Encode the inputs under one pipeline and return the vector as a JSON-ready dict."""
    inputs = make_inputs()
    codec = UpdateCodec(spec)
    payload = codec.encode(inputs, seed=SEED)
    shapes = {name: array.shape for name, array in inputs.items()}
    decoded = decode_update(payload, shapes)

    return {
        "vector_format": VECTOR_FORMAT,
        "pipeline": spec,
        "canonical_pipeline": codec.spec.canonical(),
        "seed": SEED,
        "inputs": tensor_entries(inputs),
        "payload_size": len(payload),
        "payload_hex": payload.hex(),
        "decoded": tensor_entries(decoded),
    }


def render(vector: dict) -> str:
    return json.dumps(vector, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--force", action="store_true", help="rewrite vectors whose content would change"
    )
    options = parser.parse_args()

    rejected = []
    for spec in PIPELINES:
        path = vector_path(spec)
        text = render(make_vector(spec))
        if path.exists():
            if path.read_text() == text:
                print(f"unchanged  {path.name}")
                continue
            if not options.force:
                rejected.append(path.name)
                print(f"REFUSED    {path.name}: content would change")
                continue
            print(f"rewritten  {path.name}")
        else:
            print(f"written    {path.name}")
        path.write_text(text)

    if rejected:
        print(
            f"\n{len(rejected)} vector(s) would change, which means the wire format or the "
            "encoder changed. Rerun with --force only if that change is intended, and "
            "tell client ports about it.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
