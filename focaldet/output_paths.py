"""Checking where a command will write, before it does the work.

`check_output_file` refuses, in one line naming the path, an output that is a folder, whose
folder cannot be created or written, or an existing file that cannot be overwritten: so
``focaldet export`` does not spend a minute exporting (nor ``data corrupt`` reading a big
JSON) only to fail with a traceback at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from focaldet.errors import ConfigError

__all__ = ["check_output_file"]


def check_output_file(path: str | os.PathLike, what: str = "output", create_parent: bool = True,
                      error: type[Exception] = ConfigError) -> Path:
    """``path`` as a ``Path`` once it is known that a file can be written there (its folder
    is created when ``create_parent``); ``error`` (default `ConfigError`) naming ``what`` and
    the path otherwise."""
    path = Path(path).expanduser()
    if str(path).endswith(os.sep) or path.is_dir():
        raise error(f"{what} {path} is a folder: give a file name")
    parent = path.parent
    if not parent.is_dir():
        if parent.exists():
            raise error(f"{what} {path}: {parent} is not a folder")
        if not create_parent:
            raise error(f"{what} {path}: output folder {parent} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise error(f"{what} {path}: cannot create folder {parent} ({e.strerror or e})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise error(f"{what} {path}: the file exists and is not writable")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{what} {path}: folder {parent} is not writable")
    return path
