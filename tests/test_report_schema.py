import json
from pathlib import Path

from pocketfl.server.report import Report, RoundRecord, Summary, read_report, report_json_schema, write_report

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "report-schema.json"


def test_docs_schema_matches_model():
    # Regenerate with `make schema` after changing server/report.py.
    assert SCHEMA_FILE.read_text(encoding="utf-8") == report_json_schema()


def test_schema_keeps_required_fields():
    schema = json.loads(report_json_schema())
    round_fields = schema["$defs"]["RoundRecord"]["properties"]
    summary_fields = schema["$defs"]["Summary"]["properties"]
    for name in ("round", "accuracy", "loss", "clients", "uplink_bytes", "uplink_float32_bytes", "downlink_bytes"):
        assert name in round_fields
    for name in ("final_accuracy", "uplink_compression_ratio"):
        assert name in summary_fields


def _record(round_number: int) -> RoundRecord:
    return RoundRecord(
        round=round_number,
        accuracy=0.5,
        loss=1.0,
        clients=3,
        sampled_clients=3,
        failed_clients=0,
        uplink_bytes=100,
        uplink_message_bytes=180,
        uplink_float32_bytes=12_000,
        downlink_bytes=40_000,
        compression_ratio=120.0,
        mean_train_seconds=0.1,
        wall_seconds=0.5,
    )


def test_report_round_trips_and_writes_csv(tmp_path):
    report = Report(
        run_name="t",
        config={"seed": 0},
        train_people=[1, 2],
        held_out_people=[3],
        num_parameters=3000,
        rounds=[_record(1), _record(2)],
        summary=Summary(
            final_accuracy=0.5,
            best_accuracy=0.5,
            initial_accuracy=0.1,
            uplink_compression_ratio=120.0,
            total_uplink_bytes=200,
            total_uplink_float32_bytes=24_000,
            total_downlink_bytes=80_000,
            completed_rounds=2,
            wall_seconds=1.0,
        ),
    )
    path = write_report(report, tmp_path / "run")

    assert read_report(path) == report
    lines = (tmp_path / "run" / "rounds.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["round", "accuracy", "loss"]
    assert len(lines) == 3
    assert not list((tmp_path / "run").glob(".*"))  # no temporary files left behind


def test_round_metrics_described_for_any_task():
    round_fields = json.loads(report_json_schema())["$defs"]["RoundRecord"]["properties"]

    for name in ("accuracy", "loss"):
        description = round_fields[name]["description"]
        assert "the task's central evaluation data" in description
        assert "(HAR: " in description
