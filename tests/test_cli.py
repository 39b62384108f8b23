import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pocketfl.server.report import Report, RoundRecord, Summary
from pocketfl.simulations.cli import cli
from pocketfl.tasks.har.federation import load_federation

runner = CliRunner()

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def _finished_report(*_arguments) -> Report:
    record = RoundRecord(
        round=1,
        accuracy=0.75,
        loss=0.5,
        clients=2,
        sampled_clients=2,
        failed_clients=0,
        uplink_bytes=100,
        uplink_message_bytes=180,
        uplink_float32_bytes=1000,
        downlink_bytes=1000,
        compression_ratio=10.0,
        mean_train_seconds=0.1,
        wall_seconds=0.1,
    )
    summary = Summary(
        final_accuracy=0.75,
        best_accuracy=0.75,
        initial_accuracy=0.25,
        uplink_compression_ratio=10.0,
        total_uplink_bytes=100,
        total_uplink_float32_bytes=1000,
        total_downlink_bytes=1000,
        completed_rounds=1,
        wall_seconds=1.0,
    )
    return Report(run_name="fake", config={}, num_parameters=10, rounds=[record], summary=summary)


def _engine_must_not_start(*_arguments, **_keywords):
    raise AssertionError("the Simulation Engine started")


@pytest.fixture
def engine(monkeypatch):
    """Replace the Simulation Engine of `simulate` and `compare`; by default starting it fails the test."""
    monkeypatch.setattr("pocketfl.simulations.engine.simulate", _engine_must_not_start)
    monkeypatch.setattr("pocketfl.simulations.compare.compare", _engine_must_not_start)
    return monkeypatch


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    yield
    sys.modules.pop("blobs_task", None)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--rounds", "-1"], "for --rounds:"),
        (["--rounds", "0"], ">= 1"),
        (["--rounds", "5000"], "<= 1000"),
        (["--clients", "1"], "for --clients:"),
        (["--clients", "26"], "at most 24 clients"),
        (["--clients", "40"], "--partitioning iid"),
        (["--partitioning", "dirichlet:-1"], "for --partitioning:"),
        (["--partitioning", "shards"], "unknown partitioning"),
        (["--devices", "missing.toml"], "for --devices:"),
        (["--over-selection", "0.5"], "for --over-selection:"),
        (["--round-deadline", "-3"], "for --round-deadline:"),
        (["--min-reports", "0"], "for --min-reports:"),
        (["--clients", "40"], "at most 24 clients"),
        (["--clients", "5000", "--partitioning", "iid"], "for --clients: task 'har'"),
        (["--task", "no_such_module:Task"], "cannot import module"),
        (["--compression", "topk:1.5"], "compression"),
        (["--compression", "q:12"], "compression"),
        (["--learning-rate", "-0.1"], "for --learning-rate:"),
        (["--fraction-train", "0"], "for --fraction-train:"),
        (["--name", "../x"], "for --name:"),
        (["--held-out-people", "29"], "for --held-out-people:"),
        (["--compression", "topk:nan"], "for --compression:"),
        (["--devices", "default", "--start-hour", "nan"], "invalid hour"),
        (["--devices", "default", "--start-hour", "24"], "invalid hour"),
        (["--memory-limit-mb", "inf"], "finite number"),
        (["--over-selection", "nan"], "finite number"),
        (["--pruning", "random"], "for --pruning:"),
        (["--target-sparsity", "1"], "for --target-sparsity:"),
        (["--rounds", "4", "--pruning-end-round", "9"], "for --pruning-end-round:"),
        (["--memory-limit-mb", "0"], "for --memory-limit-mb:"),
    ],
)
def test_bad_option_fails_before_running(arguments, expected, tmp_path):
    result = runner.invoke(cli, ["simulate", "--output-dir", str(tmp_path), *arguments])
    assert result.exit_code == 2
    assert expected in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["--rounds", "--clients", "--learning-rate", "--seed"])
def test_non_numeric_option_rejected(option):
    result = runner.invoke(cli, ["simulate", option, "abc"])
    assert result.exit_code == 2
    assert option in result.output


def test_help_lists_main_options():
    result = runner.invoke(cli, ["simulate", "--help"])
    assert result.exit_code == 0
    for option in ("--rounds", "--clients", "--compression", "--seed"):
        assert option in result.output


