"""A running weighted mean of model updates, one model's worth of memory."""

from collections.abc import Mapping

import numpy as np


class StreamingMean:
    """Weighted mean of updates added one at a time.

    Memory is one float64 sum per tensor, whatever the number of updates, so a
    server never keeps one decoded update per client. The sum is kept in
    float64 because thousands of float32 additions would lose the low bits of
    small updates.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Add `weight * update`; `update` must have exactly the tensors and shapes given at creation."""
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if update.keys() != self._sums.keys():
            raise ValueError(
                f"update tensors {sorted(update)} do not match the model's {sorted(self._sums)}"
            )

        for name, values in update.items():
            # The product is taken in float64: a float32 product of a large
            # weight and a large value overflows to inf before reaching the sum.
            self._sums[name] += np.multiply(values, weight, dtype=np.float64)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """Return the weighted mean as float32 arrays; raise ValueError if nothing was added."""
        if self.count == 0:
            raise ValueError("no update was added, so there is no mean")
        return {
            name: (values / self.total_weight).astype(np.float32) for name, values in self._sums.items()
        }
