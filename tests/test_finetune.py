"""Layer-wise fine-tuning in real Caffe on a tiny GoogLeNet slimmed by every rule: loss goes down, only the layers
meant to learn change, --resume after an interruption, bad data refused before any training, the CLI, the example."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save

from deeprebirth import caffe_pb2 as pb
from deeprebirth.api import rewrite_files
from deeprebirth.caffe.data import Transform, split_holdout
from deeprebirth.caffe.evaluate import evaluate_files
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune import FinetuneOptions, Progress, finetune_files, plan_steps, probes
from deeprebirth.finetune.context import held_out_share
from deeprebirth.finetune.train import SolverOptions
from deeprebirth.io import caffe_io
from deeprebirth.ir.model import load_model
from deeprebirth.rewrite import RewriteReport

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def nets(finetune_nets: dict[str, str]) -> dict[str, str]:
    return finetune_nets


def options(**changes: object) -> FinetuneOptions:
    base = FinetuneOptions(budget="60it", batch=16, transform=Transform(scale=1 / 255), holdout=0.25,
                           schedule="layerwise", solver=SolverOptions("adam", lr=1e-3))
    return replace(base, **changes)  # type: ignore[arg-type]


def run(nets: dict[str, str], out: Path, opts: FinetuneOptions, progress=None, data: str | None = None):  # type: ignore[no-untyped-def]
    return finetune_files(nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"],
                          nets["report"], data or nets["data"], out, opts, progress=progress)


def weights(path: str | Path) -> dict[str, list[np.ndarray]]:
    return {name: [np.array(b) for b in blobs] for name, blobs in caffe_io.read_weights(path).items()}


def test_steps_follow_network_order_and_group_shared_layers(nets: dict[str, str]) -> None:
    report = RewriteReport.from_json(json.loads(Path(nets["report"]).read_text()))
    steps = plan_steps(report, load_model(nets["original"]), load_model(nets["slim"]))
    assert [s.relearn for s in steps] == [
        ["conv1_merge"], ["conv2_merge"],
        *[[f"inception_{i}/3x3_merge", f"inception_{i}/5x5_merge"] for i in (1, 2, 3)]]
    assert steps[0].rules == ["merge_pooling_into_conv", "merge_lrn_into_conv"]  # one layer, two changes
    assert [s.reproduces for s in steps[:3]] == ["norm1", "pool2", "inception_1/output"]


def test_a_later_change_that_splits_a_new_layer_joins_its_step(nets: dict[str, str], tmp_path: Path) -> None:
    """decompose_conv_tucker splits conv1_merge: its pieces are learned in conv1's step, with the same blob."""
    from deeprebirth.api import RewriteOptions

    slim, model, report = tmp_path / "t.prototxt", tmp_path / "t.caffemodel", tmp_path / "t.json"
    rewrite_files(nets["original"], slim, nets["original_weights"], model, report,
                  RewriteOptions(rules="all,tucker", rank_method="speedup:2"))
    changes = json.loads(report.read_text())["changes"]
    steps = plan_steps(RewriteReport.from_json(json.loads(report.read_text())), load_model(nets["original"]),
                       load_model(slim))
    assert steps[0].reproduces == "norm1"
    assert steps[0].rules == ["merge_pooling_into_conv", "merge_lrn_into_conv", "decompose_conv_tucker"]
    assert steps[0].relearn == [f"conv1_merge_tucker_{p}" for p in ("reduce", "core", "expand")]
    assert steps[2].reproduces == "inception_1/output"
    assert len(steps[2].relearn) == 6  # both widened branches of the module, three pieces each
    assert len({s.reproduces for s in steps}) == len(steps)  # one step per reproduced blob
    pieces = {n for c in changes if c["rule"] == "decompose_conv_tucker" for n in c["relearn"]}
    assert pieces == {n for s in steps for n in s.relearn}  # the pieces replaced every merged conv


