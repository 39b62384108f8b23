"""The writable-folder check shared by every start-up path: run folders and data caches."""

import os
from pathlib import Path


def ensure_writable_folder(folder: Path, option: str) -> None:
    """Create `folder` if needed, or raise ValueError naming `option` if it cannot be written.

    `option` is the setting the folder came from, as the user wrote it: a CLI
    option, a run-config key or an environment variable.
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"invalid value '{folder}' for {option}: it is a file; choose a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"invalid value '{folder}' for {option}: cannot create the folder "
            f"({error.strerror}); choose a writable folder."
        ) from None
    if not os.access(folder, os.W_OK):
        raise ValueError(
            f"invalid value '{folder}' for {option}: the folder is not writable; "
            "choose a writable folder."
        )
