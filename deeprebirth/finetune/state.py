"""Resume: the work folder's ``state.json`` (which phases finished, with their results) and the snapshot of the
weights it points at, written in an order that an interruption at any moment leaves consistent."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from deeprebirth.aliases import Weights
from deeprebirth.caffe.data import PathLike
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune.options import FinetuneOptions, StepResult, options_json
from deeprebirth.io import caffe_io
from deeprebirth.io.atomic import atomic_write_bytes as write_text
from deeprebirth.io.fingerprint import fingerprint
from deeprebirth.ir.graph import Graph

STATE_VERSION = 2


def run_fingerprint(paths: Sequence[PathLike], options: FinetuneOptions) -> str:
    relevant = options_json(options)
    for key in ("resume", "max_steps", "work_dir", "report", "cache_mb", "gpu", "teacher_process"):
        relevant.pop(key)
    return fingerprint(paths, relevant)


def save_state(work: Path, state: dict[str, Any]) -> None:
    write_text(work / "state.json", json.dumps(state, indent=2))


def open_state(work: Path, run: str, phases: list[str], store: Weights, resume: bool) -> dict[str, Any]:
    """The state of an earlier run with the same fingerprint ``run`` (its snapshot loaded into ``store``) when
    resuming, else a fresh one (earlier snapshots removed)."""
    state: dict[str, Any] = {"version": STATE_VERSION, "fingerprint": run, "steps": phases, "finished": []}
    state_path = work / "state.json"
    if resume and state_path.is_file():
        try:
            previous = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise DeepRebirthError("cannot read the state of the earlier run", file=str(state_path)) from None
        if previous.get("fingerprint") != run or previous.get("version") != STATE_VERSION:
            raise DeepRebirthError("the earlier run used other files or options; start over without resuming",
                                   file=str(state_path))
        state = previous
        if state.get("snapshot"):
            path = work / state["snapshot"]
            if not path.is_file():
                raise DeepRebirthError("the snapshot of the earlier run is missing", file=str(path))
            for name, blobs in caffe_io.read_weights(path).items():
                if name in store:
                    store[name] = [np.array(b, dtype=np.float32).reshape(store[name][i].shape)
                                   for i, b in enumerate(blobs)]
    else:
        for old in work.glob("snapshot_step*.caffemodel"):
            old.unlink()
        save_state(work, state)
    return state


def snapshot(work: Path, slim: Graph, store: Weights, state: dict[str, Any], result: StepResult) -> None:
    """Weights first, then the state that points at them, then the previous snapshot goes: an interruption at
    any moment leaves a state whose snapshot matches its list of finished steps."""
    name = f"snapshot_step{result.index}.caffemodel"
    caffe_io.write_caffemodel(work / name, slim.to_net(), store)
    previous = state.get("snapshot")
    state["snapshot"] = name
    state["finished"] = [r for r in state.get("finished", []) if r["index"] != result.index] + [asdict(result)]
    save_state(work, state)
    if previous and previous != name:
        (work / previous).unlink(missing_ok=True)
