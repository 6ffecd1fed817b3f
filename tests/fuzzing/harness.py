"""One fuzz case through the real CLI, judged by the contract in the package docstring; the fuzz loop; real
Caffe in a worker process."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import signal
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from click.testing import CliRunner

from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.model import load_model

from .mutators import Case, make_case, make_seeds

# ---------------------------------------------------------------------------------------------------------------
# running one case through the CLI


@dataclass
class Outcome:
    kind: str  # "ok", "error" (a clean DeepRebirthError) or "crash"
    detail: str  # for errors: the message with paths and numbers blanked; for crashes: what went wrong
    message: str = ""  # for errors: the line as printed


class Hang(BaseException):
    """Raised by the alarm when a case runs too long (a BaseException, so no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_kind(line: str) -> str:
    """A clean error's message with file names, quoted names and numbers blanked, for counting by kind."""
    text = line.removeprefix("error: ")
    text = re.sub(r"\S*(case|in|out)\.(prototxt|caffemodel)\S*", "FILE", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r'"[^"]*"', '"…"', text)
    text = re.sub(r"(Expected|got|found:?) .*", r"\1 …", text)
    text = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", text)
    text = re.sub(r"\([^)]*\)", "(…)", text)
    return text[:90]


def _crash_where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "deeprebirth" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}: {str(exc)[:120]}"


def run_case(case: Case, folder: Path, rules: str = "all", timeout: float = 20.0) -> Outcome:
    """Run ``deeprebirth rewrite`` on the case in ``folder`` (emptied first) and judge the result."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    proto, model = folder / "in.prototxt", folder / "in.caffemodel"
    proto.write_bytes(case.prototxt)
    args = ["rewrite", str(proto), str(folder / "out.prototxt"), "--rules", rules]
    if case.caffemodel is not None:
        model.write_bytes(case.caffemodel)
        args += ["--weights", str(model), "--out-weights", str(folder / "out.caffemodel")]
    try:
        # Python warnings (numpy's RuntimeWarning ...) are more lines on the user's stderr; pytest would swallow them
        with _alarm(timeout), warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=hidden)  # as a plain `deeprebirth` process hides them
            result = CliRunner().invoke(main, args)
    except Hang:
        return Outcome("crash", f"hang: more than {timeout:g} s")
    if warned:
        where = f"{Path(warned[0].filename).name}:{warned[0].lineno}"
        return Outcome("crash", f"warning printed: {warned[0].category.__name__} at {where}: {warned[0].message}")
    inputs = {"in.prototxt", "in.caffemodel"}
    left = sorted(p.name for p in folder.iterdir() if p.name not in inputs)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return Outcome("crash", _crash_where(result.exception))
    if result.exit_code == 0:
        wanted = ["out.caffemodel", "out.prototxt"] if case.caffemodel is not None else ["out.prototxt"]
        if left != wanted:
            return Outcome("crash", f"ok, but the folder holds {left}")
        try:
            load_model(folder / "out.prototxt", folder / "out.caffemodel" if case.caffemodel is not None else None)
        except DeepRebirthError as err:
            return Outcome("crash", f"ok, but the output does not load again: {err}")
        return Outcome("ok", "")
    lines = result.stderr.strip().splitlines()
    if result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]:
        if left:
            return Outcome("crash", f"clean error, but files were left: {left}")
        return Outcome("error", error_kind(lines[0]), lines[0])
    return Outcome("crash", f"exit {result.exit_code}: {' | '.join(lines[-3:])[:200]}")


@dataclass
class FuzzStats:
    cases: int = 0
    ok: int = 0
    errors: int = 0
    crashes: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    crash_kinds: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    crash_cases: list[tuple[Case, Outcome]] = field(default_factory=list)

    def add(self, case: Case, outcome: Outcome) -> None:
        self.cases += 1
        self.mutations.update(case.mutations)
        if outcome.kind == "ok":
            self.ok += 1
        elif outcome.kind == "error":
            self.errors += 1
            self.error_kinds[outcome.detail] += 1
        else:
            self.crashes += 1
            self.crash_kinds[outcome.detail] += 1
            if len(self.crash_cases) < 50:
                self.crash_cases.append((case, outcome))


def fuzz(cases: int, folder: Path, seed: int = 0, seeds: int = 12, rules: str = "all",
         on_case: Callable[[int, Case, Outcome], None] | None = None) -> FuzzStats:
    """Run ``cases`` mutated inputs, made from ``seeds`` random valid nets; reproducible for a given ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    seed_dir = folder / "seeds"
    seed_dir.mkdir(exist_ok=True)
    pool = make_seeds(seeds, seed_dir, seed)
    rng = random.Random(seed)
    stats = FuzzStats()
    for i in range(cases):
        case = make_case(pool, rng, i)
        outcome = run_case(case, folder / "case", rules)
        stats.add(case, outcome)
        if on_case is not None:
            on_case(i, case, outcome)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# real Caffe, in a worker process


def caffe_outputs(prototxt: str, caffemodel: str, feed: dict[str, Any], blobs: Sequence[str]) -> dict[str, Any]:
    """Forward once in pycaffe; meant to run in a spawned worker, where a Caffe abort cannot kill the tests."""
    from deeprebirth.caffe.runtime import forward, open_net

    return forward(open_net(prototxt, caffemodel), feed, list(blobs))
