"""Rewrite every model in a folder tree (a "model zoo") in parallel worker processes, and summarise the results.

Finding the models (``discover``)
    Every ``*.prototxt`` / ``*.prototxt.txt`` under the zoo is a candidate (hidden folders and the output folder are
    not searched). Its text is sniffed, never parsed in this process:

    * a **solver** (file name with "solver", or solver fields such as ``base_lr``/``max_iter``) is recorded and
      skipped: it describes training, not a net;
    * a **training net** (``phase: TRAIN`` rules, data layers such as Data/ImageData/HDF5Data, or a loss) is
      recorded and skipped when its folder has a deploy net: the deploy net is what runs on the phone, and the
      train_val file would only repeat it with data and loss layers around it. A training net with *no* deploy net
      beside it is rewritten in phase TEST (Caffe's own filter), so a folder that ships only a train_val still gets
      its inference net rewritten;
    * anything else is a **deploy net**.

    Weights pair with a net by stem (``deploy.prototxt`` + ``deploy.caffemodel``), else a folder's only unpaired
    deploy net (among several: the only one named ``deploy*``) takes the folder's only unpaired ``*.caffemodel``
    (the model-zoo layout: ``deploy.prototxt`` next to ``bvlc_alexnet.caffemodel``). A caffemodel that pairs with
    nothing is recorded as skipped, with the reason.

Running them (``run_batch``)
    One spawned process per model, ``jobs`` at a time, each in its own process group with a per-model timeout.
    Caffe aborts the whole process on a fatal check, numpy can be killed by the OOM killer: a dead or overdue
    worker is recorded (with the last line it wrote to stderr, which for Caffe is the failed check) and the batch
    goes on. A ``concurrent.futures`` pool cannot do that: one dead worker breaks the whole pool, and a running task
    cannot be cancelled; so the workers are plain ``multiprocessing`` processes of the spawn context.

Outputs
    ``OUT_DIR/<relative folder>/`` gets the rewritten prototxt and caffemodel under their original names, the rewrite
    report ``<stem>.report.json`` and ``<stem>.batch.json`` (this model's summary row and a fingerprint of its
    inputs and options). A worker writes into a hidden staging folder; only a finished rewrite is moved into place,
    so a crash, a timeout or Ctrl-C leaves either a model's complete outputs or none. ``summary.json``,
    ``summary.csv`` and ``summary.md`` in OUT_DIR list every model found (also after Ctrl-C, for what finished).

Second runs
    A model whose ``<stem>.batch.json`` says it succeeded with the same inputs (their sha256) and the same options
    is not redone (``force`` redoes it). Failed models are always retried: a timeout or an out-of-memory kill may
    not happen again, and a fixed file should be picked up.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from deeprebirth import caffe_io
from deeprebirth.api import RewriteOptions
from deeprebirth.errors import DeepRebirthError
from deeprebirth.fingerprint import fingerprint
from deeprebirth.isolation import Child

PROTOTXT_SUFFIXES = (".prototxt.txt", ".prototxt")
CAFFEMODEL_SUFFIX = ".caffemodel"
STAGING_PREFIX = ".deeprebirth-staging-"
FAILED = ("check_failed", "failed", "crashed", "timeout")
SNIFF_BYTES = 1 << 20

_SOLVER = re.compile(r"^\s*(base_lr|lr_policy|max_iter|solver_mode|snapshot_prefix|train_net|test_iter|net)\s*:",
                     re.MULTILINE)
_DATA_TYPE_NAMES = (*caffe_io.DATA_LAYER_TYPES, *(v1 for v1, t in caffe_io.V1_LAYER_TYPES.items()
                                                   if t in caffe_io.DATA_LAYER_TYPES))
_TRAINING = re.compile(r"\bphase\s*:\s*TRAIN\b"
                       rf"|\btype\s*:\s*\"?({'|'.join(_DATA_TYPE_NAMES)})\b"
                       r"|\btype\s*:\s*\"?(SoftmaxWithLoss|SOFTMAX_LOSS|EuclideanLoss|EUCLIDEAN_LOSS)\b")


# ---------------------------------------------------------------------------------------------------------------
# what is found, what is done


@dataclass
class BatchOptions(RewriteOptions):
    """Every rewrite option (applied to each model; ``check`` only to models with weights), and the batch's own."""

    jobs: int | None = None  # worker processes; None: one per CPU
    timeout: float = 600.0  # seconds per model, rewrite and check together
    force: bool = False  # redo models that a previous run finished


@dataclass
class FoundModel:
    """A prototxt (or a lone caffemodel) found in the zoo; paths relative to the zoo, with "/"."""

    prototxt: str
    weights: str | None
    kind: str  # "deploy", "train_val", "solver", "caffemodel"
    skip: str = ""  # why it is not rewritten ("" : it is)


