"""One federated run on a Flower Grid: strategy, central evaluation, report, final model."""

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from pocketfl.client.instructions import RoundInstructions
from pocketfl.strategies import CompressedFedAvg
from pocketfl.strategies.device_clock import DeviceClock
from pocketfl.strategies.pruning import PruningSchedule
from pocketfl.tasks.base import Task, TaskFactory

from .checkpoint import Checkpoint, capture_rng_state, save_checkpoint, save_model
from .config import MIN_TRAIN_NODES, RunConfig, check_pruning, prepare_folders
from .node_keys import query_node_keys
from .report import Report, RoundRecord, Summary, write_report
from .resume import prepare_resume
from .rounds import ContinuedRounds

logger = logging.getLogger(__name__)

MODEL_FILE = "final_model.pt"

RoundCallback = Callable[[RoundRecord], None]


def run_federation(
    grid: Grid,
    config: RunConfig,
    task_factory: TaskFactory,
    on_round: RoundCallback | None = None,
    clock: DeviceClock | None = None,
) -> Report:
    """Run `config.num_server_rounds` rounds of compressed FedAvg and write the results.

    After each round the global model is evaluated on the task's central data
    (HAR: the held-out people), the round is appended to the report on disk, a
    checkpoint is written, and `on_round` is called with the round. With
    `config.resume`, a run whose server died continues after the last round
    in its checkpoint. With a `clock` (simulated phones), rounds also run on
    simulated time.
    """
    started = time.perf_counter()
    prepare_folders(config)
    if clock is None:
        _warn_clock_settings(config)
    task = task_factory(config.task_settings)
    model = task.build_model(seed=config.seed)
    x_held_out, y_held_out = task.central_data()
    report = _new_report(config, task, model)
    # `flwr run` may start fewer SuperNodes than there are people, so only an
    # explicit --clients waits for that many nodes.
    min_available_nodes = config.num_clients or 1

    strategy = CompressedFedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_train,
        min_train_nodes=MIN_TRAIN_NODES,
        min_evaluate_nodes=1,
        min_available_nodes=min_available_nodes,
        uplink=config.compression,
        downlink=config.downlink_compression,
        seed=config.seed,
        min_reports=config.min_reports,
        clock=clock,
        round_deadline=config.round_deadline,
        over_selection=config.over_selection,
        pruning=_pruning_schedule(config, task),
        error_feedback=config.error_feedback,
    )
    initial_arrays = ArrayRecord(model.state_dict())
    initial_accuracy = 0.0
    completed_rounds = 0
    resumed = prepare_resume(config, strategy)
    if resumed is not None:
        checkpoint, report = resumed
        initial_arrays = ArrayRecord({name: Array(values) for name, values in checkpoint.model.items()})
        initial_accuracy = checkpoint.initial_accuracy
        completed_rounds = checkpoint.completed_rounds
        if strategy.timer is not None and report.rounds:
            # The simulated day continues where the dead server left it.
            strategy.timer.elapsed_seconds = report.rounds[-1].cumulative_simulated_seconds
    rounds = ContinuedRounds(strategy, completed_rounds)
    round_started = time.perf_counter()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal round_started, initial_accuracy

        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.evaluate(model, x_held_out, y_held_out)
        if server_round == 0:
            initial_accuracy = accuracy
            round_started = time.perf_counter()
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        record = _round_record(strategy, server_round, accuracy, loss, round_started)
        previous = report.rounds[-1].cumulative_simulated_seconds if report.rounds else 0.0
        record.cumulative_simulated_seconds = previous + record.simulated_seconds
        client_metrics = rounds.client_evaluate_metrics.get(server_round)
        if client_metrics is not None and "accuracy" in client_metrics:
            record.client_accuracy = float(client_metrics["accuracy"])
        report.rounds.append(record)
        write_report(report, config.run_dir)
        _save_checkpoint(config, server_round, arrays, report, strategy, initial_accuracy)
        logger.info(
            "round %d: accuracy %.4f, uplink %d bytes (%.1fx below float32), downlink payloads %d bytes",
            server_round,
            accuracy,
            record.uplink_bytes,
            record.compression_ratio or 0.0,
            record.downlink_payload_bytes,
        )
        if on_round is not None:
            on_round(record)
        round_started = time.perf_counter()
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    final_arrays = initial_arrays
    remaining_rounds = config.num_server_rounds - completed_rounds
    if remaining_rounds > 0:
        # Asked again after a resume: node ids may have changed, partition ids have not.
        strategy.sampler.node_keys = query_node_keys(grid, min_available_nodes, config.round_timeout)
        instructions = _instructions(config, task)
        result = rounds.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=remaining_rounds,
            timeout=config.round_timeout,
            train_config=instructions,
            evaluate_config=instructions,
            evaluate_fn=rounds.wrap_evaluate_fn(evaluate_global),
        )
        final_arrays = result.arrays

    report.summary = _summary(report, initial_accuracy, time.perf_counter() - started)
    write_report(report, config.run_dir)
    save_model(final_arrays.to_torch_state_dict(), config.run_dir / MODEL_FILE)
    return report