def test_output_dir_file_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    result = runner.invoke(cli, ["simulate", "--rounds", "1", "--output-dir", str(blocker)])

    assert result.exit_code == 2
    assert "for --output-dir:" in result.output
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--round-deadline", "30"], "for --round-deadline: it applies to simulated phones only"),
        (["--over-selection", "1.3"], "for --over-selection: it applies to simulated phones only"),
        (["--start-hour", "8"], "add --devices default"),
        (["--min-reports", "25"], "for --min-reports: a round takes at most 24 reports (24 clients"),
        (["--clients", "4", "--min-reports", "5"], "at most 4 reports (4 clients"),
        (["--fraction-train", "0.1", "--min-reports", "3"], "at most 2 reports"),
        # Over-selection samples more phones, but a round keeps only the reports it needs.
        (
            ["--devices", "default", "--fraction-train", "0.1", "--over-selection", "3", "--min-reports", "3"],
            "at most 2 reports",
        ),
    ],
)
def test_ineffective_setting_fails_at_start(engine, arguments, expected, tmp_path):
    result = runner.invoke(cli, ["simulate", "--output-dir", str(tmp_path), *arguments])

    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "arguments",
    [
        ["--round-deadline", "0", "--over-selection", "1", "--start-hour", "0"],
        ["--min-reports", "24"],
        ["--fraction-train", "0.5", "--min-reports", "12"],
    ],
)
def test_reachable_setting_starts_run(engine, arguments, tmp_path):
    engine.setattr("pocketfl.simulations.engine.simulate", _finished_report)

    result = runner.invoke(cli, ["simulate", "--output-dir", str(tmp_path), *arguments])

    assert result.exit_code == 0, result.output


def test_compare_rejects_unreachable_min_reports(engine, tmp_path):
    result = runner.invoke(cli, ["compare", "--output-dir", str(tmp_path), "--clients", "4", "--min-reports", "5"])

    assert result.exit_code == 2
    assert "for --min-reports:" in result.output
    assert not list(tmp_path.iterdir())


class _BaseSeen(Exception):
    """Raised by a fake comparison once it has the run config that `compare` built."""


def test_compare_passes_training_options(engine, tmp_path):
    seen = {}

    def record_base(base, *_arguments, **_keywords):
        seen["base"] = base
        raise _BaseSeen

    engine.setattr("pocketfl.simulations.compare.compare", record_base)
    arguments = ["--learning-rate", "0.2", "--batch-size", "8"]

    result = runner.invoke(cli, ["compare", "--output-dir", str(tmp_path), *arguments])

    assert isinstance(result.exception, _BaseSeen), result.output
    assert seen["base"].learning_rate == 0.2
    assert seen["base"].batch_size == 8


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [(["--learning-rate", "-0.1"], "for --learning-rate:"), (["--batch-size", "0"], "for --batch-size:")],
)
def test_compare_rejects_bad_training_option(engine, arguments, expected, tmp_path):
    result = runner.invoke(cli, ["compare", "--output-dir", str(tmp_path), *arguments])

    assert result.exit_code == 2
    assert expected in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("pipelines", "folder"),
    [(["qsgd:4:16", "qsgd:41:6"], "qsgd416"), (["q:8", "q:8"], "q8"), (["none"], "fedavg-float32")],
)
def test_compare_rejects_shared_run_folder(engine, tmp_path, pipelines, folder):
    arguments = [argument for pipeline in pipelines for argument in ("--compression", pipeline)]

    result = runner.invoke(cli, ["compare", "--output-dir", str(tmp_path), *arguments])

    output = " ".join(result.output.split())
    assert result.exit_code == 2
    assert f"its run folder '{folder}'" in output
    assert not list(tmp_path.iterdir())


def test_channel_pruning_without_chain_fails(engine, examples_on_path, tmp_path):
    arguments = ["--task", "blobs_task:BlobsTask", "--clients", "2", "--pruning", "channel"]

    result = runner.invoke(cli, ["simulate", "--output-dir", str(tmp_path), *arguments])

    output = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "for --pruning: task 'blobs' names no channel chain" in output
    assert "--pruning global or layer" in output


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_cache_env_var_file_fails_at_start(engine, command, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("POCKETFL_CACHE_DIR", str(blocker))
    # The federation is cached per process by its arguments, which do not include the variable.
    load_federation.cache_clear()

    result = runner.invoke(cli, [command, "--output-dir", str(tmp_path / "runs")])

    assert result.exit_code == 2
    assert "for POCKETFL_CACHE_DIR: it is a file" in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_cache_dir_file_fails_at_start(engine, command, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    result = runner.invoke(cli, [command, "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(blocker)])

    assert result.exit_code == 2
    assert "for --cache-dir: it is a file" in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--task", "blobs_task:BlobsTask", "--clients", "2"], "final accuracy on the central test data 0.7500"),
        ([], "final accuracy on the held-out people 0.7500"),
    ],
)
def test_summary_names_evaluation_data(engine, examples_on_path, arguments, expected, tmp_path):
    engine.setattr("pocketfl.simulations.engine.simulate", _finished_report)

    result = runner.invoke(cli, ["simulate", "--rounds", "1", "--output-dir", str(tmp_path), *arguments])

    assert result.exit_code == 0, result.output
    assert expected in " ".join(result.output.split())
