"""Local training under the server's pruning mask and, optionally, int8 fake quantization."""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

from flwr.app import RecordDict
from torch import nn

from pocketfl.compression.pruning import MASK_RECORD, Mask, mask_from_fields, masked_training
from pocketfl.compression.quantization import fake_quant_training


def read_mask(content: RecordDict, shapes: Mapping[str, Sequence[int]]) -> Mask:
    """Return the round's pruning mask from a train message, or an empty mask if it carries none.

    Raises ValueError if the mask does not fit the model.
    """
    if MASK_RECORD not in content.config_records:
        return {}
    return mask_from_fields(dict(content.config_records[MASK_RECORD]), shapes)


@contextmanager
def compressed_training(model: nn.Module, mask: Mask, qat: bool) -> Iterator[nn.Module]:
    """Train `model` inside the block under `mask` and, with `qat`, with int8 fake quantization.

    The task's training loop runs unchanged inside; on exit the model has
    plain float parameters with masked entries at zero.
    """
    with ExitStack() as stack:
        if mask:
            stack.enter_context(masked_training(model, mask))
        if qat:
            stack.enter_context(fake_quant_training(model))
        yield model
