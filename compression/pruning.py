"""Pruning masks: magnitude and channel pruning, the sparsity schedule, compact updates.

A mask maps a tensor name to a boolean array of the tensor's shape, True where
the entry is kept. Tensors without a mask are dense. The server decides the
mask from the aggregated model, sends it with the round, and every side
applies the same mask: clients train under it, the uplink carries only the
kept entries (of the tensors that `masked_updates` compacts), and the
aggregate keeps pruned entries at zero.

Mask math uses `torch.nn.utils.prune` (L1 magnitude for unstructured pruning,
L2 norm of output channels for structured pruning) on the server's arrays, and
`prune.custom_from_mask` during local training.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from .bitpack import pack_codes, packed_size, unpack_codes

Mask = dict[str, np.ndarray]

# Kinds of pruning the run config accepts.
PRUNING_KINDS = ("none", "global", "layer", "channel")


def scheduled_sparsity(server_round: int, target: float, end_round: int) -> float:
    """Return the sparsity to reach by `server_round` under a cubic schedule.

    Sparsity rises from 0 before round 1 to `target` at `end_round` and stays
    there: `target * (1 - (1 - round / end_round) ** 3)`. It rises fast at
    first and slowly near the target, so the last pruning steps remove little
    and later rounds recover the accuracy they cost.
    """
    if end_round < 1:
        raise ValueError(f"invalid end_round {end_round}: use a round of 1 or more")
    progress = min(max(server_round / end_round, 0.0), 1.0)
    return target * (1.0 - (1.0 - progress) ** 3)


def prunable_weights(shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """Return the names of the tensors that unstructured pruning applies to: weights of 2 or more dimensions.

    Biases and other vectors are a small share of a model and cost accuracy
    out of proportion when pruned, so they stay dense.
    """
    return [name for name, shape in shapes.items() if len(shape) >= 2]


def magnitude_mask(
    weights: Mapping[str, np.ndarray], sparsity: float, scope: str = "global"
) -> Mask:
    """Mask the smallest-magnitude share `sparsity` of the prunable weights.

    scope "global" ranks all prunable weights together, so layers with many
    small weights lose more; "layer" prunes each tensor by the same share.
    Entries already at zero are the smallest, so a mask applied to the model
    it came from is kept by the next, larger sparsity.
    """
    _check_sparsity(sparsity)
    names = prunable_weights({name: values.shape for name, values in weights.items()})
    tensors = {name: torch.from_numpy(np.asarray(weights[name], dtype=np.float32)) for name in names}

    if scope == "layer":
        return {
            name: _l1_mask(tensor, sparsity).numpy().astype(bool) for name, tensor in tensors.items()
        }
    if scope != "global":
        raise ValueError(f"unknown pruning scope {scope!r}; use 'global' or 'layer'")

    # The same L1 ranking that prune.global_unstructured applies to modules.
    flat = torch.cat([tensor.flatten() for tensor in tensors.values()]) if tensors else torch.empty(0)
    kept = _l1_mask(flat, sparsity).numpy().astype(bool)
    mask, start = {}, 0
    for name, tensor in tensors.items():
        mask[name] = kept[start : start + tensor.numel()].reshape(tensor.shape)
        start += tensor.numel()
    return mask


def channel_mask(
    weights: Mapping[str, np.ndarray], chain: Sequence[str], sparsity: float
) -> Mask:
    """Mask whole output channels of each layer in `chain` but the last, by L2 norm.

    `chain` names modules (Conv or Linear) in order, where the output channels
    of one are the input channels of the next and only channel-wise layers
    (ReLU, pooling) sit between them. Removing output channel c of layer i
    masks row c of its weight, entry c of its bias and input column c of layer
    i+1. The model then computes exactly what the narrower model of
    `structured.shrink_channels` computes. Every hidden layer loses the same share of
    channels, the smallest share whose masked entries reach `sparsity` of the
    chain's parameters. At least one channel per layer stays.
    """
    _check_sparsity(sparsity)
    if len(chain) < 2:
        raise ValueError(f"channel pruning needs a chain of at least two layers, got {list(chain)}")
    for layer in chain:
        if f"{layer}.weight" not in weights:
            raise ValueError(f"layer {layer!r} of the channel chain has no tensor '{layer}.weight'")

    total = sum(weights[name].size for name in _chain_tensors(weights, chain))
    for share in np.linspace(0.0, 1.0, 257):
        mask = _channel_mask_with_share(weights, chain, float(share))
        pruned = sum(int((~kept).sum()) for kept in mask.values())
        if pruned >= sparsity * total:
            return mask
    return mask


def mask_sparsity(mask: Mask) -> float:
    """Return the share of masked-out entries among the masked tensors (0 for an empty mask)."""
    total = sum(kept.size for kept in mask.values())
    return 1.0 - sum(int(kept.sum()) for kept in mask.values()) / total if total else 0.0


def model_sparsity(tensors: Mapping[str, np.ndarray]) -> float:
    """Return the share of exact zeros among all entries of `tensors`."""
    total = sum(np.asarray(values).size for values in tensors.values())
    zeros = sum(int((np.asarray(values) == 0).sum()) for values in tensors.values())
    return zeros / total if total else 0.0


def apply_mask(tensors: Mapping[str, np.ndarray], mask: Mask) -> dict[str, np.ndarray]:
    """Return a copy of `tensors` with masked-out entries set to zero."""
    return {
        name: np.where(mask[name], values, 0).astype(values.dtype) if name in mask else values.copy()
        for name, values in tensors.items()
    }


def compact(tensors: Mapping[str, np.ndarray], mask: Mask) -> dict[str, np.ndarray]:
    """Keep only the kept entries of each masked tensor, as a 1-D array in C order.

    Both sides know the mask, so the positions need not travel: `expand`
    restores them. Unmasked tensors pass through unchanged.
    """
    return {
        name: np.ascontiguousarray(values[mask[name]]) if name in mask else values
        for name, values in tensors.items()
    }


def compact_shapes(shapes: Mapping[str, Sequence[int]], mask: Mask) -> dict[str, tuple[int, ...]]:
    """Return the shapes that `compact` gives for tensors of `shapes`."""
    return {
        name: (int(mask[name].sum()),) if name in mask else tuple(shape) for name, shape in shapes.items()
    }


def expand(
    compacted: Mapping[str, np.ndarray], mask: Mask, shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Invert `compact`: scatter the kept entries back and fill masked-out entries with zero."""
    full = {}
    for name, shape in shapes.items():
        values = compacted[name]
        if name not in mask:
            full[name] = values
            continue
        tensor = np.zeros(tuple(shape), dtype=values.dtype)
        tensor[mask[name]] = values
        full[name] = tensor
    return full


