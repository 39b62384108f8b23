"""Continue a run from its checkpoint after the server process died."""

import logging
from typing import Any

from pocketfl.strategies import CompressedFedAvg

from .checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    model_digest,
    remove_checkpoint,
    restore_rng_state,
)
from .config import RunConfig
from .report import Report, ResumeRecord

logger = logging.getLogger(__name__)

# Settings that may differ between a run and its restart: more rounds, where
# files are, how long to wait. Everything else changes what the rounds compute.
RESUMABLE_CHANGES = {"num-server-rounds", "resume", "round-timeout", "output-dir", "cache-dir"}


def prepare_resume(config: RunConfig, strategy: CompressedFedAvg) -> tuple[Checkpoint, Report] | None:
    """Load the run folder's checkpoint and restore the strategy and RNG states from it.

    Returns the checkpoint and its report (with this restart recorded), or
    None for a fresh run: `resume` is off, which also deletes any old
    checkpoint, or there is no checkpoint yet.

    Raises
    ------
    ValueError
        If the checkpoint was written under other settings or has more rounds
        than `num_server_rounds`.
    CheckpointError
        If the checkpoint file cannot be read.
    """
    if not config.resume:
        remove_checkpoint(config.run_dir)
        return None

    checkpoint = load_checkpoint(config.run_dir)
    if checkpoint is None:
        logger.info("no checkpoint in %s, so the run starts at round 1", config.run_dir)
        return None

    _check_same_settings(config, checkpoint.report.get("config", {}))
    if checkpoint.completed_rounds > config.num_server_rounds:
        raise ValueError(
            f"invalid value {config.num_server_rounds} for num-server-rounds: the checkpoint in "
            f"{config.run_dir} has {checkpoint.completed_rounds} rounds already; "
            f"use at least {checkpoint.completed_rounds}"
        )

    strategy.restore_state(checkpoint.strategy_state)
    if checkpoint.rng_state:
        restore_rng_state(checkpoint.rng_state)

    report = Report.model_validate(checkpoint.report)
    report.config = config.model_dump(mode="json", by_alias=True)
    # Rounds after the checkpoint may have reached report.json before the
    # crash; the checkpoint's report ends at its round, so each round appears once.
    report.rounds = [record for record in report.rounds if record.round <= checkpoint.completed_rounds]
    report.summary = None
    digest = model_digest(checkpoint.model)
    report.resumes.append(ResumeRecord(after_round=checkpoint.completed_rounds, model_sha256=digest))
    # A warning, so that it shows in every log setup: Flower's own banner counts
    # the rounds of this restart from 1 and does not mention the resume.
    logger.warning(
        "resuming run %s from round %d (checkpoint %s after round %d, model sha256 %s)",
        config.run_name,
        checkpoint.completed_rounds + 1,
        config.run_dir / CHECKPOINT_FILE,
        checkpoint.completed_rounds,
        digest,
    )
    return checkpoint, report


def _check_same_settings(config: RunConfig, saved: dict[str, Any]) -> None:
    current = config.model_dump(mode="json", by_alias=True)
    differences = [
        f"{key}={saved.get(key)!r} in the checkpoint, {value!r} now"
        for key, value in current.items()
        if key not in RESUMABLE_CHANGES and saved.get(key) != value
    ]
    if differences:
        raise ValueError(
            f"cannot resume run {config.run_name!r}: its checkpoint was written under other settings ("
            + "; ".join(differences)
            + "). Use the same settings, or resume=false to start over."
        )
