"""Coverage-guided fuzzing of `decode_update`, the server's attack surface.

Every reply a server receives is decoded by `pocketfl.compression.decode_update`
against the model's expected shapes. This harness feeds it bytes chosen by
libFuzzer (through atheris) and asserts:

- for every input, the only exception is `DecodeError`, and anything else is
  a crash;
- for every input that decodes, the result has exactly the expected names and
  shapes, as finite float32 arrays;
- for every ``--memory-every``-th input (16 by default), the decode's peak
  Python and numpy allocation, traced by tracemalloc, stays below
  ``MEMORY_BOUND_BYTES``;
- libFuzzer's ``-timeout`` bounds the time of one input and ``-rss_limit_mb``
  the whole process (pass them on the command line, see docs/fuzzing.md).

NOTE: under atheris 3.0.0 the process grows by about 250 KB for every
instrumented comparison of numpy arrays (``a < b`` in pocketfl code): the
instrumentation leaks the result array. The decoder itself does not grow, so
runs longer than a few minutes need ``-rss_limit_mb=8192`` or more.

Two modes:

- ``raw``: the decoder receives the mutated bytes unchanged. Almost every
  mutation then fails the CRC32 check, which tests the frame checks and the CRC.
- ``fix-crc``: the harness rewrites the last 4 bytes with the CRC32 of the
  bytes before them, so mutations get past the CRC into the frame and the
  stage decoders (quantization, top-k index codings, bit packing).

atheris is not a test dependency; install it into the venv to fuzz:

    pip install atheris
    python benchmarks/fuzz_decoder.py --write-seed-corpus /tmp/pfl-fuzz/seeds
    python benchmarks/fuzz_decoder.py --mode fix-crc /tmp/pfl-fuzz/corpus /tmp/pfl-fuzz/seeds \\
        -max_total_time=300 -timeout=2 -rss_limit_mb=8192 -max_len=262144

The module imports neither torch nor atheris at import time, so
tests/test_fuzz_regressions.py can reuse `HAR_SHAPES` and `seed_payloads`.
"""

import argparse
import math
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np

# The HAR CNN's parameters (pocketfl.tasks.har), written out so that the
# harness does not import torch. 32,230 float32 values, 128,920 bytes.
HAR_SHAPES: dict[str, tuple[int, ...]] = {
    "features.0.weight": (32, 6, 5),
    "features.0.bias": (32,),
    "features.3.weight": (64, 32, 5),
    "features.3.bias": (64,),
    "features.6.weight": (64, 64, 5),
    "features.6.bias": (64,),
    "classifier.weight": (6, 64),
    "classifier.bias": (6,),
}
HAR_FLOAT32_BYTES = 4 * sum(math.prod(shape) for shape in HAR_SHAPES.values())

# Peak traced allocation of one decode. Valid payloads of the seed pipelines
# peak at 1.05 to 1.5 times the model's float32 size (the result arrays plus
# one tensor's temporaries), and random-k at 2.65 times. Four times leaves
# room for those and still catches any allocation sized by a declared length
# instead of the expected shapes.
MEMORY_BOUND_BYTES = 4 * HAR_FLOAT32_BYTES + (64 << 10)

# Pipelines of the seed corpus. One line adds a pipeline.
SEED_PIPELINES = (
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
    "topk:0.001,q:8:16",
)
# Seeds for stages that may exist in this checkout or a later one: each is
# added to the seed corpus when the installed pocketfl.compression parses it.
CANDIDATE_SEED_PIPELINES = (
    "sign",
    "topk:0.1,ternary",
    "qsgd:8",
    "qsgd:4:64",
    "fp16",
    "bf16",
    "randk:0.1",
    "randk:0.1,q:8",
    "thresh:0.01",
    "thresh:0.01,q:4:16",
    "lowrank:2",
    "lowrank:2,q:8",
    "q:4:nearest",
    "q:8,zstd",
    "topk:0.1,q:4,zstd",
    "topk:0.1,fp16",
    "topk:0.1,q:8;bias=none",
    "lowrank:2,q:8;vector=fp16;features.0.*=q:4:16",
)
SEED = 20240601


def seed_update(seed: int = SEED) -> dict[str, np.ndarray]:
    """Return a deterministic HAR-shaped update with mixed scales and one constant tensor."""
    rng = np.random.default_rng(seed)
    update = {}
    for position, (name, shape) in enumerate(HAR_SHAPES.items()):
        scale = 10.0 ** (position % 4 - 3)
        update[name] = (rng.standard_t(3, size=shape) * scale).astype(np.float32)
    update["classifier.bias"] = np.full(HAR_SHAPES["classifier.bias"], 0.25, dtype=np.float32)
    return update


