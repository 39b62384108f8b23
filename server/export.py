"""`pocketfl export`: from a run's final model to the files a phone app loads (.pte, .onnx).

The final model is narrowed (channels that pruning zeroed are removed) and
written four ways: float32 and int8 (post-training quantization calibrated
on training windows), each as an ExecuTorch program and as ONNX. Every file
is loaded back in its own runtime and measured on the held-out people. For
HAR, model_input.json gives an app the statistics that standardize a raw
window and the class names.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard

from pocketfl.compression.export import (
    as_conv2d,
    executorch_runner,
    export_executorch,
    export_onnx,
    measure_latency,
    onnx_runner,
    run_executorch,
    run_onnx,
)
from pocketfl.compression.quantization import quantize_int8
from pocketfl.compression.structured import shrink_channels
from pocketfl.tasks.base import BUILTIN_TASK, Task, resolve_task
from pocketfl.tasks.har.data import (
    ACTIVITY_NAMES,
    CHANNEL_NAMES,
    NUM_CHANNELS,
    SAMPLE_RATE_HZ,
    WINDOW_SIZE,
    load_har_windows,
)
from pocketfl.tasks.har.partition import split_people

from .config import ensure_writable_folder, load_run_config
from .federation import MODEL_FILE
from .report import REPORT_FILE, read_report

logger = logging.getLogger(__name__)

# Training windows used to calibrate int8 activation ranges.
CALIBRATION_WINDOWS = 512

# File with the input standardization and class names an app needs (HAR only).
INPUT_SPEC_FILE = "model_input.json"


@dataclass(frozen=True)
class ExportedFile:
    """One exported file, measured in its own runtime on the held-out people."""

    name: str
    runtime: str
    precision: str
    parameters: int
    bytes: int
    # The file compressed with zstd (level 19): what a sparse model costs to
    # download. The runtime loads the decompressed file.
    zstd_bytes: int
    sparsity: float
    accuracy: float
    pytorch_accuracy: float
    max_abs_difference: float
    # Share of held-out windows whose predicted class equals PyTorch's.
    agreement: float
    latency_ms: float


@dataclass(frozen=True)
class _Inputs:
    x_held_out: np.ndarray
    y_held_out: np.ndarray
    calibration: np.ndarray


def _load_final_model(model: torch.nn.Module, path: Path, task_name: str) -> None:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # torch.load raises many types on a damaged file
        raise ValueError(
            f"{path} is not a readable model ({type(error).__name__}); the file may be truncated "
            "or corrupt, so rerun the simulation"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first_line = str(error).splitlines()[0]
        raise ValueError(
            f"{path} does not fit the model of task '{task_name}' named in the run's report "
            f"({first_line})"
        ) from None


def export_run(run_dir: Path, output_dir: Path | None = None, cache_dir: Path | None = None) -> list[ExportedFile]:
    """Export the final model of the run in `run_dir` and measure each file.

    Files go to `output_dir` (default `run_dir`): model_float32.pte,
    model_float32.onnx, model_int8.pte and model_int8.onnx. Raises
    ValueError if the run folder lacks its report or final model.
    """
    run_dir = Path(run_dir)
    output_dir = Path(output_dir or run_dir)
    if not run_dir.is_dir():
        raise ValueError(
            f"{run_dir} is not a folder; pass the folder of a finished run, such as runs/har-default"
        )
    for required in (REPORT_FILE, MODEL_FILE):
        if not (run_dir / required).exists():
            raise ValueError(
                f"{run_dir} has no {required}; pass the folder of a finished run, such as runs/har-default"
            )
    ensure_writable_folder(output_dir, "--output-dir")

    try:
        report = read_report(run_dir / REPORT_FILE)
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0]
        raise ValueError(
            f"{run_dir / REPORT_FILE} is not a pocketfl report ({first_line}); rerun the simulation"
        ) from None
    config = load_run_config(report.config)
    if cache_dir is not None:
        config = config.model_copy(update={"cache_dir": cache_dir})
    task = resolve_task(config.task)(config.task_settings)
    inputs = _task_inputs(task, config.seed)
    if config.task == BUILTIN_TASK:
        spec = _har_input_spec(config.held_out_people, config.seed, config.cache_dir)
        (output_dir / INPUT_SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")

    model = task.build_model()
    _load_final_model(model, run_dir / MODEL_FILE, config.task)
    dense_parameters = sum(parameter.numel() for parameter in model.parameters())
    narrow = shrink_channels(model, task.channel_chain()) if task.channel_chain() else model
    example = torch.from_numpy(inputs.x_held_out[:2])
    narrow = as_conv2d(narrow.eval(), example).eval()

    calibration = torch.from_numpy(inputs.calibration).split(128)
    variants = {
        "float32": narrow,
        "int8": quantize_int8(narrow, example, calibration),
    }

    exported = []
    for precision, variant in variants.items():
        expected = _logits(variant, inputs.x_held_out)
        pytorch_accuracy = float((expected.argmax(1) == inputs.y_held_out).mean())
        nonzero = sum(int((values != 0).sum()) for values in _weights(narrow))

        for runtime in ("executorch", "onnx"):
            if runtime == "executorch":
                path = export_executorch(variant, example[:1], output_dir / f"model_{precision}.pte")
                outputs = run_executorch(path, inputs.x_held_out)
                runner = executorch_runner(path)
            else:
                path = export_onnx(variant, example, output_dir / f"model_{precision}.onnx")
                outputs = run_onnx(path, inputs.x_held_out)
                runner = onnx_runner(path)

            exported.append(
                ExportedFile(
                    name=path.name,
                    runtime=runtime,
                    precision=precision,
                    parameters=sum(values.size for values in _weights(narrow)),
                    bytes=path.stat().st_size,
                    zstd_bytes=len(zstandard.ZstdCompressor(level=19).compress(path.read_bytes())),
                    sparsity=1.0 - nonzero / dense_parameters,
                    accuracy=float((outputs.argmax(1) == inputs.y_held_out).mean()),
                    pytorch_accuracy=pytorch_accuracy,
                    max_abs_difference=float(np.abs(outputs - expected).max()),
                    agreement=float((outputs.argmax(1) == expected.argmax(1)).mean()),
                    latency_ms=measure_latency(runner, inputs.x_held_out[:1]),
                )
            )
            logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return exported


def _har_input_spec(held_out_people: int, seed: int, cache_dir: Path | None) -> dict:
    """Describe the HAR model's input and output for an app: window, channels, standardization, classes.

    The statistics are those of the training people, as in training (see
    `tasks.har.federation.load_federation`). An app standardizes each channel
    of a raw window with them before calling the model. Keeping this step out
    of the graph keeps it out of the int8 quantization too.
    """
    windows = load_har_windows(cache_dir)
    split = split_people(windows.person, held_out_people, seed)
    train_rows = np.isin(windows.person, split.train_people)
    mean = windows.x[train_rows].mean(axis=(0, 2))
    std = windows.x[train_rows].std(axis=(0, 2)) + 1e-6
    return {
        "input_shape": ["batch", NUM_CHANNELS, WINDOW_SIZE],
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "channels": list(CHANNEL_NAMES),
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
        "standardize": "x[c, t] = (raw[c, t] - mean[c]) / std[c]",
        "classes": list(ACTIVITY_NAMES),
    }


def _task_inputs(task: Task, seed: int) -> _Inputs:
    # Inputs as the task prepares them for training (for HAR: standardized).
    x_held_out, y_held_out = task.central_data()
    x_train = task.load_partition(0, 1).x_train
    rows = np.random.default_rng(seed).permutation(len(x_train))[:CALIBRATION_WINDOWS]
    return _Inputs(x_held_out, y_held_out, np.ascontiguousarray(x_train[np.sort(rows)]))


@torch.no_grad()
def _logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return np.concatenate([model(batch).numpy() for batch in torch.from_numpy(x).split(512)])


def _weights(model: torch.nn.Module) -> list[np.ndarray]:
    return [parameter.detach().numpy() for parameter in model.parameters()]
