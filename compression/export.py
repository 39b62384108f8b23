"""Export a model to the phone runtimes, ExecuTorch (.pte) and ONNX, and run the files back.

Each export goes through `torch.export`. The ExecuTorch program is lowered to
XNNPACK, the optimized CPU backend on Android and iOS, so float and int8
(`quantization.quantize_int8`) graphs both run as XNNPACK kernels. The
runners load a file in its own runtime (ExecuTorch's Python runtime,
onnxruntime), so a check against the PyTorch outputs tests the file a phone
would load.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 20


def export_executorch(model: nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Write `model` as an ExecuTorch program lowered to XNNPACK, for one input of `example_input`'s shape.

    The program takes a fixed batch, the first dimension of `example_input`
    (1 for one window at a time, as an app classifies). Returns `path`.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    # The caller sets eval mode: a quantized graph module refuses `.eval()`.
    program = torch.export.export(model, (example_input,))
    executorch_program = to_edge_transform_and_lower(
        program, partitioner=[XnnpackPartitioner()]
    ).to_executorch()

    path = Path(path)
    path.write_bytes(executorch_program.buffer)
    return path


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Write `model` as ONNX (opset 20) with a dynamic batch dimension.

    int8 graphs from `quantization.quantize_int8` become QuantizeLinear /
    DequantizeLinear pairs around float operators with int8 weight
    initializers, the QDQ form that onnxruntime fuses into int8 kernels.
    Source locations and other metadata the exporter attaches to each node
    are dropped: they would double a small model's file. Returns `path`.
    """
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    onnx_program = torch.onnx.export(
        model,
        (example_input,),
        dynamo=True,
        dynamic_shapes=({0: batch},),
        opset_version=ONNX_OPSET,
        verbose=False,
    )
    proto = onnx_program.model_proto
    for node in proto.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    del proto.graph.value_info[:]
    del proto.metadata_props[:]
    onnx.checker.check_model(proto)

    path = Path(path)
    path.write_bytes(proto.SerializeToString())
    return path


def run_executorch(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run the ExecuTorch program at `path` on `inputs`, one program-sized batch at a time.

    `inputs` must hold a multiple of the program's batch; for a batch-1
    program that is any number of windows. Returns the stacked outputs.
    """
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    batch = method.metadata.input_tensor_meta(0).sizes()[0]
    if len(inputs) % batch:
        raise ValueError(f"{len(inputs)} inputs do not split into batches of {batch}, the program's batch")

    outputs = [
        method.execute([torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch]))])[0].numpy()
        for start in range(0, len(inputs), batch)
    ]
    return np.concatenate(outputs)


def run_onnx(path: Path, inputs: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Run the ONNX model at `path` on `inputs` with onnxruntime's CPU provider."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {name: np.ascontiguousarray(inputs[start : start + batch_size])})[0]
        for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs)


class Standardized(nn.Module):
    """`model` behind a fixed standardization `(x - mean) / std`, so an app feeds raw sensor values.

    `mean` and `std` broadcast against the input, for example shape
    (1, channels, 1) for per-channel statistics.
    """

    def __init__(self, model: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", 1.0 / torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardize `x` and return the model's outputs."""
        return self.model((x - self.mean) * self.scale)


def measure_latency(run_one, window: np.ndarray, repeats: int = 200) -> float:
    """Median wall time of `run_one(window)` in milliseconds, after 10 warm-up calls."""
    import time

    for _ in range(10):
        run_one(window)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_one(window)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def executorch_runner(path: Path):
    """Return a function that runs one input through the ExecuTorch program at `path`."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return lambda inputs: method.execute([torch.from_numpy(inputs)])[0]


def onnx_runner(path: Path):
    """Return a function that runs one input through the ONNX model at `path` with onnxruntime."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda inputs: session.run(None, {name: inputs})[0]
