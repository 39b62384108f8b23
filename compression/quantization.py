"""int8 quantization: fake-quant training (QAT) on clients, post-training quantization of the final model.

Both target the same arithmetic, that of XNNPACK, the CPU backend that
ExecuTorch and onnxruntime use on phones: int8 weights with one symmetric scale
per output channel, and int8 activations with one affine scale per tensor.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from torch.nn.utils import prune

_QUANTIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _weight_fake_quant() -> FakeQuantize:
    # Symmetric int8 in [-127, 127] per output channel, as XNNPACK stores weights.
    return FakeQuantize(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-127,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )


def _activation_fake_quant() -> FakeQuantize:
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_affine,
    )


@contextmanager
def fake_quant_training(model: nn.Module) -> Iterator[nn.Module]:
    """Quantization-aware training: inside the block, layers see int8-rounded weights and inputs.

    Each Conv and Linear layer rounds its weight per output channel and its
    input per tensor to the int8 grid (torch.ao FakeQuantize, with the
    straight-through estimator for gradients), so local SGD learns weights
    that survive the int8 conversion at export. The float weights stay the
    trained values: on exit the hooks are removed and the state dict has its
    usual keys and float32 values, ready for the uplink codec.

    Works inside `pruning.masked_training`: the fake quantization applies to
    the masked weight. Observers start fresh each call, as on a phone that
    gets a new model every round. Costs one extra weight copy per layer and
    about a third more training time.
    """
    hooks = []
    reparametrized = []
    for module in model.modules():
        if not isinstance(module, _QUANTIZED_LAYERS):
            continue
        # prune's reparametrization makes `weight` a plain attribute that a
        # forward pre-hook may replace; a mask of ones changes nothing.
        if not hasattr(module, "weight_orig"):
            prune.identity(module, "weight")
            reparametrized.append(module)
        hooks.append(module.register_forward_pre_hook(_FakeQuantHook()))
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for module in reparametrized:
            prune.remove(module, "weight")


class _FakeQuantHook:
    """Forward pre-hook: replace the layer's weight and input by their fake-quantized values."""

    def __init__(self) -> None:
        self.weight = _weight_fake_quant()
        self.activation = _activation_fake_quant()

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.weight.train(module.training)
        self.activation.train(module.training)
        module.weight = self.weight(module.weight)
        return (self.activation(inputs[0]),) + tuple(inputs[1:])


def quantize_int8(
    model: nn.Module, example_input: torch.Tensor, calibration: Iterable[torch.Tensor]
) -> torch.fx.GraphModule:
    """Post-training int8 quantization for XNNPACK with PT2E, calibrated on `calibration` batches.

    Returns the converted graph module: it runs in PyTorch with int8 weights
    and quantize/dequantize steps around each layer (the reference form of
    the int8 model), and `export.export_executorch` and `export.export_onnx`
    turn it into XNNPACK int8 kernels and ONNX QDQ nodes. A few hundred
    windows from training data are enough calibration for the activation
    ranges. `example_input` needs a batch of at least 2 so that the batch
    stays dynamic.
    """
    # PT2E lives in torchao now; torch.ao.quantization keeps only eager mode.
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = model.eval()
    captured = torch.export.export(
        model, (example_input,), dynamic_shapes=_dynamic_batch(example_input)
    ).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return move_exported_model_to_eval(convert_pt2e(prepared))


def _dynamic_batch(example_input: torch.Tensor) -> tuple[dict[int, torch.export.Dim]]:
    if example_input.shape[0] < 2:
        raise ValueError(
            f"example_input has batch {example_input.shape[0]}; use a batch of at least 2, "
            "or torch.export fixes the batch size to it"
        )
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)
