"""The original's outputs computed ahead in a second process (``deeprebirth.finetune.teacher_process``): the same
numbers as in-process, the same fine-tuned weights, nothing left running, and a lost process changes nothing."""

from __future__ import annotations

import multiprocessing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deeprebirth.caffe.data import Batches, Transform, open_data
from deeprebirth.finetune import FinetuneOptions, finetune_files
from deeprebirth.finetune.context import Teacher
from deeprebirth.finetune.teacher_cache import READS_PER_VIEW, TeacherCache, training_seconds_per_image
from deeprebirth.finetune.teacher_process import (
    ProcessLost,
    TeacherProcess,
    blas_threads,
    spare_cores,
    start_teacher_process,
)
from deeprebirth.finetune.train import SolverOptions
from deeprebirth.ir.model import load_model

PATHS = ("original", "original_weights", "slim", "slim_weights", "report", "data")


def _teacher_and_views(nets: dict[str, str]) -> tuple[Teacher, Batches]:
    teacher = Teacher(load_model(nets["original"]), Path(nets["original"]), nets["original_weights"], "data")
    transform = Transform(scale=1 / 255, mirror=True)
    return teacher, Batches(open_data(nets["data"], channels=3, input_size=(32, 32), transform=transform),
                            transform, (32, 32))


def _process(nets: dict[str, str], teacher: Teacher) -> TeacherProcess:
    return TeacherProcess(Path(nets["original"]), Path(nets["original_weights"]), "data", "classifier",
                          teacher.end_of("classifier"))


