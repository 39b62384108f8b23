"""The summary table that `pocketfl export` prints."""

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from pocketfl.server.export import ExportedFile


def print_export_table(console: Console, exported: Sequence[ExportedFile]) -> None:
    """Print one row per exported file: size, sparsity, accuracy in its runtime, latency."""
    table = Table(title="exported models", box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ("file", "params", "bytes", "zstd", "sparsity", "acc", "torch", "agree", "max|d|", "ms")
    for column in columns:
        table.add_column(column, justify="left" if column == "file" else "right", no_wrap=True)
    for item in exported:
        table.add_row(
            item.name,
            f"{item.parameters:,}",
            f"{item.bytes:,}",
            f"{item.zstd_bytes:,}",
            f"{item.sparsity:.3f}",
            f"{item.accuracy:.4f}",
            f"{item.pytorch_accuracy:.4f}",
            f"{item.agreement:.4f}",
            f"{item.max_abs_difference:.2g}",
            f"{item.latency_ms:.3f}",
        )
    console.print(table)
    console.print(
        "params: parameters in the file after removing pruned channels; zstd: bytes after zstd "
        "(download size); sparsity: share of the "
        "trained model's parameters that are zero or removed; acc: accuracy on the held-out "
        "people, run in the file's own runtime; torch: the same model in PyTorch; agree: share "
        "of windows with PyTorch's class; max|d|: "
        "largest logit difference from PyTorch; ms: median CPU latency per window.",
        highlight=False,
    )