@dataclass
class ModelResult:
    """One row of the summary."""

    prototxt: str
    weights: str | None
    kind: str
    status: str  # "ok", "check_failed", "failed", "crashed", "timeout", "skipped", "interrupted"
    error: str = ""  # why it failed or was skipped
    layers_before: int | None = None
    layers_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    activation_bytes_before: int | None = None
    activation_bytes_after: int | None = None
    rules_fired: dict[str, int] = field(default_factory=dict)
    lossy: bool = False
    relearn: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    check: str = ""  # "passed ...", "lossy ...", "FAILED ...", "skipped: why", "" (not asked)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # relative to the output folder
    cached: bool = False  # finished by an earlier run with the same inputs and options

    @property
    def failed(self) -> bool:
        return self.status in FAILED


@dataclass
class BatchSummary:
    zoo_dir: str
    out_dir: str
    options: BatchOptions
    results: list[ModelResult]
    seconds: float
    interrupted: bool = False
    files: list[str] = field(default_factory=list)  # the summary files written

    @property
    def failed(self) -> list[ModelResult]:
        return [r for r in self.results if r.failed]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.results))

    def to_json(self) -> dict[str, Any]:
        return {"zoo_dir": self.zoo_dir, "out_dir": self.out_dir, "options": asdict(self.options),
                "seconds": round(self.seconds, 3), "interrupted": self.interrupted, "counts": self.counts,
                "models": [asdict(r) for r in self.results]}


# ---------------------------------------------------------------------------------------------------------------
# discovery