def test_freeze_rest_lowers_loss_and_changes_only_the_new_layers(nets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "final.caffemodel"
    result = run(nets, out, options(freeze_rest=True, budget="150it", patience=0))
    assert result.complete and [s.index for s in result.steps] == [1, 2, 3, 4, 5, 6]
    assert result.steps[-1].name == "whole net" and result.steps[-1].reproduces == "classifier"
    assert [s.iterations for s in result.steps] == [15] * 5 + [75]  # the sharing rule: steps 1/2, whole net 1/2
    assert np.mean([s.loss_end for s in result.steps]) < np.mean([s.loss_start for s in result.steps])
    before, after = weights(nets["slim_weights"]), weights(out)
    assert before.keys() == after.keys()
    new = {name for s in result.steps for name in s.relearn}
    same = {name: all(np.array_equal(a, b) for a, b in zip(before[name], after[name])) for name in before}
    assert all(same[name] for name in before if name not in new)
    assert sum(not same[name] for name in new) >= len(new) // 2  # kept checkpoints may be a phase's start
    report = json.loads(Path(result.report).read_text())  # type: ignore[arg-type]
    assert report["steps"][0]["name"] == "conv1_merge" and report["final_accuracy"] is not None
    assert report["schedule"] == "layerwise" and report["budget"] == "150it"
    assert report["change_error"] == pytest.approx(change_error_by_evaluate(nets, out, result, tmp_path))


def test_the_final_change_carries_its_paired_standard_error(nets: dict[str, str], tmp_path: Path) -> None:
    """Ten updates: the slim net ends below the original on some held-out images (not all: a change of the same
    size on every image would have no spread), and the run reports the noise `evaluate` finds on them."""
    out = tmp_path / "final.caffemodel"
    result = run(nets, out, options(schedule="whole", budget="10it", patience=0))
    assert result.final_accuracy < result.original_accuracy  # type: ignore[operator]
    expected = change_error_by_evaluate(nets, out, result, tmp_path)
    assert expected > 0 and result.change_error == pytest.approx(expected)
    report = tmp_path / "cli.json"
    done = CliRunner().invoke(main, ["finetune", nets["original"], nets["original_weights"], nets["slim"],
                                     nets["slim_weights"], "--report", nets["report"], "--data", nets["data"],
                                     "--out", str(tmp_path / "cli.caffemodel"), "--json", str(report),
                                     "--budget", "10it", "--batch", "16", "--holdout", "0.25", "--scale",
                                     repr(1 / 255), "--solver", "adam", "--lr", "1e-3", "--schedule", "whole"])
    assert done.exit_code == 0, done.output
    shown = json.loads(report.read_text())
    change = 100 * (shown["final_accuracy"] - shown["original_accuracy"])
    assert f"(change {change:+.2f} points, standard error {100 * shown['change_error']:.2f}, paired)" in done.output


def test_labels_the_original_only_guesses_on_are_reported_as_ignored(nets: dict[str, str], tmp_path: Path) -> None:
    """Labels one class off the original's predictions (class folders numbered in another order): its held-out
    top-1 against them is 0%, so the run reports agreement instead of a top-1 "change" measured against nonsense."""
    shifted = tmp_path / "shifted.npz"
    data = np.load(nets["data"])
    np.savez(shifted, x=data["x"], y=(data["y"] + 1) % (int(data["y"].max()) + 1))
    flags = ["--budget", "10it", "--batch", "16", "--holdout", "0.25", "--scale", repr(1 / 255), "--solver", "adam",
             "--lr", "1e-3", "--mode", "mimic"]
    shown = {}
    for name, path in (("shifted", str(shifted)), ("own", nets["data"])):
        report = tmp_path / f"{name}.json"
        done = CliRunner().invoke(main, ["finetune", nets["original"], nets["original_weights"], nets["slim"],
                                         nets["slim_weights"], "--report", nets["report"], "--data", path,
                                         "--out", str(tmp_path / f"{name}.caffemodel"), "--json", str(report), *flags])
        assert done.exit_code == 0, done.output
        shown[name] = (json.loads(report.read_text()), done.output)
    (shifted_report, shifted_output), (own_report, own_output) = shown["shifted"], shown["own"]
    assert shifted_report["original_accuracy"] == 0.0 and shifted_report["labels_ignored"]
    assert "labels ignored" in shifted_output and "held-out top-1 (" not in shifted_output
    assert shifted_output.count("labels ignored") == 1 + len(shifted_report["steps"])  # the table's column too
    after = shifted_report["steps"][-1]["agreement_after"]
    assert "agreement with the original: before fine-tuning" in shifted_output
    assert f"after {100 * after:.2f}%" in shifted_output
    assert own_report["original_accuracy"] == 1.0 and not own_report["labels_ignored"]
    assert "held-out top-1 (" in own_output and "labels ignored" not in own_output


def change_error_by_evaluate(nets: dict[str, str], out: Path, result, tmp_path: Path) -> float:  # type: ignore[no-untyped-def]
    """The noise on the final change as `evaluate --reference` finds it on the run's held-out images (the same
    split of ``options()``' data, the same transform), checked to be the images the run measured."""
    arrays = np.load(nets["data"])
    _, held = split_holdout(len(arrays["x"]), held_out_share(0.25, len(arrays["x"])), 0)
    np.savez(tmp_path / "held.npz", x=arrays["x"][held], y=arrays["y"][held])
    check = evaluate_files(nets["slim"], out, tmp_path / "held.npz", transform=Transform(scale=1 / 255),
                           reference=(nets["original"], nets["original_weights"]))
    assert check.images == result.held_out and check.top1 == pytest.approx(result.final_accuracy)
    assert check.top1_change_error is not None
    return check.top1_change_error


def test_whole_schedule_distils_every_layer_at_once(nets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "final.caffemodel"
    result = run(nets, out, options(schedule="whole", budget="80it", patience=0))
    assert [s.name for s in result.steps] == ["whole net"] and result.steps[0].target == "labels+kd"
    step = result.steps[0]
    assert step.iterations == 80 and step.loss_end < step.loss_start
    assert step.accuracy_after > step.accuracy_before  # type: ignore[operator]
    assert step.agreement_after > step.agreement_before  # type: ignore[operator]  (labels = the original's top-1)
    before, after = weights(nets["slim_weights"]), weights(out)
    changed = {name for name in before if not all(np.array_equal(a, b) for a, b in zip(before[name], after[name]))}
    assert {"conv1_merge", "conv2_reduce", "inception_1/3x3_reduce", "classifier"} <= changed


def test_hints_match_intermediate_blobs_beside_the_logits(nets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "final.caffemodel"
    result = run(nets, out, options(schedule="whole", budget="40it", patience=0, hints="on",
                                    work_dir=tmp_path / "work"))
    step = result.steps[0]
    assert step.loss.endswith("hints") and step.loss_end < step.loss_start
    hints = int(step.loss.split("+ ")[1].split()[0])
    train = caffe_io.read_prototxt(next((tmp_path / "work").glob("*train*.prototxt")))
    losses = [layer for layer in train.layer if layer.name.startswith("loss_hint")]
    assert 1 <= hints <= 4 and len(losses) == hints
    assert all(layer.type == "EuclideanLoss" and layer.bottom[1] == "teacher/" + layer.bottom[0] for layer in losses)


def test_without_freeze_rest_the_slim_layers_learn_too(nets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "final.caffemodel"
    result = run(nets, out, options(patience=0))
    before, after = weights(nets["slim_weights"]), weights(out)
    changed = {name for name in before if not all(np.array_equal(a, b) for a, b in zip(before[name], after[name]))}
    assert {"conv1_merge", "conv2_reduce", "inception_1/3x3_reduce", "classifier"} <= changed
    assert all(s.frozen > 0 for s in result.steps[:4])  # the original's layers that later merges replace
    assert result.steps[4].frozen == 0  # after the last merge only the shared classifier follows: it learns


@pytest.mark.parametrize("target", ["local", "next", "logits"])
def test_mimic_targets(nets: dict[str, str], tmp_path: Path, target: str) -> None:
    # --dropout off: this original has random weights, never trained with the Dropout its prototxt has
    result = run(nets, tmp_path / "final.caffemodel", options(mode="mimic", mimic_at=target, budget="200it",
                                                               freeze_rest=True, patience=0, dropout="off"))
    assert result.steps[-1].name == "whole net" and result.steps[-1].target == "kd"
    for step in result.steps[:-1]:
        expected = {"local": "local", "logits": "kd"}.get(target, "next:")
        assert step.target.startswith(expected) or (target == "next" and step.target == "kd"), step.target
        assert step.loss_end < step.loss_start
        if target == "local":
            assert step.error_after < step.error_before, step  # type: ignore[operator]
        if target == "logits":  # KD on 24 held-out images improved; the logits' squared error stays close
            assert step.best_iteration > 0, step
            assert step.output_error_after < 1.25 * step.output_error_before, step  # type: ignore[operator]
    if target == "next":  # a step looks at the next merge's blob; the last one at the logits
        assert result.steps[0].target == f"next:{result.steps[1].reproduces}" and result.steps[-2].target == "kd"
    assert result.final_accuracy is not None  # labels exist, so held-out accuracy is measured too
    expected = change_error_by_evaluate(nets, tmp_path / "final.caffemodel", result, tmp_path)
    assert result.change_error == pytest.approx(expected)
    assert result.steps[-1].output_error_after < result.steps[0].output_error_before  # type: ignore[operator]


def test_mimic_mode_needs_no_labels(nets: dict[str, str], tmp_path: Path) -> None:
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=np.load(nets["data"])["x"])
    result = run(nets, tmp_path / "final.caffemodel", options(mode="mimic", budget="12it"), data=str(unlabelled))
    assert result.complete and result.final_accuracy is None
    assert result.steps[-1].agreement_after is not None  # agreement with the original needs no labels
    with pytest.raises(DeepRebirthError, match="no labels"):
        run(nets, tmp_path / "label.caffemodel", options(budget="12it"), data=str(unlabelled))


@pytest.mark.parametrize("mode, reference", [("label", 3e-4), ("mimic", 1e-3)])
def test_adam_given_without_a_rate_is_searched_from_its_modes_reference(nets: dict[str, str], tmp_path: Path,
                                                                       mode: str, reference: float) -> None:
    """Without labels, ``--solver adam`` reads its grid outward from a higher reference (search.reference_rate)."""
    result = run(nets, tmp_path / "final.caffemodel", options(schedule="whole", budget="400it", patience=0,
                                                               solver=SolverOptions("adam", lr=None), mode=mode))
    step = result.steps[0]
    assert f"reference rate {reference:g}" in step.search, step.search
    assert float(next(iter(step.lr_search))) == pytest.approx(reference), step.lr_search
    assert step.solver == "adam" and not any(c.startswith("adam") for c in step.lr_search)


@pytest.mark.parametrize("mode, temperature", [("label", 4.0), ("mimic", 1.0)])
def test_the_learning_rate_is_searched_on_held_out_data(nets: dict[str, str], tmp_path: Path, mode: str,
                                                         temperature: float) -> None:
    result = run(nets, tmp_path / "final.caffemodel", options(schedule="whole", budget="400it", patience=0,
                                                               solver=SolverOptions("sgd", lr=None), mode=mode,
                                                               temperature=temperature))
    step = result.steps[0]
    rates = [c for c in step.lr_search if " " not in c]
    # batch 16; label mode's 0.5 CE + 0.5 KD at T=4 is the reference's loss, KD alone at T=1 pulls 2.5x less
    reference = 0.01 * 16 / 32 * (1 if mode == "label" else 2.5)  # (see search.reference_rate)
    grid = [reference * f for f in (0.1, 0.3, 1, 3)]
    assert float(rates[0]) == pytest.approx(reference, rel=1e-2)  # read outward from the reference
    assert all(any(float(c) == pytest.approx(g, rel=1e-2) for g in grid) for c in rates) and len(set(rates)) == len(rates)
    assert f"reference rate {reference:g}" in step.search
    assert step.search.startswith("up to 4 rates x 15 iterations"), step.search
    adam = [c for c in step.lr_search if c.startswith("adam ") and len(c.split()) == 2]
    if mode == "mimic":  # without labels Adam is probed against SGD's choice: the higher rate only after the lower won
        assert [float(c.split()[1]) for c in adam] in ([0.003, 0.001], [0.003, 0.01]), step.lr_search
        assert "beyond the noise" in step.search if step.solver == "adam" else "adam probed" in step.search
    else:
        assert adam == [], step.lr_search
    assert step.lr in [float(c) for c in rates] + [float(c.split()[1]) for c in adam]
    others = [c for c in step.lr_search if " " in c and c not in adam]  # losses compared at the chosen rate
    default_loss = f"KD T={temperature:g}"
    if step.agreement_before is not None and step.agreement_before < 0.5 and mode == "label":
        (kd1_rate, kd1), (regression_rate, regression) = (c.split() for c in others)
        assert (kd1, regression) == ("kd1", "regression") and regression_rate in rates, step.lr_search
        # KD at T=1 pulls 2.5 times less hard than label mode's 0.5 CE + 0.5 KD at T=4: probed at 2.5x the rate
        assert float(kd1_rate) == pytest.approx(2.5 * float(regression_rate), rel=1e-2), step.lr_search
        assert step.loss.split(" + ")[0] in ("KD T=4", "KD T=1", "logit regression")
    elif step.agreement_before is not None and step.agreement_before < 0.5:  # distilling at T=1 already
        [probe] = others
        *rate, regression = probe.split()
        assert regression == "regression", step.lr_search
        if rate[0] == "adam":  # Adam won: its steps are normalised, so the loss is probed at its very rate
            assert f"adam {rate[1]}" in adam, step.lr_search
        else:  # regression is rated as KD at T=4, which pulls 4 times as hard as KD at T=1: a quarter of the rate
            assert any(float(r) == pytest.approx(4 * float(rate[0]), rel=1e-2) for r in rates), step.lr_search
        assert step.loss.split(" + ")[0] in ("KD T=1", "logit regression")
    else:
        assert others == [] and step.loss == default_loss
    # the probes come out of the budget; the winner's probe is not lost: training went on from it
    assert step.iterations == 400 - 15 * len(step.lr_search) + 15


def test_when_no_probe_improves_on_the_start_training_starts_over_slower(nets: dict[str, str], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "improves", lambda probe, start: False)  # every probe ended worse than the start
    result = run(nets, tmp_path / "final.caffemodel", options(schedule="whole", budget="400it", patience=0,
                                                               solver=SolverOptions("sgd", lr=None)))
    step = result.steps[0]
    probed = [float(c) for c in step.lr_search if " " not in c]
    assert "no probe improved on the start: training starts from it at sgd" in step.search, step.search
    assert any(3 * step.lr == pytest.approx(r, rel=1e-2) for r in probed)  # a third of a probed rate (slower_rate)
    assert [c for c in step.lr_search if " " in c] == []  # no loss probes from a start no probe improved on
    # the probes' iterations are spent; training starts from the phase's start, not from a probe
    assert step.iterations == 400 - 15 * len(step.lr_search)


def on_time(took: float, budget: float) -> bool:
    return 0.9 * budget <= took <= 1.25 * budget


def test_a_time_budget_ends_the_run_on_time(nets: dict[str, str], tmp_path: Path) -> None:
    seconds = 20.0
    left: list[float] = []
    result = run(nets, tmp_path / "final.caffemodel", options(budget=f"{seconds:g}s", patience=0, schedule="whole",
                                                               solver=SolverOptions("sgd", lr=None)),
                 progress=lambda e: left.append(e.seconds_left) if e.event == "iteration" else None)
    # the plan from a few timed iterations is corrected as the run measures its own pace: within 5% on a quiet
    # machine; a loaded one stretches single iterations, and one of them past the deadline is the granularity
    assert result.complete and on_time(result.seconds, seconds), result.seconds
    assert result.steps[0].iterations > 0
    layerwise = run(nets, tmp_path / "layerwise.caffemodel", options(budget=f"{seconds:g}s", patience=0))
    assert layerwise.complete and on_time(layerwise.seconds, seconds), layerwise.seconds
    assert left[0] > left[-1] >= 0  # progress counts the time down
    # searched when the machine is fast enough for it, else Adam (the rescue for SGD's users without a search)
    assert all(s.lr_search or (s.solver, s.lr) == ("adam", 1e-4) for s in result.steps)


SKIP = """name: "skip"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "side" type: "Pooling" bottom: "data" top: "side" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "join" type: "Concat" bottom: "pool1" bottom: "side" top: "join" }
layer { name: "fc" type: "InnerProduct" bottom: "join" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_label_mode_says_before_training_when_it_cannot_splice_the_nets(tmp_path: Path) -> None:
    """A layer after the step's blob also reads the input: the original's rest cannot follow the slim prefix."""
    proto, model = save(graph_from_text(SKIP), tmp_path, "skip")
    paths = {"original": proto, "original_weights": model, "slim": str(tmp_path / "s.prototxt"),
             "slim_weights": str(tmp_path / "s.caffemodel"), "report": str(tmp_path / "r.json")}
    rewrite_files(proto, paths["slim"], model, paths["slim_weights"], paths["report"])
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 3, 40))
    with pytest.raises(DeepRebirthError, match="cannot be spliced there"):
        run(paths, tmp_path / "label.caffemodel", options(), data=str(data))
    assert not (tmp_path / "label.finetune").exists()
    result = run(paths, tmp_path / "mimic.caffemodel", options(mode="mimic", budget="80it", patience=0),
                 data=str(data))
    first = result.steps[0]  # mimic falls back to the merged blob itself there
    assert first.reproduces == "pool1" and first.target == "local" and first.error_after < first.error_before
    assert first.accuracy_after is None  # no net to measure accuracy with, but no failure either


class Interrupt(Exception):
    pass


def test_resume_after_interruption_redoes_no_finished_step(nets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "final.caffemodel"

    def stop_at_step_3(event: Progress) -> None:
        if event.event == "step" and event.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(nets, out, options(), progress=stop_at_step_3)
    state = json.loads((tmp_path / "final.finetune" / "state.json").read_text())
    assert [s["index"] for s in state["finished"]] == [1, 2] and not out.exists()

    started: list[int] = []
    resumed = run(nets, out, options(resume=True),
                  progress=lambda e: started.append(e.step) if e.event == "step" else None)
    assert started == [3, 4, 5, 6] and resumed.resumed == 2 and resumed.complete
    assert resumed.steps[:2] == [r for r in resumed.steps if r.index <= 2]
    uninterrupted = run(nets, tmp_path / "other.caffemodel", options())
    assert [s.name for s in resumed.steps] == [s.name for s in uninterrupted.steps] == resumed.planned


def test_max_steps_then_resume_and_refusal_of_other_options(nets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "final.caffemodel"
    first = run(nets, out, options(max_steps=2))
    assert not first.complete and len(first.steps) == 2 and first.out is None
    with pytest.raises(DeepRebirthError, match="other files or options"):
        run(nets, out, options(resume=True, budget="61it"))
    second = run(nets, out, options(resume=True))
    assert second.complete and [s.index for s in second.steps] == [1, 2, 3, 4, 5, 6] and out.exists()


# ---------------------------------------------------------------------------------------------------------------
# bad data: one clear error before any training starts (nothing is written)


def image_folder(root: Path, size: int = SIZE, classes: int = 2, per_class: int = 3) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            cv2.imwrite(str(root / f"class_{c}" / f"{i}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return root


def refused(nets: dict[str, str], tmp_path: Path, data: Path, match: str) -> None:
    out = tmp_path / "final.caffemodel"
    with pytest.raises(DeepRebirthError, match=match):
        run(nets, out, options(), data=str(data))
    assert not (tmp_path / "final.finetune").exists() and not out.exists()


def test_missing_folder(nets: dict[str, str], tmp_path: Path) -> None:
    refused(nets, tmp_path, tmp_path / "nowhere", "no such file or folder")


def test_unreadable_image(nets: dict[str, str], tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images")
    (folder / "class_1" / "broken.png").write_bytes(b"not an image at all")
    refused(nets, tmp_path, folder, r"broken\.png: cannot read image")


def test_label_out_of_range(nets: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "bad.npz"
    np.savez(data, x=np.zeros((4, SIZE, SIZE, 3), np.uint8), y=np.array([0, 1, 10, 2]))
    refused(nets, tmp_path, data, r"label 10 is out of range: the net has 10 classes")
    image_folder(tmp_path / "images")
    listing = tmp_path / "list.txt"
    listing.write_text("images/class_0/0.png 3\nimages/class_1/0.png -1\n")
    refused(nets, tmp_path, listing, r"class_1/0\.png: label -1 is out of range")


def test_image_size_that_does_not_fit(nets: dict[str, str], tmp_path: Path) -> None:
    refused(nets, tmp_path, image_folder(tmp_path / "small", size=20), r"image size 20x20 does not fit the net's "
                                                                      r"input 32x32")
    data = tmp_path / "big.npz"
    np.savez(data, x=np.zeros((4, 40, 40, 3), np.uint8), y=np.zeros(4, int))
    refused(nets, tmp_path, data, "image size 40x40 does not fit")


def test_broken_lmdb_and_leveldb_are_refused_with_a_reason(nets: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "train_lmdb").mkdir()
    (tmp_path / "train_lmdb" / "data.mdb").write_bytes(b"not an lmdb")
    refused(nets, tmp_path, tmp_path / "train_lmdb", "cannot open LMDB")
    (tmp_path / "train_leveldb").mkdir()
    (tmp_path / "train_leveldb" / "CURRENT").write_text("MANIFEST-000001\n")
    refused(nets, tmp_path, tmp_path / "train_leveldb", "LevelDB data cannot be read")


def test_finetune_from_a_caffe_lmdb(nets: dict[str, str], tmp_path: Path) -> None:
    import lmdb

    archive = np.load(nets["data"])
    env = lmdb.open(str(tmp_path / "train_lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(archive["x"], archive["y"])):
            datum = pb.Datum(channels=3, height=SIZE, width=SIZE, label=int(label),
                             data=image.transpose(2, 0, 1).tobytes())
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    result = run(nets, tmp_path / "final.caffemodel", options(budget="8it"), data=str(tmp_path / "train_lmdb"))
    assert (tmp_path / "final.caffemodel").exists() and result.steps


def test_cli_finetune_and_its_errors(nets: dict[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["finetune", nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"], "--report",
            nets["report"], "--out", str(tmp_path / "final.caffemodel"), "--budget", "30it", "--batch", "8", "--schedule", "layerwise",
            "--scale", "0.00390625"]
    done = runner.invoke(main, [*base, "--data", nets["data"], "--freeze-rest"])
    assert done.exit_code == 0, done.output
    assert "inception_3/3x3_merge" in done.output and "wrote" in done.output and "learning rate" in done.output
    assert (tmp_path / "final.caffemodel").exists() and (tmp_path / "final.finetune.json").exists()
    bad = runner.invoke(main, [*base, "--data", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "error:" in bad.output and "no such file or folder" in bad.output


@pytest.mark.slow
def test_fashion_mnist_example_quick(tmp_path: Path) -> None:
    """The README's example command, reduced (--quick): real data, training from scratch, both modes, speed."""
    command = [sys.executable, str(ROOT / "examples" / "fashion_mnist" / "run.py"), "--quick", "--work",
               str(tmp_path / "work"), "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = (tmp_path / "RESULTS.md").read_text()
    assert "slim, fine-tuned (label)" in results and "slim, fine-tuned (mimic, no labels)" in results
    assert "Small data, no labels" in results and "Harder case" in results
    assert "Schedules at the same budget (30it" in results and "layer-wise (paper) + whole net" in results
    assert all((tmp_path / name).is_file() for name in ("accuracy.png", "speed.png", "curves.png"))


def test_without_held_out_data_sgd_users_get_adam(nets: dict[str, str], tmp_path: Path) -> None:
    result = run(nets, tmp_path / "final.caffemodel", options(schedule="whole", budget="20it", holdout=0.0,
                                                               solver=SolverOptions("sgd", lr=None)))
    step = result.steps[0]
    assert (step.solver, step.lr, step.lr_search) == ("adam", 1e-4, {})
    assert result.held_out == 0 and step.iterations == 20


def test_a_net_with_only_exact_changes_is_written_unchanged(nets: dict[str, str], tmp_path: Path) -> None:
    """Every merge left out (here: the exact rules only, as when --max-drop keeps none): the slim net already computes
    the original's outputs, so `finetune` trains nothing, whatever the budget, and says so."""
    from deeprebirth.api import RewriteOptions

    exact = {"slim": str(tmp_path / "exact.prototxt"), "slim_weights": str(tmp_path / "exact.caffemodel"),
             "report": str(tmp_path / "exact.json")}
    rewrite_files(nets["original"], exact["slim"], nets["original_weights"], exact["slim_weights"], exact["report"],
                  RewriteOptions(rules="exact"))
    assert not json.loads(Path(exact["report"]).read_text())["relearn"]
    out = tmp_path / "final.caffemodel"
    result = run({**nets, **exact}, out, options(budget="10m", schedule="whole"))
    assert result.complete and result.steps == [] and "nothing to re-learn" in result.note
    assert result.seconds < 60  # not the 10-minute budget
    written, given = weights(out), weights(exact["slim_weights"])
    assert written.keys() == given.keys()
    assert all(np.array_equal(a, b) for name in given for a, b in zip(written[name], given[name]))
    assert "nothing to re-learn" in json.loads((tmp_path / "final.finetune.json").read_text())["note"]
    cli = CliRunner().invoke(main, ["finetune", nets["original"], nets["original_weights"], exact["slim"],
                                    exact["slim_weights"], "--report", exact["report"], "--data", nets["data"],
                                    "--out", str(tmp_path / "cli.caffemodel"), "--scale", "0.00390625"])
    assert cli.exit_code == 0, cli.output
    assert "nothing to re-learn" in cli.output and (tmp_path / "cli.caffemodel").is_file()


def test_the_originals_dropout_trains_again_but_the_written_net_has_none(nets: dict[str, str],
                                                                          tmp_path: Path) -> None:
    out, work = tmp_path / "final.caffemodel", tmp_path / "work"
    assert "Dropout" not in Path(nets["slim"]).read_text()  # the rewrite took it out: the identity at inference
    result = run(nets, out, options(schedule="whole", budget="10it", patience=0, work_dir=work))
    assert result.steps[0].dropout == ["drop"]
    train = caffe_io.read_prototxt(next(work.glob("*train*.prototxt")))
    names = [layer.name for layer in train.layer]
    drop = train.layer[names.index("drop")]
    assert names.index("drop") == names.index("gap") + 1  # in place on the pooled features, before the classifier
    assert list(drop.bottom) == list(drop.top) == ["gap"] and drop.dropout_param.dropout_ratio == pytest.approx(0.4)
    assert sum(layer.type == "Dropout" for layer in train.layer) == 1  # the embedded original leaves its own out
    assert "Dropout" not in Path(nets["slim"]).read_text()
    assert set(caffe_io.read_weights(out)) == set(caffe_io.read_weights(nets["slim_weights"]))
    for mode, setting, expected in (("mimic", "auto", []), ("mimic", "on", ["drop"]), ("label", "off", [])):
        found = run(nets, tmp_path / f"{mode}_{setting}.caffemodel", options(schedule="whole", budget="2it",
                                                                               mode=mode, dropout=setting))
        assert found.steps[0].dropout == expected, (mode, setting)  # auto: the soft targets alone need none


def test_restore_dropout_puts_each_one_after_the_last_writer_of_its_blob() -> None:
    from deeprebirth.finetune.train import restore_dropout

    original = caffe_io.parse_prototxt(
        'layer { name: "fc6" type: "InnerProduct" bottom: "x" top: "fc6" }\n'
        'layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }\n'
        'layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }\n'
        'layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" }\n'
        'layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7_dropped" dropout_param { dropout_ratio: 0.3 } }\n'
        'layer { name: "fc8" type: "InnerProduct" bottom: "fc7_dropped" top: "fc8" }\n'
        'layer { name: "gone" type: "Dropout" bottom: "merged_away" top: "merged_away" }\n')
    slim = caffe_io.parse_prototxt(
        'layer { name: "fc6" type: "InnerProduct" bottom: "x" top: "fc6" }\n'
        'layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }\n'
        'layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" }\n'
        'layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.1 } }\n'
        'layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" }\n')
    assert restore_dropout(slim, original) == ["drop6"]  # fc7 has one already; nothing writes "merged_away"
    assert [layer.name for layer in slim.layer] == ["fc6", "relu6", "drop6", "fc7", "drop7", "fc8"]
    assert slim.layer[2].dropout_param.dropout_ratio == pytest.approx(0.5) and list(slim.layer[2].top) == ["fc6"]
    assert slim.layer[4].dropout_param.dropout_ratio == pytest.approx(0.1)  # a Dropout the net has is left alone
