"""Folder names of the runs in one `pocketfl compare`, without importing Flower."""

import re

BASELINE = "none"
BASELINE_LABEL = "fedavg-float32"


def run_label(pipeline: str) -> str:
    """Return the run folder name of `pipeline`: 'fedavg-float32' for the baseline, else a slug."""
    if pipeline == BASELINE:
        return BASELINE_LABEL

    # Run names allow letters, digits, '.', '_' and '-' only.
    return re.sub(r"[^A-Za-z0-9.]+", "-", pipeline.replace(":", "")).strip("-")