def _save_checkpoint(
    config: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    report: Report,
    strategy: CompressedFedAvg,
    initial_accuracy: float,
) -> None:
    checkpoint = Checkpoint(
        completed_rounds=server_round,
        model={name: array.numpy() for name, array in arrays.items()},
        report=report.model_dump(mode="json"),
        initial_accuracy=initial_accuracy,
        strategy_state=strategy.checkpoint_state(),
        rng_state=capture_rng_state(),
    )
    save_checkpoint(checkpoint, config.run_dir)


def _instructions(config: RunConfig, task: Task) -> ConfigRecord:
    return RoundInstructions(
        server_round=1,
        task=task.name,
        compression=config.compression,
        error_feedback=config.error_feedback,
        local_epochs=config.local_epochs,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        held_out_people=config.held_out_people,
        seed=config.seed,
        cache_dir=str(config.cache_dir or ""),
        partitioning=config.partitioning,
        qat=config.qat,
        memory_limit_mb=config.memory_limit_mb or 0.0,
    ).to_config_record()


def _pruning_schedule(config: RunConfig, task: Task) -> PruningSchedule | None:
    if config.pruning == "none":
        return None
    check_pruning(config, task)
    return PruningSchedule(
        kind=config.pruning,
        target_sparsity=config.target_sparsity,
        end_round=config.resolved_pruning_end_round,
        chain=task.channel_chain(),
    )


def _new_report(config: RunConfig, task: Task, model: torch.nn.Module) -> Report:
    train_people, held_out_people = task.data_owners()
    return Report(
        run_name=config.run_name,
        task=config.task,
        config=config.model_dump(mode="json", by_alias=True),
        train_people=train_people,
        held_out_people=held_out_people,
        num_parameters=sum(parameter.numel() for parameter in model.parameters()),
    )


def _round_record(
    strategy: CompressedFedAvg, server_round: int, accuracy: float, loss: float, round_started: float
) -> RoundRecord:
    traffic = strategy.traffic[server_round]
    ratio = traffic.uplink_float32_bytes / traffic.uplink_bytes if traffic.uplink_bytes else None
    return RoundRecord(
        round=server_round,
        accuracy=accuracy,
        loss=loss,
        clients=traffic.clients,
        sampled_clients=traffic.sampled_clients,
        sampled_partitions=traffic.sampled_keys,
        failed_clients=traffic.failed_clients,
        declined_clients=traffic.declined_clients,
        decline_reasons=dict(traffic.decline_reasons),
        peak_train_memory_bytes=traffic.peak_memory_bytes,
        uplink_bytes=traffic.uplink_bytes,
        uplink_message_bytes=traffic.uplink_message_bytes,
        uplink_float32_bytes=traffic.uplink_float32_bytes,
        downlink_bytes=traffic.downlink_bytes,
        downlink_payload_bytes=traffic.downlink_payload_bytes,
        downlink_float32_bytes=traffic.downlink_float32_bytes,
        compression_ratio=ratio,
        mean_train_seconds=float(np.mean(traffic.train_seconds)) if traffic.train_seconds else 0.0,
        wall_seconds=time.perf_counter() - round_started,
        failed=traffic.round_failed,
        dropped_clients=traffic.dropped_clients,
        late_clients=traffic.late_clients,
        simulated_seconds=traffic.simulated_seconds,
    )


def _summary(report: Report, initial_accuracy: float, wall_seconds: float) -> Summary:
    uplink = sum(record.uplink_bytes for record in report.rounds)
    uplink_float32 = sum(record.uplink_float32_bytes for record in report.rounds)
    downlink_payload = sum(record.downlink_payload_bytes for record in report.rounds)
    downlink_float32 = sum(record.downlink_float32_bytes for record in report.rounds)
    accuracies = [record.accuracy for record in report.rounds]
    return Summary(
        final_accuracy=accuracies[-1] if accuracies else initial_accuracy,
        best_accuracy=max(accuracies, default=initial_accuracy),
        initial_accuracy=initial_accuracy,
        uplink_compression_ratio=uplink_float32 / uplink if uplink else None,
        total_uplink_bytes=uplink,
        total_uplink_float32_bytes=uplink_float32,
        total_downlink_bytes=sum(record.downlink_bytes for record in report.rounds),
        downlink_compression_ratio=downlink_float32 / downlink_payload if downlink_payload else None,
        total_downlink_payload_bytes=downlink_payload,
        total_downlink_float32_bytes=downlink_float32,
        completed_rounds=len(report.rounds),
        failed_rounds=sum(record.failed for record in report.rounds),
        total_simulated_seconds=report.rounds[-1].cumulative_simulated_seconds if report.rounds else 0.0,
        wall_seconds=wall_seconds,
    )


def _warn_clock_settings(config: RunConfig) -> None:
    # A deployment has no simulated clock, so these keys would otherwise do
    # nothing silently. `pocketfl simulate` rejects them without --devices.
    ignored = []
    if config.round_deadline is not None:
        ignored.append(f"round-deadline={config.round_deadline}")
    if config.over_selection != RunConfig.model_fields["over_selection"].default:
        ignored.append(f"over-selection={config.over_selection}")
    if ignored:
        logger.warning(
            "%s act only on simulated phones (pocketfl simulate --devices), so this run ignores them",
            " and ".join(ignored),
        )
