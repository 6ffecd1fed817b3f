"""Running Caffe where its aborts cannot reach the caller: every Caffe run that may meet a net Caffe refuses (the
equivalence check, profiling, evaluation, each model of a batch) goes through ``Child`` or ``run_isolated``.

Caffe ends the whole process on a failed check (glog ``LOG(FATAL)``, then abort), and numpy may be killed by the
OOM killer. So the work runs in a child process of the spawn context (a fresh interpreter: no forked Caffe or BLAS
state) that

* leads its own process group, so stopping it also stops anything it started;
* writes its stdout and stderr (glog's lines included) to a log file the parent reads when it dies;
* has glog silenced below errors (``quiet_glog``: the one place that sets ``GLOG_minloglevel``) unless the user
  set the variable;
* is stopped (the whole group) when its time is up, or when the parent stops waiting (Ctrl-C).

Why a child died: the *last* glog fatal line in its log (``F1125 12:00:00.000000 42 net.cpp:42] Check failed:
...``), else the last line. glog writes one fatal line per LOG(FATAL) and aborts right after it, so the last
fatal line is the one that killed the process; an earlier one can only come from an earlier, survived run in the
same log (e.g. Caffe's own check of a layer whose error a caller caught), which is not why the process ended.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from deeprebirth.errors import DeepRebirthError

_FATAL = re.compile(r"^F\d{4}")  # glog: F then MMDD (newer glog: YYYYMMDD), time, thread, file:line] message


def quiet_glog(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Caffe's logging below errors silenced, unless the user chose a level."""
    environ.setdefault("GLOG_minloglevel", "2")


def fatal_line(output: str) -> str:
    """Why a Caffe process died, from what it wrote (see the module docstring): the message of the last glog
    fatal line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    fatal = [line for line in lines if _FATAL.match(line)]
    if fatal:
        return fatal[-1].split("] ", 1)[-1][:300]
    return lines[-1][:300] if lines else ""


@dataclass
class Ended:
    """How a child ended: ``value`` (it returned), ``error`` (it raised; re-raised by ``result``), or ``died``
    (crashed or stopped: why, in words)."""

    value: Any = None
    error: BaseException | None = None
    died: str = ""
    timed_out: bool = False

    def result(self, what: str, runner: str = "Caffe") -> Any:
        """The value; the child's exception; or DeepRebirthError saying how ``what`` died."""
        if self.error is not None:
            raise self.error
        if self.died:
            raise DeepRebirthError(f"{runner} aborted while running {what}: {self.died}" if not self.timed_out else
                                   f"{what}: {self.died}")
        return self.value


@contextlib.contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    """``env`` set while a child starts (a spawned child inherits os.environ as it is then)."""
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _child_main(target: Callable[..., Any], args: tuple[Any, ...], conn: Connection, log_path: str) -> None:
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the group
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    quiet_glog()
    try:
        outcome = Ended(value=target(*args))
    except Exception as err:  # noqa: BLE001  (sent to the parent, which raises it)
        outcome = Ended(error=err)
    try:
        conn.send(outcome)
    except Exception as err:  # noqa: BLE001  (an exception that does not pickle)
        conn.send(Ended(error=DeepRebirthError(f"{type(err).__name__}: {err}")))
    conn.close()


class Child:
    """``target(*args)`` running in an isolated child (see the module docstring); ``poll`` it, or ``wait``."""

    def __init__(self, target: Callable[..., Any], *args: Any, timeout: float | None = None,
                 env: Mapping[str, str] | None = None, name: str = "deeprebirth-child") -> None:
        context = get_context("spawn")
        handle, self.log = tempfile.mkstemp(prefix="deeprebirth-child-", suffix=".log")
        os.close(handle)
        self.conn, child_end = context.Pipe(duplex=False)
        self.process = context.Process(target=_child_main, args=(target, args, child_end, self.log), name=name)
        with _environment(env):
            self.process.start()
        child_end.close()
        self.started = time.monotonic()
        self.timeout = timeout
        self.deadline = self.started + timeout if timeout is not None else float("inf")

    @property
    def waitables(self) -> list[Any]:
        """What ``multiprocessing.connection.wait`` should watch for this child."""
        return [self.conn, self.process.sentinel]

    def poll(self) -> Ended | None:
        """How it ended, or None while it runs (a child past its deadline is stopped and reported)."""
        if self.conn.poll():
            try:
                ended: Ended = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(timeout=10)  # it died before sending: judged below from its exit code
            else:
                self.process.join(timeout=30)
                self.kill()  # anything it started that outlived it
                return ended
        if not self.process.is_alive():
            self.process.join()
            code = self.process.exitcode or 0
            how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else \
                f"exit code {code}"
            last = fatal_line(Path(self.log).read_text(errors="replace")) if os.path.exists(self.log) else ""
            self.kill()
            return Ended(died=f"the process died ({how}){': ' + last if last else ''}")
        if time.monotonic() > self.deadline:
            self.kill()
            return Ended(died=f"not finished after {self.timeout:g} s (stopped)", timed_out=True)
        return None

    def wait(self) -> Ended:
        """Block until it ends (or its deadline passes); Ctrl-C stops it and propagates."""
        try:
            while True:
                ended = self.poll()
                if ended is not None:
                    return ended
                wait(self.waitables, timeout=max(0.0, min(self.deadline - time.monotonic(), 3600.0)))
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop the child and everything it started (its process group); remove its log."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.process.pid is not None:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=10)
        self.conn.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log)


def run_isolated(target: Callable[..., Any], *args: Any, what: str, timeout: float | None = None,
                 env: Mapping[str, str] | None = None, runner: str = "Caffe") -> Any:
    """``target(*args)`` in an isolated child: its value, its exception, or DeepRebirthError saying how ``what``
    died (with Caffe's fatal line; ``runner``: what ran it) or ran past ``timeout`` seconds."""
    return Child(target, *args, timeout=timeout, env=env).wait().result(what, runner)
