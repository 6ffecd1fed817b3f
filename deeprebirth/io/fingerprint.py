"""What a finished result depends on, as one digest: the bytes of its input files and the settings that change it.
Used to decide that earlier work can be kept (a finished batch model, a resumable fine-tuning run).

Content (sha256), not size and modification time: a file copied, restored from a backup or touched keeps its
fingerprint, and a file rewritten in place within the clock's resolution with the same size does not. Hashing
reads every input once per run (about a second per GB), small next to the rewrite or training it saves."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def fingerprint(paths: Sequence[str | os.PathLike[str]], settings: Mapping[str, Any]) -> str:
    """sha256 over each file's bytes (a path that is not a file: its resolved name) and ``settings`` as JSON."""
    digest = hashlib.sha256()
    for path in paths:
        p = Path(path)
        if p.is_file():
            with open(p, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(str(p.resolve()).encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()
