"""`pocketfl export`: a run folder becomes .pte and .onnx files that match PyTorch in their runtimes."""

import numpy as np
import torch
from typer.testing import CliRunner

from pocketfl.compression.pruning import apply_mask, channel_mask
from pocketfl.server.config import load_run_config
from pocketfl.server.export import export_run
from pocketfl.server.federation import MODEL_FILE
from pocketfl.server.report import Report, write_report
from pocketfl.simulations.cli import cli
from pocketfl.tasks.har.model import CHANNEL_CHAIN, build_model


def _pruned_run(tmp_path):
    model = build_model(seed=0)
    weights = {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}
    pruned = apply_mask(weights, channel_mask(weights, CHANNEL_CHAIN, 0.8))
    run_dir = tmp_path / "run"
    config = load_run_config({"run_name": "run", "output_dir": tmp_path, "pruning": "channel"})
    report = Report(
        run_name="run",
        config=config.model_dump(mode="json", by_alias=True),
        train_people=[],
        held_out_people=[],
        num_parameters=sum(values.size for values in weights.values()),
    )
    write_report(report, run_dir)
    torch.save({name: torch.from_numpy(values) for name, values in pruned.items()}, run_dir / MODEL_FILE)
    return run_dir


def test_export_writes_files_that_match_pytorch(tmp_path):
    run_dir = _pruned_run(tmp_path)

    exported = {item.name: item for item in export_run(run_dir, tmp_path / "out")}

    assert set(exported) == {"model_float32.pte", "model_float32.onnx", "model_int8.pte", "model_int8.onnx"}
    for item in exported.values():
        assert (tmp_path / "out" / item.name).stat().st_size == item.bytes
        assert item.sparsity >= 0.8
        assert item.parameters < 0.25 * 32_230
        # Classes agree with PyTorch on all but a few held-out windows.
        assert item.agreement >= 0.99
        assert abs(item.accuracy - item.pytorch_accuracy) <= 0.01
        assert item.latency_ms > 0
    assert exported["model_float32.onnx"].max_abs_difference < 1e-3
    assert exported["model_float32.pte"].max_abs_difference < 1e-3
    assert exported["model_int8.onnx"].bytes < exported["model_float32.onnx"].bytes / 2
    assert exported["model_int8.pte"].bytes < exported["model_float32.pte"].bytes


def test_export_command_rejects_folder_without_run(tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tmp_path)])

    assert result.exit_code == 2
    assert "report.json; pass the folder of a finished run" in " ".join(result.output.split())


def test_export_rejects_damaged_runs_with_the_file_named(tmp_path):
    run_dir = _pruned_run(tmp_path)
    model_path = run_dir / MODEL_FILE
    intact = model_path.read_bytes()

    model_path.write_bytes(intact[: len(intact) // 2])
    truncated = CliRunner().invoke(cli, ["export", str(run_dir)])
    torch.save({"weight": torch.zeros(3)}, model_path)
    other_model = CliRunner().invoke(cli, ["export", str(run_dir)])
    model_path.write_bytes(intact)
    (run_dir / "report.json").write_text("{{{ not json", encoding="utf-8")
    garbage_report = CliRunner().invoke(cli, ["export", str(run_dir)])

    assert truncated.exit_code == 2
    assert "is not a readable model" in " ".join(truncated.output.split())
    assert other_model.exit_code == 2
    assert "does not fit the model of task 'har'" in " ".join(other_model.output.split())
    assert garbage_report.exit_code == 2
    assert "is not a pocketfl report" in " ".join(garbage_report.output.split())


def test_export_rejects_a_file_as_output_folder(tmp_path):
    run_dir = _pruned_run(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x", encoding="utf-8")

    result = CliRunner().invoke(cli, ["export", str(run_dir), "--output-dir", str(blocker)])

    assert result.exit_code == 2
    assert "for --output-dir" in " ".join(result.output.split())
