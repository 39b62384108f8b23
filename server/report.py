"""The run report: a pydantic model written as report.json and rounds.csv."""

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

REPORT_FILE = "report.json"
ROUNDS_FILE = "rounds.csv"
REPORT_SCHEMA_VERSION = 1


class RoundRecord(BaseModel):
    """One federated round, with bytes measured from the real messages."""

    round: int = Field(ge=1)
    accuracy: float = Field(
        description=(
            "Accuracy of the global model after this round on the task's central evaluation "
            "data (HAR: the held-out people)."
        )
    )
    loss: float = Field(
        description=(
            "Loss of the global model on the task's central evaluation data, as the task's "
            "evaluate() computes it (HAR: cross-entropy)."
        )
    )
    clients: int = Field(ge=0, description="Clients whose update was aggregated.")
    sampled_clients: int = Field(ge=0, description="Clients that were sent the round.")
    sampled_partitions: list[int] = Field(
        default_factory=list,
        description=(
            "Partition ids of the sampled clients that gave one, ascending; with one seed, "
            "every run samples the same ones."
        ),
    )
    failed_clients: int = Field(ge=0, description="Replies that failed or did not decode.")
    declined_clients: int = Field(
        0, ge=0, description="Phones that declined the round (a dropout, not a failure)."
    )
    decline_reasons: dict[str, int] = Field(
        default_factory=dict, description="Declined phones counted by the reason they gave."
    )
    peak_train_memory_bytes: int | None = Field(
        None,
        ge=0,
        description=(
            "Largest peak training memory that a client measured for its round, in bytes "
            "(tensors: data, model, activations, gradients, optimizer state)."
        ),
    )
    uplink_bytes: int = Field(ge=0, description="Sum of the wire-format payload lengths, in bytes.")
    uplink_message_bytes: int = Field(
        ge=0, description="Sum of the reply sizes as Flower serializes them, in bytes."
    )
    uplink_float32_bytes: int = Field(
        ge=0, description="What the same updates take as raw float32, in bytes."
    )
    downlink_bytes: int = Field(
        ge=0, description="Sum of the train message sizes as Flower serializes them, in bytes."
    )
    downlink_payload_bytes: int = Field(
        0,
        ge=0,
        description=(
            "Sum of the model payload lengths in the train messages, in bytes; "
            "4 bytes per parameter per client with downlink 'none'."
        ),
    )
    downlink_float32_bytes: int = Field(
        0, ge=0, description="What the same train messages' models take as raw float32, in bytes."
    )
    compression_ratio: float | None = Field(
        description="uplink_float32_bytes / uplink_bytes; null when nothing was received."
    )
    client_accuracy: float | None = Field(
        None, description="Accuracy on the clients' local evaluation splits, weighted by examples."
    )
    mean_train_seconds: float = Field(ge=0, description="Mean local training time per client, in seconds.")
    wall_seconds: float = Field(ge=0, description="Wall-clock time of the round on the server, in seconds.")
    failed: bool = Field(
        False, description="Fewer reports than min-reports arrived; the global model was kept."
    )
    dropped_clients: int = Field(
        0, ge=0, description="Sampled phones that dropped out (simulated availability)."
    )
    late_clients: int = Field(
        0,
        ge=0,
        description="Reports after the deadline or after the round had the reports it needed.",
    )
    simulated_seconds: float = Field(
        0.0, ge=0, description="Length of the round on the simulated phone clock, in seconds."
    )
    cumulative_simulated_seconds: float = Field(
        0.0, ge=0, description="Simulated seconds from the start of round 1 to the end of this round."
    )


class Summary(BaseModel):
    """Totals over the run."""

    final_accuracy: float
    best_accuracy: float
    initial_accuracy: float
    uplink_compression_ratio: float | None = Field(
        description="Total float32 bytes over total uplink payload bytes."
    )
    total_uplink_bytes: int
    total_uplink_float32_bytes: int
    total_downlink_bytes: int
    downlink_compression_ratio: float | None = Field(
        None, description="Total downlink float32 bytes over total downlink payload bytes."
    )
    total_downlink_payload_bytes: int = 0
    total_downlink_float32_bytes: int = 0
    completed_rounds: int
    failed_rounds: int = 0
    total_simulated_seconds: float = 0.0
    wall_seconds: float


class ResumeRecord(BaseModel):
    """A server restart that continued the run from its checkpoint."""

    after_round: int = Field(ge=1, description="Last round in the checkpoint; the restart ran the next one.")
    model_sha256: str = Field(
        description="SHA-256 of the restored global model's tensors (names, dtypes, shapes, bytes)."
    )


class Report(BaseModel):
    """Everything a run measured, written to <run-dir>/report.json."""

    schema_version: int = REPORT_SCHEMA_VERSION
    run_name: str
    task: str = Field("har", description="The task the run trained: 'har' or an import path.")
    config: dict[str, Any] = Field(description="The RunConfig of the run, as JSON.")
    train_people: list[int] = Field(
        default_factory=list, description="Data owners that train as phones; empty if the task has none."
    )
    held_out_people: list[int] = Field(
        default_factory=list, description="Data owners kept for central evaluation."
    )
    num_parameters: int
    rounds: list[RoundRecord] = Field(default_factory=list)
    summary: Summary | None = None
    resumes: list[ResumeRecord] = Field(default_factory=list)


def write_report(report: Report, run_dir: Path) -> Path:
    """Write report.json atomically (temporary file, then rename) and rounds.csv."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / REPORT_FILE
    _write_atomically(path, report.model_dump_json(indent=2) + "\n")

    columns = list(RoundRecord.model_fields)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(columns)
    for record in report.rounds:
        values = record.model_dump()
        writer.writerow([_csv_cell(values[column]) for column in columns])
    _write_atomically(run_dir / ROUNDS_FILE, table.getvalue())
    return path


def read_report(path: Path) -> Report:
    """Load and validate a report.json."""
    return Report.model_validate_json(path.read_text(encoding="utf-8"))


def report_json_schema() -> str:
    """Return the JSON schema of report.json, as kept in docs/report-schema.json."""
    return json.dumps(Report.model_json_schema(), indent=2, sort_keys=True) + "\n"


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
