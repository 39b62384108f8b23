"""Lines the operator sees in `flwr run --stream`: pocketfl's INFO log and the per-round decline summary."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from pocketfl.server import log_stream
from pocketfl.strategies import CompressedFedAvg


@pytest.fixture
def pocketfl_logger():
    logger = logging.getLogger(log_stream.POCKETFL_LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def _decline(node_id, reason):
    content = RecordDict({"declined": ConfigRecord({"reason": reason})})
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node_id), has_error=lambda: False)


def test_info_lines_reach_stderr_once(pocketfl_logger, capsys):
    log_stream.show_pocketfl_logs()
    log_stream.show_pocketfl_logs()

    logging.getLogger("pocketfl.server.federation").info("round %d: accuracy %.2f", 3, 0.5)
    logging.getLogger("pocketfl.server.federation").debug("hidden detail")

    err = capsys.readouterr().err
    assert err.count("round 3: accuracy 0.50") == 1
    assert "INFO" in err
    assert "hidden detail" not in err


def test_round_summarizes_declines_by_reason(pocketfl_logger, capsys):
    log_stream.show_pocketfl_logs()
    strategy = CompressedFedAvg()
    strategy._global = {"w": np.zeros(4, dtype=np.float32)}
    replies = [_decline(1, "metered-network"), _decline(2, "device-not-charging"), _decline(3, "device-not-charging")]

    strategy.aggregate_train(7, replies)

    err = capsys.readouterr().err
    assert "round 7: declines by reason: device-not-charging x2, metered-network x1" in err
