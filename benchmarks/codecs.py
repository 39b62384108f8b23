"""Throughput and error of the update codecs on one core.

For each update size and each pipeline, measures encode and decode speed in
MB/s of float32 input (best of ``--repeats`` runs), payload bytes, bits per
parameter and the relative L2 error ``||decoded - x|| / ||x||``. A plain float32
copy measured in the same run gives the memory-bandwidth ceiling.

Two kinds of update, each one flat float32 tensor:

- ``har``: the HAR CNN (pocketfl.tasks.har) trains one local round (2 epochs,
  the main job's settings) on client 0, and the update is resampled from the
  empirical distribution of its delta ``local - global``: i.i.d. draws with
  replacement from its 32,230 values.
- ``t3``: synthetic heavy-tailed values, Student-t with 3 degrees of freedom,
  times 0.01.

Usage, from the repository root:

    POCKETFL_CACHE_DIR=/tmp/pfl-cache python benchmarks/codecs.py
    python benchmarks/codecs.py --sizes 1000000 --updates t3 --repeats 5
"""

import os

# One core: set before numpy or torch load their thread pools.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from pocketfl.compression import UpdateCodec, decode_update, parse_compression_spec  # noqa: E402
from pocketfl.compression import spec as spec_module  # noqa: E402

# Pipelines always measured. One line adds a pipeline.
PIPELINES = (
    "none",
    "q:8",
    "q:8:256",
    "q:4",
    "q:1",
    "topk:0.01",
    "topk:0.01:tensor",
    "topk:0.01,q:4",
    "topk:0.01,q:8",
    "topk:0.001,q:4",
)

# Pipelines of stages that may exist in this checkout or a later one. Each is
# measured when the installed pocketfl.compression parses it, and listed as
# skipped otherwise.
CANDIDATE_PIPELINES = (
    "fp16",
    "bf16",
    "sign",
    "qsgd:8",
    "qsgd:4",
    "randk:0.01",
    "thresh:0.001",
    "q:8,zstd",
    "topk:0.01,q:4,zstd",
    "topk:0.01,fp16",
)

SIZES = (1_000_000, 10_000_000)
UPDATES = ("har", "t3")
SEED = 0


def har_delta(cache_dir: str | None) -> np.ndarray:
    """Train the HAR CNN one local round on client 0 and return its flat delta."""
    import torch

    from pocketfl.tasks.har.federation import load_federation
    from pocketfl.tasks.har.model import build_model
    from pocketfl.tasks.har.training import train

    torch.set_num_threads(1)
    federation = load_federation(6, SEED, cache_dir)
    data = federation.client_arrays(0, 24)
    model = build_model(seed=SEED)
    start = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    train(model, data.x_train, data.y_train, epochs=2, learning_rate=0.05, batch_size=32, seed=SEED)
    return np.concatenate(
        [(tensor - start[name]).numpy().reshape(-1) for name, tensor in model.state_dict().items()]
    ).astype(np.float32)


def make_update(kind: str, size: int, delta: np.ndarray | None) -> np.ndarray:
    rng = np.random.default_rng([SEED, size])
    if kind == "har":
        return rng.choice(delta, size=size, replace=True).astype(np.float32)
    return (rng.standard_t(3, size=size) * 0.01).astype(np.float32)


def best_seconds(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def copy_mb_per_s(values: np.ndarray, repeats: int) -> float:
    target = np.empty_like(values)
    seconds, _ = best_seconds(lambda: np.copyto(target, values), repeats)
    return values.nbytes / seconds / 1e6


def measure(spec: str, values: np.ndarray, repeats: int) -> dict:
    codec = UpdateCodec(spec)
    update = {"update": values}
    shapes = {"update": values.shape}

    encode_s, payload = best_seconds(lambda: codec.encode(update, seed=SEED), repeats)
    decode_s, decoded = best_seconds(lambda: decode_update(payload, shapes), repeats)

    x = values.astype(np.float64)
    error = np.linalg.norm(decoded["update"].astype(np.float64) - x) / np.linalg.norm(x)
    return {
        "encode_mb_s": values.nbytes / encode_s / 1e6,
        "decode_mb_s": values.nbytes / decode_s / 1e6,
        "payload_bytes": len(payload),
        "bits_per_param": 8 * len(payload) / values.size,
        "relative_l2": float(error),
    }


def split_pipelines() -> tuple[list[str], list[tuple[str, str]]]:
    """Return the pipelines to measure and the (candidate, reason) pairs that are skipped."""
    pipelines, skipped = list(PIPELINES), []
    for candidate in CANDIDATE_PIPELINES:
        try:
            parse_compression_spec(candidate)
        except ValueError as error:
            # Keep the problem, not the grammar summary that follows it.
            problem = re.search(r"token .*?: (.*?)\. Known stages", str(error))
            skipped.append((candidate, problem.group(1) if problem else str(error)[:80]))
            continue
        if candidate not in pipelines:
            pipelines.append(candidate)
    return pipelines, skipped


def machine_lines() -> list[str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}",
        f"CPU: {model}, {os.cpu_count()} logical cores, 1 thread used",
        f"Python {platform.python_version()}, numpy {np.__version__}",
        f"OPENBLAS_CORETYPE: {os.environ.get('OPENBLAS_CORETYPE', 'unset')}",
        f"load average (1, 5, 15 min) at start: {load}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--updates", choices=UPDATES, nargs="+", default=list(UPDATES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement, best kept (>= 3)")
    parser.add_argument("--cache-dir", default=os.environ.get("POCKETFL_CACHE_DIR"))
    options = parser.parse_args()
    if options.repeats < 3:
        parser.error("--repeats must be at least 3")

    pipelines, skipped = split_pipelines()
    for line in machine_lines():
        print(f"- {line}")
    known = getattr(spec_module, "KNOWN_STAGES", ("unknown",))
    print(f"- known stages in pocketfl.compression: {', '.join(known)}")
    for candidate, reason in skipped:
        print(f"- skipped candidate {candidate!r}: does not parse ({reason})")

    delta = har_delta(options.cache_dir) if "har" in options.updates else None
    if delta is not None:
        print(f"- HAR delta: {delta.size} values, std {delta.std():.3g}, max |x| {np.abs(delta).max():.3g}")

    print()
    print("| update | params | pipeline | encode MB/s | decode MB/s | payload bytes | bits/param | rel. L2 error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in options.updates:
        for size in options.sizes:
            values = make_update(kind, size, delta)
            label = f"{size / 1e6:g}M"
            ceiling = copy_mb_per_s(values, options.repeats)
            print(f"| {kind} | {label} | float32 copy | {ceiling:,.0f} | {ceiling:,.0f} | | | |", flush=True)
            for spec in pipelines:
                row = measure(spec, values, options.repeats)
                print(
                    f"| {kind} | {label} | `{spec}` | {row['encode_mb_s']:,.0f} | {row['decode_mb_s']:,.0f} "
                    f"| {row['payload_bytes']:,} | {row['bits_per_param']:.3f} | {row['relative_l2']:.3g} |",
                    flush=True,
                )
    print(f"\n- load average at end: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    main()
