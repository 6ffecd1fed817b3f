"""What makes a second run cheap and a killed run harmless: a finished model's marker (its row and a fingerprint
of its inputs and options), and the staging folders a worker writes into."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

from deeprebirth.batch.discover import stem
from deeprebirth.batch.job import rewrite_options
from deeprebirth.batch.records import BatchOptions, FoundModel, ModelResult
from deeprebirth.io.fingerprint import fingerprint

STAGING_PREFIX = ".deeprebirth-staging-"


def marker_name(prototxt: str) -> str:
    return f"{stem(Path(prototxt).name)}.batch.json"


def fingerprint_of(model: FoundModel, zoo: Path, options: BatchOptions) -> str:
    """What a finished result depends on (``deeprebirth.io.fingerprint``): the input files' bytes, the rewrite
    options, the tool's version."""
    from deeprebirth import __version__
    files = [zoo / rel for rel in (model.prototxt, model.weights) if rel]
    return fingerprint(files, {"options": asdict(rewrite_options(options)), "version": __version__})


def cached_result(model: FoundModel, zoo: Path, out: Path, options: BatchOptions) -> ModelResult | None:
    marker = out / Path(model.prototxt).parent / marker_name(model.prototxt)
    try:
        saved = json.loads(marker.read_text())
        if saved["fingerprint"] != fingerprint_of(model, zoo, options):
            return None
        known = {f.name for f in fields(ModelResult)}
        row = ModelResult(**{k: v for k, v in saved["result"].items() if k in known})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if row.status != "ok" or not all((out / name).is_file() for name in row.outputs):
        return None
    row.cached = True
    return row


def remove_staging(out: Path) -> None:
    """Staging folders left by a run that was killed outright (SIGKILL, power loss)."""
    for path in out.rglob(f"{STAGING_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
