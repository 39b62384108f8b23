"""Remove pruned channels for real: a narrower dense model from a channel-pruned one."""

import copy
from collections.abc import Sequence

import torch
from torch import nn

_RESIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def shrink_channels(model: nn.Module, chain: Sequence[str]) -> nn.Module:
    """Return a copy of `model` without the all-zero output channels of each layer in `chain`.

    `chain` is the one that `pruning.channel_mask` pruned: Conv or Linear
    modules in order, the output channels of one feeding the next through
    channel-wise layers only. An output channel whose weights and bias are all
    zero outputs a constant zero, and ReLU and pooling keep it zero. Dropping
    it and the next layer's matching input column leaves the outputs
    unchanged, and the model gets smaller: fewer bytes, fewer multiply-adds.
    The last layer of the chain keeps all of its outputs.
    """
    narrow = copy.deepcopy(model)
    modules = dict(narrow.named_modules())
    layers = []
    for name in chain:
        module = modules.get(name)
        if not isinstance(module, _RESIZABLE):
            raise ValueError(f"layer {name!r} of the channel chain is not a Conv or Linear module")
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups != 1:
            raise ValueError(f"layer {name!r} is a grouped convolution, which channel removal does not support")
        layers.append(module)

    kept_inputs = None
    for index, (name, layer) in enumerate(zip(chain, layers)):
        kept_outputs = _live_outputs(layer) if index < len(layers) - 1 else None
        _set_module(narrow, name, _resized(layer, kept_inputs, kept_outputs))
        kept_inputs = kept_outputs
    return narrow


def _live_outputs(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach()
    live = weight.reshape(weight.shape[0], -1).abs().sum(dim=1) > 0
    if layer.bias is not None:
        live |= layer.bias.detach() != 0
    # One channel always stays so that the next layer has an input.
    if not live.any():
        live[0] = True
    return live.nonzero().flatten()


def _resized(
    layer: nn.Module, kept_inputs: torch.Tensor | None, kept_outputs: torch.Tensor | None
) -> nn.Module:
    weight = layer.weight.detach()
    if kept_outputs is not None:
        weight = weight.index_select(0, kept_outputs)
    if kept_inputs is not None:
        weight = weight.index_select(1, kept_inputs)
    bias = layer.bias.detach() if layer.bias is not None else None
    if bias is not None and kept_outputs is not None:
        bias = bias.index_select(0, kept_outputs)

    resized = copy.deepcopy(layer)
    resized.weight = nn.Parameter(weight.clone())
    if bias is not None:
        resized.bias = nn.Parameter(bias.clone())
    if isinstance(resized, nn.Linear):
        resized.out_features, resized.in_features = weight.shape
    else:
        resized.out_channels, resized.in_channels = weight.shape[:2]
    return resized


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
