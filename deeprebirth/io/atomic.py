"""Atomic output: every file the project writes goes through a temp file in the same folder and a rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from deeprebirth.errors import DeepRebirthError


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through a temp file in the same folder, renamed into place only when ``write`` succeeded.

    A crash, a Ctrl-C or an error inside ``write`` leaves the old file (or no file) and no partial output.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DeepRebirthError("output folder does not exist", file=str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | str) -> None:
    """``atomic_write`` of a whole payload (text is written as UTF-8)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda handle: handle.write(payload))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