def seed_pipelines() -> list[str]:
    """Return the seed pipelines, with the candidates that this checkout parses."""
    from pocketfl.compression import parse_compression_spec

    pipelines = list(SEED_PIPELINES)
    for candidate in CANDIDATE_SEED_PIPELINES:
        try:
            parse_compression_spec(candidate)
        except ValueError:
            continue
        pipelines.append(candidate)
    return pipelines


def seed_payloads() -> dict[str, bytes]:
    """Return one valid payload per seed pipeline, keyed by pipeline spec."""
    from pocketfl.compression import UpdateCodec

    update = seed_update()
    return {spec: UpdateCodec(spec).encode(update, seed=7) for spec in seed_pipelines()}


def fix_crc(data: bytes) -> bytes:
    """Replace the last 4 bytes with the CRC32 of the bytes before them."""
    if len(data) < 4:
        return data
    body = data[:-4]
    return body + zlib.crc32(body).to_bytes(4, "little")


def check_one(data: bytes, decode_update, decode_error: type, track_memory: bool) -> None:
    """Decode one input and check the harness's contract, raising AssertionError on a breach.

    With `track_memory`, the decode's peak traced allocation above what was
    allocated before it must stay below `MEMORY_BOUND_BYTES`. Tracing starts
    here unless the caller keeps tracemalloc running across inputs.
    """
    started_here = track_memory and not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    if track_memory:
        # Measured from the current level, so memory that other code keeps
        # between inputs does not count toward this decode.
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
    try:
        decoded = decode_update(data, HAR_SHAPES)
    except decode_error:
        return
    finally:
        if track_memory:
            _, peak = tracemalloc.get_traced_memory()
            if started_here:
                tracemalloc.stop()
            if peak - before > MEMORY_BOUND_BYTES:
                raise AssertionError(
                    f"decode of {len(data)} bytes allocated {peak - before} traced bytes at its "
                    f"peak, bound {MEMORY_BOUND_BYTES}"
                )

    # A payload that decodes must give the model back, finite and float32.
    if list(decoded) != list(HAR_SHAPES):
        raise AssertionError(f"decoded names {list(decoded)} differ from the expected names")
    for name, array in decoded.items():
        if array.shape != HAR_SHAPES[name] or array.dtype != np.float32:
            raise AssertionError(
                f"{name}: decoded as {array.dtype} {array.shape}, expected float32 {HAR_SHAPES[name]}"
            )
        if not np.isfinite(array).all():
            raise AssertionError(f"{name}: decoded values are not all finite")


def write_seed_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for spec, payload in seed_payloads().items():
        filename = spec.replace(":", "_").replace(",", "+") + ".bin"
        (folder / filename).write_bytes(payload)
        print(f"{folder / filename}: {len(payload)} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after the options are passed to libFuzzer (corpus folders, -flags).",
    )
    parser.add_argument("--mode", choices=("raw", "fix-crc"), default="raw")
    parser.add_argument(
        "--memory-every",
        type=int,
        default=16,
        help=(
            "check the memory bound on every Nth input (default 16). 1 keeps tracemalloc on "
            "throughout, about 7 times slower; 0 turns the check off"
        ),
    )
    parser.add_argument("--write-seed-corpus", type=Path, help="write the seed payloads here and exit")
    options, libfuzzer_args = parser.parse_known_args()

    if options.write_seed_corpus is not None:
        write_seed_corpus(options.write_seed_corpus)
        return

    import atheris

    with atheris.instrument_imports():
        from pocketfl.compression import DecodeError, decode_update

    # Decode once outside the fuzzer so that lazy imports and numpy's first
    # calls do not count toward the first traced input.
    for payload in seed_payloads().values():
        decode_update(payload, HAR_SHAPES)

    # Checking every input keeps tracing on throughout. Otherwise `check_one`
    # traces only the sampled inputs, and the others run at full speed.
    if options.memory_every == 1:
        tracemalloc.start()
    counter = 0

    def test_one_input(data: bytes) -> None:
        nonlocal counter
        counter += 1
        if options.mode == "fix-crc":
            data = fix_crc(data)
        track = options.memory_every > 0 and counter % options.memory_every == 0
        check_one(data, decode_update, DecodeError, track)

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
