"""Export a model to the phone runtimes, ExecuTorch (.pte) and ONNX, and run the files back.

Each export goes through `torch.export`. The ExecuTorch program is lowered to
XNNPACK, the optimized CPU backend on Android and iOS, so float and int8
(`quantization.quantize_int8`) graphs both run as XNNPACK kernels. The
runners load a file in its own runtime (ExecuTorch's Python runtime,
onnxruntime), so a check against the PyTorch outputs tests the file a phone
would load.
"""

import copy
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


class _Unsqueezed(nn.Module):
    """A model of 2-D layers fed with 1-D inputs `(batch, channels, length)` as `(batch, channels, 1, length)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the height axis and run the 2-D model."""
        return self.model(x.unsqueeze(2))


def as_conv2d(model: nn.Module, example_input: torch.Tensor, tolerance: float = 1e-5) -> nn.Module:
    """Return `model` with its 1-D convolutions and pools as 2-D ones of height 1, if outputs stay equal.

    XNNPACK has no 1-D convolution or pooling: ExecuTorch lowers each 1-D
    layer as a 2-D one between reshapes, and max pooling with indices falls
    outside the delegate. The graph then splits into several XNNPACK
    partitions, each with its own quantize steps and tensor metadata.
    Written in 2-D from the start, the whole model is one partition: the
    file gets smaller and faster. The rewrite only holds for models that
    flatten or otherwise do not depend on the number of axes, so it is
    checked on `example_input` and the original model is returned if the
    outputs differ by more than `tolerance` or the 2-D model fails.
    """
    rewritten = _Unsqueezed(_replace_1d_layers(copy.deepcopy(model))).eval()
    try:
        with torch.no_grad():
            matches = torch.allclose(rewritten(example_input), model(example_input), atol=tolerance, rtol=0)
    except RuntimeError:
        matches = False
    return rewritten if matches else model


def _replace_1d_layers(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv1d):
            replacement = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                (1, child.kernel_size[0]),
                stride=(1, child.stride[0]),
                padding=(0, child.padding[0]) if not isinstance(child.padding, str) else child.padding,
                dilation=(1, child.dilation[0]),
                groups=child.groups,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            )
            replacement.weight = nn.Parameter(child.weight.detach().unsqueeze(2).clone())
            if child.bias is not None:
                replacement.bias = nn.Parameter(child.bias.detach().clone())
        elif isinstance(child, nn.MaxPool1d) and not child.return_indices:
            replacement = nn.MaxPool2d(
                (1, _single(child.kernel_size)),
                stride=(1, _single(child.stride)),
                padding=(0, _single(child.padding)),
                dilation=(1, _single(child.dilation)),
                ceil_mode=child.ceil_mode,
            )
        elif isinstance(child, nn.AvgPool1d):
            replacement = nn.AvgPool2d(
                (1, _single(child.kernel_size)),
                stride=(1, _single(child.stride)),
                padding=(0, _single(child.padding)),
                ceil_mode=child.ceil_mode,
                count_include_pad=child.count_include_pad,
            )
        elif isinstance(child, nn.AdaptiveAvgPool1d):
            replacement = nn.AdaptiveAvgPool2d((1, _single(child.output_size)))
        else:
            replacement = _replace_1d_layers(child)
        setattr(module, name, replacement)
    return module


def _single(value) -> int:
    return value[0] if isinstance(value, tuple | list) else value
