import pytest
from typer.testing import CliRunner

from pocketfl.simulations.cli import cli

runner = CliRunner()


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
        (["--clients", "5000", "--partitioning", "iid"], "4044 phones"),
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
