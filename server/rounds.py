"""Round numbering for runs that continue from a checkpoint.

Flower 1.42's `Strategy.start` always counts rounds from 1. A run resumed
after round k wraps its strategy in `ContinuedRounds`, which shifts every
round number by k on the way in, so the strategy, the clients and the report
see rounds k+1, k+2, ... as an uninterrupted run would.
"""

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class ContinuedRounds(Strategy):
    """Run `strategy` for rounds `completed_rounds + 1` onwards, and keep each round's client metrics.

    Parameters
    ----------
    strategy : Strategy
        The strategy that does the work; it receives the shifted round numbers.
    completed_rounds : int, default 0
        Rounds finished before this process started; 0 for a fresh run.
    """

    def __init__(self, strategy: Strategy, completed_rounds: int = 0) -> None:
        if completed_rounds < 0:
            raise ValueError(f"invalid completed_rounds {completed_rounds}: must be >= 0")
        self.strategy = strategy
        self.completed_rounds = completed_rounds
        # Federated evaluation of a round ends before its central evaluation,
        # so the central evaluation callback can read this round's entry.
        self.client_evaluate_metrics: dict[int, MetricRecord] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure training of the shifted round."""
        return self.strategy.configure_train(self._shift(server_round), arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate training replies of the shifted round."""
        return self.strategy.aggregate_train(self._shift(server_round), replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure federated evaluation of the shifted round."""
        return self.strategy.configure_evaluate(self._shift(server_round), arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate evaluation replies of the shifted round and keep the result."""
        shifted = self._shift(server_round)
        metrics = self.strategy.aggregate_evaluate(shifted, replies)
        if metrics is not None:
            self.client_evaluate_metrics[shifted] = metrics
        return metrics

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def wrap_evaluate_fn(self, evaluate_fn: EvaluateFn) -> EvaluateFn:
        """Return `evaluate_fn` taking shifted round numbers.

        `Strategy.start` evaluates the initial model as round 0. After a
        resume that model is the checkpoint's, already evaluated as round
        `completed_rounds`, so that call is skipped.
        """

        def shifted_evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and self.completed_rounds > 0:
                return None
            return evaluate_fn(self._shift(server_round), arrays)

        return shifted_evaluate_fn

    def _shift(self, server_round: int) -> int:
        return server_round + self.completed_rounds if server_round > 0 else 0