def _batches(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of 8 drawn from 16 images x 2 views (mirror), so that views repeat within and across batches."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 16, 8), rng.integers(0, 2, 8)) for _ in range(count)]


def test_the_second_process_gives_the_in_process_outputs_bit_for_bit(finetune_nets: dict[str, str]) -> None:
    teacher, views = _teacher_and_views(finetune_nets)
    here = TeacherCache(teacher, "classifier", cache_bytes=1e6)
    with _process(finetune_nets, teacher) as process:
        ahead = TeacherCache(teacher, "classifier", cache_bytes=1e6, process=process)
        batches = _batches(12)
        for k, (idx, keys) in enumerate(batches):
            expected = here.logits(idx, keys, views.view_batch(idx, keys))
            got = ahead.logits(idx, keys, views.view_batch(idx, keys))
            assert np.array_equal(got, expected), k
            if k + 1 < len(batches):  # as the trainer does: the next batch goes ahead while this one trains
                nxt = batches[k + 1]
                ahead.prefetch(nxt[0], nxt[1], views.view_batch(*nxt))
        assert ahead.pending == {} and process.next_ticket > 0
    assert (ahead.computed, ahead.reused) == (here.computed, here.reused)
    assert 0 < here.computed < 12 * 8
    assert not process.process.is_alive()


def test_a_lost_process_leaves_the_cache_computing_here(finetune_nets: dict[str, str]) -> None:
    teacher, views = _teacher_and_views(finetune_nets)
    here = TeacherCache(teacher, "classifier", cache_bytes=1e6)
    process = _process(finetune_nets, teacher)
    ahead = TeacherCache(teacher, "classifier", cache_bytes=1e6, process=process)
    (idx, keys), (idx2, keys2) = _batches(2, seed=1)
    ahead.prefetch(idx, keys, views.view_batch(idx, keys))
    process.process.kill()
    process.process.join()
    got = ahead.logits(idx, keys, views.view_batch(idx, keys))  # its answer never comes: computed here instead
    assert np.array_equal(got, here.logits(idx, keys, views.view_batch(idx, keys)))
    assert ahead.process is None and ahead.pending == {} and ahead.computed == here.computed
    ahead.prefetch(idx2, keys2, views.view_batch(idx2, keys2))  # no process: nothing goes ahead
    assert np.array_equal(ahead.logits(idx2, keys2, views.view_batch(idx2, keys2)),
                          here.logits(idx2, keys2, views.view_batch(idx2, keys2)))
    process.close()
    with pytest.raises(ProcessLost):
        process.submit(np.zeros((1, 3, 32, 32), np.float32))


def test_a_process_that_cannot_open_the_original_leaves_the_work_here(finetune_nets: dict[str, str],
                                                                      tmp_path: Path) -> None:
    """Caffe aborts a process whose weights it cannot read: the answer never comes, the cache computes here."""
    teacher, views = _teacher_and_views(finetune_nets)
    broken = tmp_path / "broken.caffemodel"
    broken.write_bytes(b"not a caffemodel")
    process = TeacherProcess(Path(finetune_nets["original"]), broken, "data", "classifier",
                             teacher.end_of("classifier"))
    cache = TeacherCache(teacher, "classifier", cache_bytes=1e6, process=process)
    here = TeacherCache(teacher, "classifier", cache_bytes=1e6)
    idx, keys = _batches(1, seed=2)[0]
    cache.prefetch(idx, keys, views.view_batch(idx, keys))
    assert np.array_equal(cache.logits(idx, keys, views.view_batch(idx, keys)),
                          here.logits(idx, keys, views.view_batch(idx, keys)))
    assert cache.process is None and not process.alive
    process.close()


@pytest.mark.parametrize("mode", ["mimic", "label"])
def test_a_finetune_run_writes_the_same_weights_with_and_without_the_process(finetune_nets: dict[str, str],
                                                                            tmp_path: Path, mode: str) -> None:
    if not spare_cores():
        pytest.skip("one core: no second process")
    options = FinetuneOptions(budget="120it", batch=16, transform=Transform(scale=1 / 255, mirror=True),
                              holdout=0.25, mode=mode, solver=SolverOptions("sgd", lr=0.01), hints="off")
    paths = [finetune_nets[k] for k in PATHS]
    with blas_threads(1):  # the run with the process puts Caffe's BLAS on the spare cores' complement: 1 here
        ahead = finetune_files(*paths, tmp_path / "ahead.caffemodel", options)
        here = finetune_files(*paths, tmp_path / "here.caffemodel", replace(options, teacher_process=False))
    assert (tmp_path / "ahead.caffemodel").read_bytes() == (tmp_path / "here.caffemodel").read_bytes()
    assert ahead.steps[-1].teacher_reuse == here.steps[-1].teacher_reuse
    assert ahead.steps[-1].teacher_reuse is not None and ahead.steps[-1].teacher_reuse > 0.3
    assert multiprocessing.active_children() == []  # the process ended with the run


def test_no_process_where_no_core_is_spare(finetune_nets: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import deeprebirth.finetune.teacher_process as module

    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: {0})
    assert module.spare_cores() == 0
    assert start_teacher_process(Path(finetune_nets["original"]), Path(finetune_nets["original_weights"]), "data",
                                 "classifier", "classifier") is None


def test_a_pace_with_the_original_ahead_is_the_slower_of_the_two() -> None:
    student, original = 1e-3, 8e-3
    assert training_seconds_per_image(student, original) == pytest.approx(3 * student + original / READS_PER_VIEW)
    assert training_seconds_per_image(student, original, ahead=True) == pytest.approx(3 * student)
    assert training_seconds_per_image(student, 40e-3, ahead=True) == pytest.approx(40e-3 / READS_PER_VIEW)


def test_blas_threads_are_set_inside_and_restored_after(finetune_nets: dict[str, str]) -> None:
    from deeprebirth.caffe.runtime import caffe_openblas

    _teacher_and_views(finetune_nets)  # Caffe, and so its OpenBLAS, loaded
    lib = caffe_openblas()
    if lib is None:
        pytest.skip("Caffe is not linked against OpenBLAS here")
    before = lib.openblas_get_num_threads()
    with blas_threads(1):
        assert lib.openblas_get_num_threads() == 1
    assert lib.openblas_get_num_threads() == before


def test_ctrl_c_is_left_to_the_parent(finetune_nets: dict[str, str]) -> None:
    """A terminal's Ctrl-C reaches the whole process group; the second process must neither die nor print a
    traceback of its own: the parent stops the run and closes the pipe."""
    import os
    import signal
    import time

    teacher, views = _teacher_and_views(finetune_nets)
    with _process(finetune_nets, teacher) as process:
        idx, keys = _batches(1, seed=3)[0]
        x = views.view_batch(idx, keys)
        first = process.result(process.submit(x))  # started and serving
        assert process.process.pid is not None
        os.kill(process.process.pid, signal.SIGINT)
        time.sleep(0.2)
        assert process.process.is_alive()
        assert np.array_equal(process.result(process.submit(x)), first)
    assert not process.process.is_alive()