def _stem(name: str) -> str:
    for suffix in (*PROTOTXT_SUFFIXES, CAFFEMODEL_SUFFIX):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def sniff_kind(path: Path) -> str:
    """"solver", "train_val" or "deploy" from the file name and the first MiB of text (nothing is parsed)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES).decode("utf-8", errors="replace")
    except OSError:
        head = ""  # unreadable: a deploy candidate, whose worker reports the error
    name = path.name.lower()
    if "solver" in name or _SOLVER.search(head):
        return "solver"
    if _TRAINING.search(head) or re.search(r"train_?val|train_?test", name):
        return "train_val"
    return "deploy"


def discover(zoo_dir: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None) -> list[FoundModel]:
    """Every net, solver and caffemodel under ``zoo_dir`` (sorted by path), paired and classified."""
    zoo = Path(zoo_dir).resolve()
    skip_dir = Path(exclude).resolve() if exclude is not None else None
    found: list[FoundModel] = []
    for root, dirs, files in os.walk(zoo):
        folder = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (folder / d).resolve() != skip_dir)
        nets = sorted(f for f in files if f.endswith(PROTOTXT_SUFFIXES) and (folder / f).is_file())
        models = sorted(f for f in files if f.endswith(CAFFEMODEL_SUFFIX) and (folder / f).is_file())
        if not nets and not models:
            continue
        rel = folder.relative_to(zoo)

        def relpath(name: str, rel: Path = rel) -> str:
            return (rel / name).as_posix()

        kinds = {net: sniff_kind(folder / net) for net in nets}
        unpaired = list(models)
        weights: dict[str, str] = {}
        for net in nets:
            same = f"{_stem(net)}{CAFFEMODEL_SUFFIX}"
            if kinds[net] != "solver" and same in unpaired:
                weights[net] = same
                unpaired.remove(same)
        deploy = [n for n in nets if kinds[n] == "deploy"]
        loose = [n for n in deploy if n not in weights] or \
            ([n for n in nets if kinds[n] == "train_val" and n not in weights] if not deploy else [])
        if len(loose) > 1:  # several nets: the one named deploy* takes the folder's only caffemodel
            loose = [n for n in loose if n.lower().startswith("deploy")]
        if len(loose) == 1 and len(unpaired) == 1:
            weights[loose[0]] = unpaired.pop()
        for net in nets:
            kind, skip = kinds[net], ""
            if kind == "solver":
                skip = "solver file: describes training, not a net"
            elif kind == "train_val" and deploy:
                skip = f"training net: its folder's deploy net ({', '.join(deploy)}) is the one rewritten"
            found.append(FoundModel(relpath(net), relpath(weights[net]) if net in weights else None, kind, skip))
        for model in unpaired:
            found.append(FoundModel(relpath(model), None, "caffemodel",
                                    "no prototxt pairs with this caffemodel (give one the same stem)"))
    return sorted(found, key=lambda m: m.prototxt)


# ---------------------------------------------------------------------------------------------------------------
# one model (runs in a worker process)


@dataclass
class ModelTask:
    """What a worker needs: absolute paths in, a staging folder out."""

    model: FoundModel
    zoo_dir: str
    out_folder: str  # OUT_DIR/<relative folder>
    staging: str  # where the worker writes; moved into out_folder only when it finished
    options: BatchOptions


def rewrite_model(task: ModelTask) -> ModelResult:
    """Rewrite one model into ``task.staging`` and, if asked and possible, check it in real Caffe."""
    from deeprebirth.api import check_rewrite, rewrite_files

    m, zoo, staging = task.model, Path(task.zoo_dir), Path(task.staging)
    prototxt = zoo / m.prototxt
    weights = zoo / m.weights if m.weights else None
    out_proto = staging / prototxt.name
    out_weights = staging / weights.name if weights else None
    stem = _stem(prototxt.name)
    options = rewrite_options(task.options)
    # the check runs below, where a model Caffe cannot feed is skipped rather than failed
    checking = bool(options.check or options.images)
    result = rewrite_files(prototxt, out_proto, weights, out_weights, staging / f"{stem}.report.json",
                           dataclasses.replace(options, check=0, images=()), keep_original=checking)
    report = result.report
    assert report.after is not None
    row = ModelResult(m.prototxt, m.weights, m.kind, "ok")
    b, a = report.before, report.after
    row.layers_before, row.layers_after = b.layers, a.layers
    row.params_before, row.params_after = b.params, a.params
    row.macs_before, row.macs_after = b.macs, a.macs
    row.activation_bytes_before, row.activation_bytes_after = b.activation_bytes, a.activation_bytes
    row.rules_fired = dict(Counter(change.rule for change in report.changes))
    row.lossy = any(not change.exact for change in report.changes)
    row.relearn = report.relearn
    row.warnings = list(report.warnings)
    row.outputs = sorted(p.name for p in staging.iterdir())
    if checking:
        if weights is None or out_weights is None:
            row.check = "skipped: no caffemodel"
            return row
        original, rewritten = result.original, result.graph
        assert original is not None and rewritten is not None
        why = _cannot_check(original)
        if why:
            row.check = f"skipped: {why}"
            return row
        try:
            check = check_rewrite(original, rewritten, prototxt, weights, out_proto, out_weights, options,
                                  lossy=row.lossy)
        except DeepRebirthError as err:
            row.status, row.check, row.error = "check_failed", "FAILED", str(err)
            return row
        if check.lossy:
            row.check = f"lossy: output shapes kept on {check.inputs} inputs (re-learn {len(row.relearn)} layers)"
        elif check.passed:
            row.check = f"passed: worst relative error {check.worst.max_rel:.3g} on {check.inputs} inputs"
        else:
            row.status = "check_failed"
            row.check = (f"FAILED: worst relative error {check.worst.max_rel:.3g} (tolerance {check.tolerance:g}), "
                         f"{check.predictions_changed} predictions changed")
    return row


def rewrite_options(options: BatchOptions) -> RewriteOptions:
    """The rewrite part of batch options."""
    return RewriteOptions(**{f.name: getattr(options, f.name) for f in fields(RewriteOptions)})


def _cannot_check(graph: Any) -> str:
    from deeprebirth.shapes import SHAPE_FUNCTIONS, infer_shapes

    shapes = infer_shapes(graph)
    inputs = graph.inputs()
    if not inputs or any(shapes[b] is None for b in inputs):
        return "no Input layers of known shape to feed"
    odd = sorted({layer.type for layer in graph.layers()
                  if layer.type in caffe_io.DATA_LAYER_TYPES or layer.type not in SHAPE_FUNCTIONS})
    if odd:
        return f"layers Caffe would have to read files or run code for: {', '.join(odd)}"
    return ""


def _run_model(worker: Callable[[ModelTask], ModelResult], task: ModelTask) -> ModelResult:
    """A worker's body (in an isolated child, ``deeprebirth.isolation``): a user error or a bug becomes the row of
    a failed model, and the batch goes on."""
    start = time.perf_counter()
    try:
        row = worker(task)
    except DeepRebirthError as err:
        row = ModelResult(task.model.prototxt, task.model.weights, task.model.kind, "failed", error=str(err))
    except Exception as err:  # noqa: BLE001  (a bug in a rule or in the tool: recorded, the batch goes on)
        row = ModelResult(task.model.prototxt, task.model.weights, task.model.kind, "failed",
                          error=f"internal error (please report): {type(err).__name__}: {err}")
    row.seconds = time.perf_counter() - start
    return row


# ---------------------------------------------------------------------------------------------------------------
# the batch (runs in the caller's process)


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
    _remove_staging(out)
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
        cached = None if options.force else _cached(model, zoo, out, options)
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
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_stem(Path(model.prototxt).name)}-", dir=out_folder)
    task = ModelTask(model, str(zoo), str(out_folder), staging, options)
    child = Child(_run_model, worker, task, timeout=options.timeout, name=f"deeprebirth-batch-{index}")
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
            marker = out_folder / _marker_name(row.prototxt)
            marker.unlink(missing_ok=True)  # it vouched for the outputs about to be replaced
            rel = Path(row.prototxt).parent
            for name in row.outputs:
                os.replace(staging / name, out_folder / name)
            row.outputs = [(rel / name).as_posix() for name in row.outputs]
            if row.status == "ok":
                saved = {"fingerprint": _fingerprint(r.task.model, zoo, options), "result": asdict(row)}
                caffe_io.atomic_write_bytes(marker, json.dumps(saved, indent=2))
    except OSError as err:
        row.status, row.error = "failed", f"could not move the outputs into place: {err}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return row


def _marker_name(prototxt: str) -> str:
    return f"{_stem(Path(prototxt).name)}.batch.json"


def _fingerprint(model: FoundModel, zoo: Path, options: BatchOptions) -> str:
    """What a finished result depends on (``deeprebirth.fingerprint``): the input files' bytes, the rewrite
    options, the tool's version."""
    from deeprebirth import __version__

    files = [zoo / rel for rel in (model.prototxt, model.weights) if rel]
    return fingerprint(files, {"options": asdict(rewrite_options(options)), "version": __version__})


