"""The learning-rate choice, the batch rule, the cached original's outputs and the back-off (issue 16)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deeprebirth import caffe_pb2 as pb
from deeprebirth.caffe.data import CROP_BANK, Batches, DataSet, Transform
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune import FinetuneOptions, finetune_files
from deeprebirth.finetune.budget import Budget
from deeprebirth.finetune.driver import MIN_UPDATES, choose_batch
from deeprebirth.finetune.phase import keeps
from deeprebirth.finetune.phase_types import PhaseSpec
from deeprebirth.finetune.probes import gradient_scale, loss_rate
from deeprebirth.finetune.search import (
    ADAPTIVE,
    FEW_FACTORS,
    LR_FACTORS,
    MIN_PROBE,
    Candidate,
    choose,
    default_loss_first,
    next_rate,
    next_solver,
    pick_rate,
    pick_solver,
    plan_probes,
    reference_rate,
    significantly_worse,
)
from deeprebirth.finetune.teacher_cache import TeacherCache
from deeprebirth.finetune.train import SolverOptions


def test_a_difference_within_the_noise_is_not_significant() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 1.0, 400)
    noisy = base + rng.normal(0.0, 0.5, 400)  # same mean, paired noise
    assert not significantly_worse(noisy, base) and not significantly_worse(base, noisy)
    assert significantly_worse(base + 0.2, base + rng.normal(0, 0.5, 400) * 0.1)  # a clear, consistent gap
    assert significantly_worse(np.full(10, np.inf), base[:10]) and not significantly_worse(base[:10], np.full(10, np.inf))


def test_the_reference_rate_stays_unless_a_higher_one_is_better_beyond_the_noise() -> None:
    rng = np.random.default_rng(1)
    truth = rng.normal(1.0, 0.3, 300)
    start = truth + 1.0
    scores = {Candidate("sgd", 1e-3): truth - 0.3, Candidate("sgd", 3e-3): truth - 0.2,  # lower rates look better,
              Candidate("sgd", 1e-2): truth + 0.005 + rng.normal(0, 0.2, 300),       # but cost top-1 (removed.md)
              Candidate("sgd", 3e-2): truth + rng.normal(0, 0.2, 300)}
    assert pick_rate(scores, start, 1e-2) == Candidate("sgd", 1e-2)  # 0.03 better only by noise, lower rates ignored
    scores[Candidate("sgd", 3e-2)] = truth - 0.3  # now clearly better
    assert pick_rate(scores, start, 1e-2) == Candidate("sgd", 3e-2)
    # the reference made things worse than the start: the highest lower rate that improved on it
    worse = dict(scores)
    worse[Candidate("sgd", 1e-2)] = start + 0.5
    worse[Candidate("sgd", 3e-2)] = np.full(300, np.inf)
    assert pick_rate(worse, start, 1e-2) == Candidate("sgd", 3e-3)
    assert pick_rate({c: start + 1 for c in scores}, start, 1e-2) is None  # nothing improved: the caller rescues


def test_probing_outward_from_the_reference_makes_the_full_grids_choice_with_fewer_probes() -> None:
    rng = np.random.default_rng(3)
    grid = tuple(Candidate("sgd", 0.01 * f) for f in LR_FACTORS)
    probes_run = []
    for trial in range(400):
        start = rng.normal(2.0, 0.3, 200)
        # each rate's probe: better or worse than the start by a random shift, some diverged, with per-image noise
        full = {c: (np.full(200, np.inf) if rng.random() < 0.1 else
                    start + rng.normal(0, 0.4) + rng.normal(0, 0.3, 200)) for c in grid}
        run: dict[Candidate, np.ndarray] = {}
        while (candidate := next_rate(grid, run, start, 0.01)) is not None:
            assert candidate not in run
            run[candidate] = full[candidate]
        assert pick_rate(run, start, 0.01) == pick_rate(full, start, 0.01), trial
        probes_run.append(len(run))
    assert np.mean(probes_run) < 0.75 * len(grid)  # about 2.5 of 4 here (the reference improves half the time)
    few = tuple(Candidate("sgd", 0.01 * f) for f in FEW_FACTORS)
    start = np.full(50, 2.0)
    assert next_rate(few, {few[1]: start - 0.5}, start, 0.01) is None  # the reference improved: nothing above it


def test_another_loss_wins_only_beyond_the_noise() -> None:
    rng = np.random.default_rng(2)
    truth = rng.normal(1.0, 0.3, 300)
    close = {Candidate("sgd", 1e-2): truth, Candidate("sgd", 1e-2, "kd1"): truth - 0.001 + rng.normal(0, 0.1, 300),
             Candidate("sgd", 1e-2, "regression"): truth + 0.1}
    assert choose(close, default_loss_first).loss == "kd"
    far = dict(close)
    far[Candidate("sgd", 1e-2, "regression")] = truth - 0.4
    assert choose(far, default_loss_first).loss == "regression"


def test_without_labels_adam_replaces_sgds_rate_only_beyond_the_noise() -> None:
    rng = np.random.default_rng(4)
    truth = rng.normal(1.0, 0.3, 300)
    sgd = Candidate("sgd", 6.25e-3)
    solver, first, (lower, higher) = ADAPTIVE
    head, low, high = Candidate(solver, first), Candidate(solver, lower), Candidate(solver, higher)
    assert next_solver({sgd: truth}, sgd) == head
    # the first rate level with SGD's (better by noise only): the lower one is read, against SGD's
    level = {sgd: truth, head: truth - 0.002 + rng.normal(0, 0.1, 300)}
    assert next_solver(level, sgd) == low and pick_solver(level, sgd) == sgd
    lower_won = {**level, low: truth - 0.2}
    assert pick_solver(lower_won, sgd) == low and next_solver(lower_won, sgd) is None
    assert pick_solver({**level, low: truth + rng.normal(0, 0.1, 300)}, sgd) == sgd
    # the first rate clearly better: the higher one is read, against it
    clear = {sgd: truth, head: truth - 0.2}
    assert next_solver(clear, sgd) == high and pick_solver(clear, sgd) == head
    assert pick_solver({**clear, high: truth - 0.2 + rng.normal(0, 0.1, 300)}, sgd) == head
    higher_won = {**clear, high: truth - 0.4}
    assert pick_solver(higher_won, sgd) == high and next_solver(higher_won, sgd) is None
    assert pick_solver({**clear, high: np.full(300, np.inf)}, sgd) == head  # a diverged probe never wins


def phase(objective: str, temperature: float) -> PhaseSpec:
    net = pb.NetParameter()
    return PhaseSpec(1, "whole net", net, {}, lambda name: [], [], net, "z", "t", {}, objective, objective == "label",
                     temperature, 0.5)


def test_each_loss_is_probed_at_the_rate_its_gradient_scale_asks() -> None:
    chosen = Candidate("sgd", 0.01)
    label, mimic, mimic_t4 = phase("label", 4.0), phase("kd", 1.0), phase("kd", 4.0)
    # label mode: 0.5 CE + 0.5 KD at T=4 (scale 2.5) against 0.5 CE + 0.5 KD at T=1 (scale 1)
    assert loss_rate(label, "kd1", chosen) == pytest.approx(0.025)
    assert loss_rate(label, "regression", chosen) == pytest.approx(0.01)
    # mimic mode given --temperature 1: regression is rated as KD at T=4, four times the pull
    assert loss_rate(mimic, "regression", chosen) == pytest.approx(0.0025)
    assert loss_rate(mimic_t4, "kd1", chosen) == pytest.approx(0.04)
    assert loss_rate(mimic_t4, "regression", chosen) == pytest.approx(0.01)
    assert loss_rate(mimic, "regression", Candidate("adam", 1e-4)) == 1e-4  # Adam normalises its steps
    # a phase that trains regression starts from the same rate whatever the temperature
    assert gradient_scale(replace(mimic, output_loss="regression")) == gradient_scale(
        replace(mimic_t4, output_loss="regression")) == 4.0
    assert reference_rate("sgd", 32, gradient_scale(mimic)) == pytest.approx(0.025)


def test_probes_shrink_where_iterations_are_expensive() -> None:
    cheap = plan_probes("sgd", fit_iterations=20000, seconds_per_iteration=0.01, seconds_per_image=1e-4,
                        held_out=2000, reference=0.01)
    assert [c.lr for c in cheap.candidates] == pytest.approx([0.01 * f for f in LR_FACTORS])
    assert cheap.iterations == 200 and cheap.images == 512  # capped
    middle = plan_probes("sgd", fit_iterations=300, seconds_per_iteration=1.0, seconds_per_image=0.01,
                         held_out=500, reference=0.01)
    assert [c.lr for c in middle.candidates] == pytest.approx([0.01 * f for f in FEW_FACTORS])
    assert middle.iterations >= MIN_PROBE
    costly = plan_probes("sgd", fit_iterations=100, seconds_per_iteration=4.0, seconds_per_image=0.05,
                         held_out=500, reference=0.01)
    assert costly.candidates == () and "too few iterations" in costly.reason
    assert plan_probes("sgd", 1e6, None, 0.0, 0, 0.01).candidates == ()


def test_the_reference_rate_follows_the_batch_and_the_losss_pull() -> None:
    assert reference_rate("sgd", 32, 2.5) == pytest.approx(0.01)  # label mode: w 0.5, T 4
    assert reference_rate("sgd", 8, 2.5) == pytest.approx(0.0025)  # linear scaling with the batch
    assert reference_rate("sgd", 32, 4.0) == pytest.approx(0.00625)  # distillation alone at T=4 pulls harder
    assert reference_rate("adam", 8, 4.0) == pytest.approx(3e-4)  # adaptive steps: unchanged
    assert reference_rate("adam", 8, 4.0, distilling=True) == pytest.approx(1e-3)  # without labels
    assert reference_rate("rmsprop", 8, 4.0, distilling=True) == pytest.approx(3e-4)


def test_the_batch_follows_the_pace() -> None:
    minutes7 = Budget.parse("7m")
    assert choose_batch(None, minutes7, 500, seconds_per_image=0.001)[0] == 32  # a cheap net
    batch, rule = choose_batch(None, minutes7, 500, seconds_per_image=0.05)  # an ImageNet-size net on a CPU
    assert batch == 8 and "updates" in rule
    assert choose_batch(None, minutes7, 500, seconds_per_image=0.012)[0] == 16
    assert choose_batch(12, minutes7, 500, 0.05) == (12, "given")
    assert choose_batch(None, Budget.parse("300it"), 500, 0.05)[0] == 32
    assert choose_batch(None, Budget.parse("2ep"), 500, 0.05)[0] == 8  # 1000 images buy 125 updates of 8
    assert choose_batch(None, Budget.parse("2ep"), 100000, 0.05)[0] == 32
    assert 2 * 100000 / 32 >= MIN_UPDATES


def _photos(count: int = 6, size: int = 10) -> DataSet:
    rng = np.random.default_rng(3)
    return DataSet("memory", 3, (size, size), np.arange(count) % 2,
                   array=rng.integers(0, 255, (count, 3, size, size)).astype(np.float32))


def test_views_are_a_fixed_finite_set_of_crops_and_mirrors() -> None:
    batches = Batches(_photos(), Transform(crop=8, mirror=True), (8, 8), bank_seed=5)
    assert batches.views == 2 * CROP_BANK
    idx = np.array([0, 1, 2, 0])
    views = np.array([0, 3, 5, 1])
    first = batches.view_batch(idx, views)
    assert first.shape == (4, 3, 8, 8)
    assert np.array_equal(first, batches.view_batch(idx, views))  # the same view, the same pixels
    assert np.array_equal(first[3], first[0][..., ::-1])  # view 1 mirrors view 0
    again = Batches(_photos(), Transform(crop=8, mirror=True), (8, 8), bank_seed=5)
    assert np.array_equal(first, again.view_batch(idx, views))
    assert Batches(_photos(size=8), Transform(mirror=True), (8, 8)).views == 2
    assert Batches(_photos(size=8), Transform(), (8, 8)).views == 1


def test_a_grown_crop_bank_draws_distinct_crops_up_to_every_position() -> None:
    batches = Batches(_photos(count=5, size=11), Transform(crop=8), (8, 8), bank_seed=2)  # 4 x 4 = 16 positions
    assert batches.crop_positions == 16 and batches.views == CROP_BANK
    assert batches.set_crop_bank(10) == 10 and batches.views == 10
    images = batches.batch(np.arange(5))  # centred crops of the same images, to find each view's position
    whole = batches._normalised(np.arange(5))
    for image in range(5):
        crops = batches.view_batch(np.full(10, image), np.arange(10))
        found = {(t, s) for crop in crops for t in range(4) for s in range(4)
                 if np.array_equal(crop, whole[image, :, t:t + 8, s:s + 8])}
        assert len(found) == 10  # ten distinct positions, each view one of them
    assert np.array_equal(images[0], whole[0, :, 1:9, 1:9])
    assert batches.set_crop_bank(100) == 16  # at most every position ...
    crops = batches.view_batch(np.zeros(16, dtype=np.int64), np.arange(16))
    assert len({crop.tobytes() for crop in crops}) == 16  # ... and then every one of them
    assert Batches(_photos(size=8), Transform(mirror=True), (8, 8)).set_crop_bank(9) == 1  # no random crop


def test_the_crop_bank_grows_with_the_passes_the_budget_buys() -> None:
    from deeprebirth.finetune.teacher_cache import READS_PER_VIEW, choose_crop_bank

    train = Batches(_photos(count=100, size=40), Transform(crop=32, mirror=True), (32, 32))  # 81 positions
    assert choose_crop_bank(train, Budget.parse("2ep"), 100, 0.01, 32)[0] == CROP_BANK  # few passes: the default
    crops, words = choose_crop_bank(train, Budget.parse("64ep"), 100, 0.01, 32)
    assert crops == 64 // (2 * READS_PER_VIEW) and "8 of 81 crop positions per image x mirror" in words
    assert "64 passes" in words and "read about 4.0 times" in words
    assert choose_crop_bank(train, Budget.parse("1000ep"), 100, 0.01, 32)[0] == 81  # every position, no more
    assert choose_crop_bank(train, Budget.parse("1600it"), 100, 0.01, 32)[0] == 1600 * 32 // 100 // 8  # 64
    # a time budget: the passes its training part buys at the given seconds per training image
    from deeprebirth.finetune.budget import EVAL_SHARE
    from deeprebirth.finetune.search import SEARCH_SHARE

    passes = 420 * (1 - SEARCH_SHARE - EVAL_SHARE) / (0.002 * 100)
    crops, words = choose_crop_bank(train, Budget.parse("7m"), 100, 0.002, 32)
    assert crops == min(81, int(np.ceil(passes / (2 * READS_PER_VIEW)))) and f"about {passes:.0f} passes" in words
    assert choose_crop_bank(train, Budget.parse("7m"), 100, 0.2, 32)[0] == CROP_BANK  # dear iterations: few passes
    flat = Batches(_photos(count=100, size=32), Transform(mirror=True), (32, 32))
    assert choose_crop_bank(flat, Budget.parse("1000ep"), 100, 0.01, 32) == (1, "")


class _CountingTeacher:
    def __init__(self) -> None:
        self.images = 0

    def outputs(self, x: np.ndarray, blobs: list[str]) -> dict[str, np.ndarray]:
        self.images += len(x)
        return {blobs[0]: x.reshape(len(x), -1)[:, :4].copy()}


def test_the_originals_outputs_are_computed_once_per_image_and_view() -> None:
    batches = Batches(_photos(), Transform(crop=8, mirror=True), (8, 8))
    teacher = _CountingTeacher()
    cache = TeacherCache(teacher, "logits", cache_bytes=1e6)
    idx, views = np.array([0, 1, 0, 2]), np.array([1, 1, 1, 4])
    x = batches.view_batch(idx, views)
    out = cache.logits(idx, views, x)
    assert teacher.images == 3  # (0, 1) twice in the batch: run once
    assert np.array_equal(out, x.reshape(4, -1)[:, :4])
    again = cache.logits(idx, views, batches.view_batch(idx, views))
    assert teacher.images == 3 and np.array_equal(again, out) and cache.reused == 5
    small = TeacherCache(_CountingTeacher(), "logits", cache_bytes=16)  # room for one row of 4 floats
    small.logits(idx, views, x)
    small.logits(idx, views, x)
    assert small.teacher.images == 5 and len(small.stored) == 1


def test_backoff_when_nothing_improves(finetune_nets: dict[str, str], tmp_path: Path) -> None:
    """SGD at a rate that wrecks the net: the phase restarts from its start at a third of the rate, which still
    wrecks it, then at Adam 1e-4, and goes on."""
    options = FinetuneOptions(budget="400it", batch=16, transform=Transform(scale=1 / 255), holdout=0.25,
                              mode="mimic", solver=SolverOptions("sgd", lr=50.0), patience=2)
    result = finetune_files(finetune_nets["original"], finetune_nets["original_weights"], finetune_nets["slim"],
                            finetune_nets["slim_weights"], finetune_nets["report"], finetune_nets["data"],
                            tmp_path / "final.caffemodel", options)
    step = result.steps[-1]
    assert len(step.backoffs) == 2, step.backoffs  # SGD at a third of the rate first (still too high), then Adam
    assert "restarted from the start at sgd 16.6667" in step.backoffs[0], step.backoffs
    assert "restarted from the start at adam 0.0001" in step.backoffs[1], step.backoffs
    assert step.solver == "adam" and step.lr == pytest.approx(1e-4)
    assert step.best_iteration > 0, step.checkpoints  # after the back-off, it did improve on the start
    assert step.agreement_after >= step.agreement_before  # type: ignore[operator]


def test_a_run_reports_its_pace_and_reuse(finetune_nets: dict[str, str], tmp_path: Path) -> None:
    options = FinetuneOptions(budget="3ep", transform=Transform(scale=1 / 255, mirror=True), holdout=0.25,
                              mode="mimic", solver=SolverOptions("adam", lr=1e-3), patience=0, hints="off")
    result = finetune_files(finetune_nets["original"], finetune_nets["original_weights"], finetune_nets["slim"],
                            finetune_nets["slim_weights"], finetune_nets["report"], finetune_nets["data"],
                            tmp_path / "final.caffemodel", replace(options))
    step = result.steps[-1]
    # 72 training images, 3 epochs: 216 images buy 27 updates of 8 (under MIN_UPDATES at any batch: the smallest)
    assert result.batch == 8 and "updates" in result.batch_rule
    assert step.iterations == 27
    assert step.images_per_second > 0
    # 2 views (mirror) x 72 images = 144 distinct inputs at most among 216 drawn: at least a third reused
    assert step.teacher_reuse is not None and step.teacher_reuse >= 1 / 3 - 1e-9
    # with hints (the default) the original runs inside the train net, for its blobs and its logits: nothing cached
    hinted = finetune_files(finetune_nets["original"], finetune_nets["original_weights"], finetune_nets["slim"],
                            finetune_nets["slim_weights"], finetune_nets["report"], finetune_nets["data"],
                            tmp_path / "hinted.caffemodel", replace(options, hints="on"))
    assert hinted.steps[-1].teacher_reuse is None and hinted.steps[-1].loss.endswith("hints")


def test_a_timed_run_on_small_data_grows_its_crop_bank(finetune_nets: dict[str, str], tmp_path: Path) -> None:
    photos = np.random.default_rng(4).integers(0, 256, (96, 36, 36, 3), dtype=np.uint8)  # 5 x 5 crops of 32
    np.savez(tmp_path / "photos.npz", x=photos, y=np.zeros(96, dtype=np.int64))
    options = FinetuneOptions(budget="20s", transform=Transform(scale=1 / 255, mirror=True, crop=32), holdout=0.25,
                              mode="mimic", solver=SolverOptions("adam", lr=1e-3), hints="off")
    result = finetune_files(finetune_nets["original"], finetune_nets["original_weights"], finetune_nets["slim"],
                            finetune_nets["slim_weights"], finetune_nets["report"], str(tmp_path / "photos.npz"),
                            tmp_path / "final.caffemodel", options)
    # a tiny net buys hundreds of passes over 72 images in 20 s: more crops than the default 4, at most all 25
    crops = int(result.views_rule.split(" of ")[0])
    assert CROP_BANK < crops <= 25 and "of 25 crop positions per image x mirror" in result.views_rule, result.views_rule
    step = result.steps[-1]
    assert step.teacher_reuse is not None and step.iterations * result.batch > 2 * 72 * crops  # views repeat


def test_small_data_holds_out_enough_images_to_mean_something() -> None:
    from deeprebirth.finetune.context import held_out_share

    assert round(500 * held_out_share(0.1, 500)) == 125  # a quarter, not 50
    assert round(1088 * held_out_share(0.1, 1088)) == 200
    assert held_out_share(0.1, 60000) == 0.1  # 6,000 is plenty
    assert held_out_share(0.3, 500) == 0.3  # asked for more: kept


def test_the_latest_checkpoint_is_kept_unless_worse_beyond_the_noise() -> None:
    def misses(first: int, last: int) -> np.ndarray:  # top-1 misses on 1000 held-out images
        return np.isin(np.arange(1000), np.arange(first, last)).astype(np.float64)

    # four checkpoints of a decaying run: the best mean (13.0%, the second) is a lucky draw; the next two differ
    # from it by a few images each way, within the noise (paired z 1.8 and 0.9)
    checkpoints = [misses(0, 200), misses(0, 130), misses(10, 150), misses(20, 156)]
    kept, leader, iteration = (0.5, 0), None, 0
    for k, values in enumerate(checkpoints, 1):
        keep, leader = keeps(float(np.mean(values)), values, kept, leader)
        if keep:
            kept, iteration = (float(np.mean(values)), k), k
    assert leader is not None and float(np.mean(leader[1])) == pytest.approx(0.13)
    assert iteration == 4  # picking the best mean would have thrown away half the decay
    assert keeps(0.3, misses(0, 300), kept, leader)[0] is False  # clearly worse (overfitting): not kept
    flat = np.full(1000, 0.5)  # never better than the start: the start stays, and the phase backs off
    assert keeps(0.5, flat, (0.5, 0), None)[0] is False and keeps(0.49, flat, (0.5, 0), None)[0] is True
    diverged = np.full(1000, np.inf)
    assert keeps(float("nan"), diverged, (0.5, 0), None)[0] is False and keeps(float("nan"), diverged, kept, leader)[0] is False


def test_a_run_that_diverges_with_nothing_to_fall_back_on_writes_nothing(finetune_nets: dict[str, str],
                                                                           tmp_path: Path) -> None:
    """No held-out data (so no checkpoint to keep) and a rate that turns the weights into NaN: a clear error, no
    caffemodel (it would load in Caffe and output NaN on the phone)."""
    options = FinetuneOptions(budget="40it", batch=16, transform=Transform(scale=1 / 255), holdout=0.0,
                              mode="mimic", solver=SolverOptions("sgd", lr=1e12), patience=0)
    out = tmp_path / "final.caffemodel"
    with pytest.raises(DeepRebirthError, match="NaN or Inf in weight blob"):
        finetune_files(finetune_nets["original"], finetune_nets["original_weights"], finetune_nets["slim"],
                       finetune_nets["slim_weights"], finetune_nets["report"], finetune_nets["data"], out, options)
    assert not out.exists()