def pack_mask(mask: Mask) -> tuple[list[str], list[bytes]]:
    """Return (names, bit-packed masks): one bit per entry in C order, 1 = kept."""
    names = list(mask)
    blobs = [pack_codes(mask[name].reshape(-1).astype(np.uint8), 1) for name in names]
    return names, blobs


def unpack_mask(
    names: Sequence[str], blobs: Sequence[bytes], shapes: Mapping[str, Sequence[int]]
) -> Mask:
    """Rebuild a mask from `pack_mask` output for a model of `shapes`, or raise ValueError."""
    if len(names) != len(blobs):
        raise ValueError(f"mask has {len(names)} tensor names but {len(blobs)} bit fields")

    mask = {}
    for name, blob in zip(names, blobs):
        if name not in shapes:
            raise ValueError(f"mask names tensor {name!r}, which the model does not have")
        count = math.prod(shapes[name])
        if len(blob) != packed_size(count, 1):
            raise ValueError(
                f"mask of {name!r} has {len(blob)} bytes; {count} entries need {packed_size(count, 1)}"
            )
        bits = unpack_codes(np.frombuffer(blob, dtype=np.uint8), count, 1)
        mask[name] = bits.astype(bool).reshape(tuple(shapes[name]))
    return mask


@contextmanager
def masked_training(model: nn.Module, mask: Mask) -> Iterator[nn.Module]:
    """Train `model` under `mask`: masked-out entries stay zero and get no gradient.

    Inside the block each masked parameter is reparametrized by
    `prune.custom_from_mask` as `orig * mask`, so an unchanged training loop
    cannot move a pruned entry. On exit `prune.remove` makes the masked
    products plain parameters again, so the state dict has its usual keys.
    """
    modules = dict(model.named_modules())
    pruned = []
    for name, kept in mask.items():
        module_name, _, attribute = name.rpartition(".")
        module = modules.get(module_name)
        if module is None or not isinstance(getattr(module, attribute, None), nn.Parameter):
            raise ValueError(f"mask names {name!r}, which is not a parameter of the model")
        prune.custom_from_mask(module, attribute, torch.from_numpy(kept.astype(np.float32)))
        pruned.append((module, attribute))
    try:
        yield model
    finally:
        for module, attribute in pruned:
            prune.remove(module, attribute)


