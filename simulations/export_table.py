"""The summary table that `pocketfl export` prints."""

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from pocketfl.server.export import ExportedFile


def print_export_table(console: Console, exported: Sequence[ExportedFile]) -> None:
    """Print one row per exported file: size, sparsity, accuracy in its runtime, latency."""
    # Narrow columns so that the table fits 80 columns: file names without
    # their common "model_" prefix, and only the box's one-space divider
    # between columns.
    table = Table(title="exported models", box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    columns = ("file", "params", "bytes", "zstd", "sparse", "acc", "torch", "agree", "max|d|", "ms")
    rows = [
        (
            item.name.removeprefix("model_"),
            f"{item.parameters:,}",
            f"{item.bytes:,}",
            f"{item.zstd_bytes:,}",
            f"{item.sparsity:.3f}",
            f"{item.accuracy:.3f}",
            f"{item.pytorch_accuracy:.3f}",
            f"{item.agreement:.3f}",
            f"{item.max_abs_difference:.1g}",
            f"{item.latency_ms:.3f}",
        )
        for item in exported
    ]
    for index, column in enumerate(columns):
        # Rich would otherwise squeeze short columns to ellipses on an 80-column terminal.
        width = max([len(column), *(len(row[index]) for row in rows)])
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        "Files are model_<name>. params: parameters in the file after removing pruned channels; "
        "zstd: bytes after zstd "
        "(download size); sparse: share of the "
        "trained model's parameters that are zero or removed; acc: accuracy on the held-out "
        "people, run in the file's own runtime; torch: the same model in PyTorch; agree: share "
        "of windows with PyTorch's class; max|d|: "
        "largest logit difference from PyTorch; ms: median CPU latency per window.",
        highlight=False,
    )
