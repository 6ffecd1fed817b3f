"""The batch itself (in the caller's process): ``jobs`` isolated workers at a time, each with a timeout; a dead or
overdue worker becomes a row, Ctrl-C is only taken while waiting, and finished outputs move into place by rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from deeprebirth.batch.discover import discover, stem
from deeprebirth.batch.job import ModelTask, rewrite_model, run_model
from deeprebirth.batch.markers import STAGING_PREFIX, cached_result, fingerprint_of, marker_name, remove_staging
from deeprebirth.batch.records import BatchOptions, BatchSummary, FoundModel, ModelResult
from deeprebirth.batch.summary import write_summary
from deeprebirth.caffe.isolation import Child
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io


@dataclass
class _Running:
    index: int
    task: ModelTask
    child: Child


def run_batch(zoo_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], options: BatchOptions | None = None,
              on_result: Callable[[ModelResult, int, int], None] | None = None,
              worker: Callable[[ModelTask], ModelResult] = rewrite_model) -> BatchSummary:
    """Rewrite every model under ``zoo_dir`` into ``out_dir``; ``on_result(row, done, total)`` after each model.

    ``worker`` runs in the worker process (tests pass one that crashes or hangs). Ctrl-C stops the workers,
    removes their unfinished outputs, writes the summary of what finished, and re-raises KeyboardInterrupt.
    """
    options = options or BatchOptions()
    options.validate()  # an unknown rule or option value is the caller's error, before any work
    zoo, out = Path(zoo_dir).resolve(), Path(out_dir).resolve()
    if not zoo.is_dir():
        raise DeepRebirthError("not a folder", file=str(zoo_dir))
    if out == zoo:
        raise DeepRebirthError("the output folder must not be the zoo folder (outputs keep the input file names)",
                               file=str(out_dir))
    if out.exists() and not out.is_dir():
        raise DeepRebirthError("output path is not a folder", file=str(out_dir))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    found = discover(zoo, exclude=out)
    remove_staging(out)
    rows: list[ModelResult | None] = [None] * len(found)
    done = 0

    def record(index: int, row: ModelResult) -> None:
        nonlocal done
        rows[index] = row
        done += 1
        if on_result is not None:
            on_result(row, done, len(found))

    todo: deque[int] = deque()
    for i, model in enumerate(found):
        if model.skip:
            record(i, ModelResult(model.prototxt, model.weights, model.kind, "skipped", error=model.skip))
            continue
        cached = None if options.force else cached_result(model, zoo, out, options)
        if cached is not None:
            record(i, cached)
        else:
            todo.append(i)

    jobs = max(1, options.jobs or os.cpu_count() or 1)
    running: list[_Running] = []
    interrupted = False
    with _DeferredInterrupt() as irq:
        try:
            while todo or running:
                while todo and len(running) < jobs:
                    i = todo.popleft()
                    running.append(_start(i, found[i], zoo, out, options, worker))
                now = time.monotonic()
                with irq.allowed():
                    wait([w for r in running for w in r.child.waitables],
                         timeout=max(0.0, min(r.child.deadline for r in running) - now))
                for r in list(running):
                    row = _poll(r)
                    if row is not None:
                        running.remove(r)
                        record(r.index, _finish(r, row, zoo, out, options))
        except BaseException:
            interrupted = True
            raise
        finally:
            for r in running:
                r.child.kill()
                shutil.rmtree(r.task.staging, ignore_errors=True)
            results = [row if row is not None else
                       ModelResult(m.prototxt, m.weights, m.kind, "interrupted", error="not finished: interrupted")
                       for row, m in zip(rows, found)]
            summary = BatchSummary(str(zoo_dir), str(out_dir), options, results, time.perf_counter() - start,
                                   interrupted)
            summary.files = write_summary(summary, out)
    return summary


class _DeferredInterrupt:
    """Ctrl-C raises KeyboardInterrupt only while the batch waits for its workers; anywhere else it is held until
    the next wait. So a model's files are never half moved into place, a started worker is always tracked, and an
    atomic write is never cut between creating its temp file and cleaning up. (Main thread with Python's default
    SIGINT handler only; otherwise nothing changes.)"""

    def __init__(self) -> None:
        self.pending = False
        self.armed = False
        self._old: Any = None

    def __enter__(self) -> _DeferredInterrupt:  # noqa: PYI034  (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.armed:
            raise KeyboardInterrupt
        self.pending = True

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        self.armed = True
        try:
            if self.pending:
                raise KeyboardInterrupt
            yield
        finally:
            self.armed = False


def _start(index: int, model: FoundModel, zoo: Path, out: Path, options: BatchOptions,
           worker: Callable[[ModelTask], ModelResult]) -> _Running:
    out_folder = out / Path(model.prototxt).parent
    out_folder.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{stem(Path(model.prototxt).name)}-", dir=out_folder)
    task = ModelTask(model, str(zoo), str(out_folder), staging, options)
    child = Child(run_model, worker, task, timeout=options.timeout, name=f"deeprebirth-batch-{index}")
    return _Running(index, task, child)


def _poll(r: _Running) -> ModelResult | None:
    """The worker's row if it ended (a row of its own, or one saying how it died), None while it still runs."""
    ended = r.child.poll()
    if ended is None:
        return None
    m = r.task.model
    if ended.timed_out:
        return ModelResult(m.prototxt, m.weights, m.kind, "timeout", error=f"{ended.died} (the worker was stopped)")
    if ended.died or ended.error is not None:
        return ModelResult(m.prototxt, m.weights, m.kind, "crashed", error=ended.died or str(ended.error))
    row: ModelResult = ended.value
    return row


def _finish(r: _Running, row: ModelResult, zoo: Path, out: Path, options: BatchOptions) -> ModelResult:
    """Move a finished rewrite's files into place (each by rename) and mark it done; drop anything unfinished."""
    staging, out_folder = Path(r.task.staging), Path(r.task.out_folder)
    row.seconds = time.monotonic() - r.child.started
    try:
        if row.status in ("ok", "check_failed"):
            marker = out_folder / marker_name(row.prototxt)
            marker.unlink(missing_ok=True)  # it vouched for the outputs about to be replaced
            rel = Path(row.prototxt).parent
            for name in row.outputs:
                os.replace(staging / name, out_folder / name)
            row.outputs = [(rel / name).as_posix() for name in row.outputs]
            if row.status == "ok":
                saved = {"fingerprint": fingerprint_of(r.task.model, zoo, options), "result": asdict(row)}
                caffe_io.atomic_write_bytes(marker, json.dumps(saved, indent=2))
    except OSError as err:
        row.status, row.error = "failed", f"could not move the outputs into place: {err}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return row