def _l1_mask(tensor: torch.Tensor, sparsity: float) -> torch.Tensor:
    amount = round(sparsity * tensor.numel())
    return prune.L1Unstructured(amount=amount).compute_mask(tensor, torch.ones_like(tensor))


def _chain_tensors(weights: Mapping[str, np.ndarray], chain: Sequence[str]) -> list[str]:
    names = []
    for layer in chain:
        names.append(f"{layer}.weight")
        if f"{layer}.bias" in weights:
            names.append(f"{layer}.bias")
    return names


def _channel_mask_with_share(
    weights: Mapping[str, np.ndarray], chain: Sequence[str], share: float
) -> Mask:
    mask = {name: np.ones(weights[name].shape, dtype=bool) for name in _chain_tensors(weights, chain)}
    for layer, following in zip(chain[:-1], chain[1:]):
        weight = torch.from_numpy(np.asarray(weights[f"{layer}.weight"], dtype=np.float32))
        channels = weight.shape[0]
        # One channel always stays, or the next layer would see no input.
        amount = min(round(share * channels), channels - 1)
        kept_rows = prune.LnStructured(amount=amount, n=2, dim=0).compute_mask(
            weight, torch.ones_like(weight)
        )
        kept = kept_rows.reshape(channels, -1)[:, 0].numpy().astype(bool)

        mask[f"{layer}.weight"] &= kept.reshape((channels,) + (1,) * (weight.dim() - 1))
        if f"{layer}.bias" in mask:
            mask[f"{layer}.bias"] &= kept
        following_shape = mask[f"{following}.weight"].shape
        mask[f"{following}.weight"] &= kept.reshape((1, channels) + (1,) * (len(following_shape) - 2))
    return mask


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"invalid sparsity {sparsity}: use a value from 0 up to, but not including, 1")


# Fields of the mask as it travels in a train message (a Flower ConfigRecord
# on the wire); both sides import these names.
MASK_RECORD = "pruning-mask"
MASK_TENSORS = "tensors"
MASK_BITS = "bits"
MASK_SPARSITY = "sparsity"


def mask_fields(mask: Mask) -> dict[str, list[str] | list[bytes] | float]:
    """Return the mask as plain record fields: tensor names, bit-packed masks, sparsity."""
    names, blobs = pack_mask(mask)
    return {MASK_TENSORS: names, MASK_BITS: blobs, MASK_SPARSITY: mask_sparsity(mask)}


def mask_from_fields(fields: Mapping, shapes: Mapping[str, Sequence[int]]) -> Mask:
    """Rebuild the mask from `mask_fields` output, or raise ValueError naming what is wrong."""
    names, blobs = fields.get(MASK_TENSORS), fields.get(MASK_BITS)
    if not isinstance(names, list) or not isinstance(blobs, list):
        raise ValueError(f"mask record needs lists '{MASK_TENSORS}' and '{MASK_BITS}'")
    if not all(isinstance(blob, bytes) for blob in blobs):
        raise ValueError(f"mask record field '{MASK_BITS}' must hold bytes")
    return unpack_mask([str(name) for name in names], blobs, shapes)


def decide_mask(
    weights: Mapping[str, np.ndarray], kind: str, sparsity: float, chain: Sequence[str] = ()
) -> Mask:
    """Return the mask of `kind` ("global", "layer" or "channel") at `sparsity` for the model `weights`."""
    if kind in ("global", "layer"):
        return magnitude_mask(weights, sparsity, scope=kind)
    if kind == "channel":
        return channel_mask(weights, chain, sparsity)
    raise ValueError(f"unknown pruning kind {kind!r}; use one of {', '.join(PRUNING_KINDS)}")
