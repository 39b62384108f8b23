"""Exports load in their own runtimes and match PyTorch; QAT and int8 keep the model's behaviour."""

import numpy as np
import pytest
import torch

from pocketfl.compression.export import as_conv2d, export_executorch, export_onnx, run_executorch, run_onnx
from pocketfl.compression.pruning import apply_mask, channel_mask, magnitude_mask, masked_training
from pocketfl.compression.quantization import fake_quant_training, quantize_int8
from pocketfl.compression.structured import shrink_channels
from pocketfl.tasks.har.model import CHANNEL_CHAIN, build_model
from pocketfl.tasks.har.training import train

# Float exports run the same float32 kernels in another order: agreement to
# 1e-4 on logits of order 1. int8 files run XNNPACK / onnxruntime int8
# kernels against PyTorch's reference int8 graph, whose rounding of one
# activation can differ by one step; 0.02 allows a few steps on any logit.
FLOAT_TOLERANCE = 1e-4
INT8_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).normal(size=(24, 6, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def pruned_model():
    model = build_model(seed=0)
    weights = {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}
    mask = channel_mask(weights, CHANNEL_CHAIN, 0.8)
    model.load_state_dict({name: torch.from_numpy(v) for name, v in apply_mask(weights, mask).items()})
    return shrink_channels(model, CHANNEL_CHAIN).eval()


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_exports_match_pytorch(tmp_path, windows, pruned_model, precision):
    example = torch.from_numpy(windows[:2])
    model = pruned_model
    tolerance = FLOAT_TOLERANCE
    if precision == "int8":
        model = quantize_int8(pruned_model, example, [torch.from_numpy(windows)])
        tolerance = INT8_TOLERANCE
    expected = model(torch.from_numpy(windows)).detach().numpy()

    pte = export_executorch(model, example[:1], tmp_path / "model.pte")
    onnx_file = export_onnx(model, example, tmp_path / "model.onnx")

    np.testing.assert_allclose(run_executorch(pte, windows), expected, atol=tolerance, rtol=0)
    np.testing.assert_allclose(run_onnx(onnx_file, windows), expected, atol=tolerance, rtol=0)
    if precision == "int8":
        float_bytes = sum(p.numel() for p in pruned_model.parameters()) * 4
        assert onnx_file.stat().st_size < float_bytes


def test_int8_model_stays_close_to_float(windows, pruned_model):
    example = torch.from_numpy(windows[:2])
    quantized = quantize_int8(pruned_model, example, [torch.from_numpy(windows)])
    float_logits = pruned_model(torch.from_numpy(windows)).detach()
    int8_logits = quantized(torch.from_numpy(windows)).detach()
    scale = float_logits.abs().max()
    assert (int8_logits - float_logits).abs().max() < 0.05 * scale


def test_qat_keeps_mask_and_int8_grid(windows):
    model = build_model(seed=0)
    weights = {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}
    mask = magnitude_mask(weights, 0.5)
    model.load_state_dict({name: torch.from_numpy(v) for name, v in apply_mask(weights, mask).items()})
    labels = np.arange(len(windows)) % 6

    with masked_training(model, mask), fake_quant_training(model):
        train(model, windows, labels, epochs=1, learning_rate=0.1, batch_size=8, seed=0)
        model.eval()
        layer = model.features[0]
        steps = np.unique(np.round(layer.weight.detach().numpy()[0] / layer.weight.detach().abs()[0].max().item() * 127, 3))
        assert np.allclose(steps, np.round(steps))

    trained = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    assert set(trained) == set(weights)
    for name, kept in mask.items():
        assert np.all(trained[name][~kept] == 0)
    assert any(not np.array_equal(trained[name], weights[name]) for name in weights)


def test_conv2d_rewrite_matches_and_shrinks_pte(tmp_path, windows, pruned_model):
    example = torch.from_numpy(windows[:2])
    rewritten = as_conv2d(pruned_model, example)

    assert rewritten is not pruned_model
    torch.testing.assert_close(rewritten(torch.from_numpy(windows)), pruned_model(torch.from_numpy(windows)))
    one_d = export_executorch(pruned_model, example[:1], tmp_path / "1d.pte")
    two_d = export_executorch(rewritten, example[:1], tmp_path / "2d.pte")
    assert two_d.stat().st_size < one_d.stat().st_size


def test_conv2d_rewrite_keeps_model_that_needs_three_axes():
    class LastStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(6, 4, 3)

        def forward(self, x):
            return self.conv(x)[:, :, -1]

    model = LastStep().eval()
    assert as_conv2d(model, torch.randn(2, 6, 16)) is model