def _cached(model: FoundModel, zoo: Path, out: Path, options: BatchOptions) -> ModelResult | None:
    marker = out / Path(model.prototxt).parent / _marker_name(model.prototxt)
    try:
        saved = json.loads(marker.read_text())
        if saved["fingerprint"] != _fingerprint(model, zoo, options):
            return None
        known = {f.name for f in fields(ModelResult)}
        row = ModelResult(**{k: v for k, v in saved["result"].items() if k in known})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if row.status != "ok" or not all((out / name).is_file() for name in row.outputs):
        return None
    row.cached = True
    return row


def _remove_staging(out: Path) -> None:
    """Staging folders left by a run that was killed outright (SIGKILL, power loss)."""
    for path in out.rglob(f"{STAGING_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# summary files


CSV_COLUMNS = ["prototxt", "weights", "kind", "status", "cached", "layers_before", "layers_after", "params_before",
               "params_after", "macs_before", "macs_after", "activation_bytes_before", "activation_bytes_after",
               "rules_fired", "lossy", "check", "seconds", "warnings", "error"]


def _fired(row: ModelResult) -> str:
    return " ".join(f"{rule}x{n}" for rule, n in row.rules_fired.items())


def summary_csv(summary: BatchSummary) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in summary.results:
        values = asdict(row)
        values["rules_fired"] = _fired(row)
        values["warnings"] = " | ".join(row.warnings)
        values["seconds"] = f"{row.seconds:.2f}"
        writer.writerow(["" if values[c] is None else values[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


def _arrow(before: int | None, after: int | None, scale: float = 1.0, unit: str = "") -> str:
    if before is None or after is None:
        return ""
    if scale == 1.0:
        return f"{before} → {after}"
    return f"{before / scale:.1f} → {after / scale:.1f}{unit}"


def summary_markdown(summary: BatchSummary) -> str:
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
    headers = ["model", "weights", "status", "layers", "params (M)", "MACs (G)", "activations (MiB)", "rules fired",
               "check", "time (s)", "note"]
    lines = [f"# deeprebirth batch: {summary.zoo_dir} → {summary.out_dir}", "",
             (f"{len(summary.results)} entries: {counts}; rules `{summary.options.rules}`, "
              f"{summary.seconds:.1f} s{' (interrupted)' if summary.interrupted else ''}"), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in summary.results:
        note = r.error or " ".join(r.warnings)
        status = r.status + (" (cached)" if r.cached else "")
        lines.append("| " + " | ".join(cell(c) for c in [
            r.prototxt, r.weights or "", status, _arrow(r.layers_before, r.layers_after),
            _arrow(r.params_before, r.params_after, 1e6), _arrow(r.macs_before, r.macs_after, 1e9),
            _arrow(r.activation_bytes_before, r.activation_bytes_after, 2**20), _fired(r), r.check,
            f"{r.seconds:.1f}" if r.seconds else "", note]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: BatchSummary, out: Path) -> list[str]:
    """summary.json, summary.csv, summary.md in ``out``, each written atomically."""
    texts = {"summary.json": json.dumps(summary.to_json(), indent=2), "summary.csv": summary_csv(summary),
             "summary.md": summary_markdown(summary)}
    for name, text in texts.items():
        caffe_io.atomic_write_bytes(out / name, text)
    return [str(out / name) for name in texts]
