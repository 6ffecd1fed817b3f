"""The original's outputs for the next training batch, computed in a second process on a spare core while the
student trains on this one (``TeacherProcess``), and the BLAS threads of this process around it.

Caffe's CPU training runs one layer after another; on a 2-core machine OpenBLAS's second thread bought 1.2x on a
ResNet-50's student step and lost 22% on a 64x64 colour net's (measured: docs/decisions/teacher-process.md), so
one core stays nearly idle. The original's forward pass on the views not cached yet (``TeacherCache``) cost a
fifth of each iteration on a colour net. A process of its own, on one BLAS thread, runs it for batch k + 1 while the
student steps on batch k; the student keeps the other cores. The process computes exactly the rows the
iteration would have computed, as one batch, with the same net: the outputs are the same numbers.

At most one request is in flight (``submit`` first collects what came back), so neither side can block the
other on a full pipe. A process that dies or cannot start leaves the cache computing in-process, as without it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import numpy as np

from deeprebirth.caffe.runtime import caffe_openblas

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def spare_cores() -> int:
    """Cores this process may run on, less one for the second process: the student's share (0: none to spare)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, cores - 1)


@contextmanager
def blas_threads(threads: int) -> Iterator[None]:
    """Caffe's OpenBLAS on ``threads`` threads inside, as it was after (nothing where it is not OpenBLAS)."""
    lib = caffe_openblas()
    if lib is None:
        yield
        return
    before = int(lib.openblas_get_num_threads())
    lib.openblas_set_num_threads(int(threads))
    try:
        yield
    finally:
        lib.openblas_set_num_threads(before)


class TeacherProcess:
    """The original net (``prototxt``, ``weights``) in a spawned process: ``submit(x)`` returns a ticket,
    ``result(ticket)`` the ``blob`` of every image of ``x`` (float32)."""

    def __init__(self, prototxt: Path, weights: Path, input_name: str, blob: str, end: str) -> None:
        context = multiprocessing.get_context("spawn")  # a fork would copy Caffe's and OpenBLAS's threads' state
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, str(prototxt), str(weights), input_name, blob,
                                                            end), daemon=True, name="deeprebirth-teacher")
        self.process.start()
        child.close()
        self.next_ticket = 0
        self.in_flight: int | None = None
        self.done: dict[int, np.ndarray] = {}
        self.alive = True

    def submit(self, x: np.ndarray) -> int:
        self._collect()
        ticket = self.next_ticket
        self.next_ticket += 1
        try:
            self.connection.send((ticket, np.ascontiguousarray(x, dtype=np.float32)))
        except (OSError, ValueError):
            self.alive = False
            raise ProcessLost from None
        self.in_flight = ticket
        return ticket

    def result(self, ticket: int) -> np.ndarray:
        if ticket == self.in_flight:
            self._collect()
        return self.done.pop(ticket)

    def _collect(self) -> None:
        if self.in_flight is None:
            return
        try:
            ticket, out = self.connection.recv()
        except (EOFError, OSError):
            self.alive = False
            self.in_flight = None
            raise ProcessLost from None
        if isinstance(out, str):  # the process's own error, in one line
            self.alive = False
            self.in_flight = None
            raise ProcessLost(out)
        self.done[ticket] = out
        self.in_flight = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.connection.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def start_teacher_process(prototxt: Path, weights: Path, input_name: str, blob: str, end: str) -> TeacherProcess | None:
    """A ``TeacherProcess`` where a core is spare, else (or where it cannot start) None."""
    if not spare_cores():
        return None
    try:
        return TeacherProcess(prototxt, weights, input_name, blob, end)
    except OSError:
        return None


class ProcessLost(RuntimeError):
    """The second process ended or failed; the caller computes in-process from here on."""


def _serve(connection: Any, prototxt: str, weights: str, input_name: str, blob: str, end: str) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and closes the pipe, which ends this loop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in BLAS_ENV:  # read when Caffe's OpenBLAS loads, below
        os.environ[name] = "1"
    try:
        from deeprebirth.caffe.evaluate import set_input
        from deeprebirth.caffe.runtime import import_caffe

        caffe = import_caffe()
        net = caffe.Net(prototxt, caffe.TEST, weights=weights)
    except Exception as err:  # noqa: BLE001 (any failure to start is reported, then the parent goes on alone)
        connection.send((-1, f"the original could not be opened in the second process: {err}"))
        return
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        ticket, x = request
        set_input(net, input_name, x)
        net.forward(end=end)
        connection.send((ticket, np.array(net.blobs[blob].data, dtype=np.float32)))
