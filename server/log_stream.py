"""Show pocketfl's INFO lines in the log that `flwr run --stream` and `flwr log` follow.

Flower 1.42 attaches its console handler to the "flwr" logger only. In the
ServerApp process that `flwr run` starts, pocketfl's loggers would reach
Python's last-resort handler, which drops everything below WARNING, so round
summaries, decline counts and resume notices never reached the operator. The
SuperLink streams whatever the process writes to stdout and stderr.
"""

import logging
import sys

POCKETFL_LOGGER = "pocketfl"
LOG_FORMAT = "%(levelname)-8s: pocketfl: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Handler that writes to the current `sys.stderr`, whose output Flower mirrors into the run's log."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # noqa: D102 - the logging module reads this attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_pocketfl_logs(level: int = logging.INFO) -> None:
    """Print pocketfl's log lines of `level` and above to stderr. A second call adds no second handler."""
    logger = logging.getLogger(POCKETFL_LOGGER)
    if any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        return

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    # The root logger may have a handler too (`pocketfl simulate` adds one), so each line prints only here.
    logger.propagate = False
