"""rewrite/plan --data --max-drop: which lossy merges the data and the fine-tuning budget can recover."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save
from nets import tiny_inception

from deeprebirth import api
from deeprebirth.caffe.evaluate import labels_are_its_classes
from deeprebirth.cli import main
from deeprebirth.finetune import FinetuneOptions, FinetuneResult, StepResult
from deeprebirth.io.caffe_io import read_prototxt
from deeprebirth.plan.candidates import Candidate
from deeprebirth.plan.recoverable import permit, select
from deeprebirth.plan.risk import RISK_BATCH, Risk, measured, risk_options, share_budget
from deeprebirth.rules import RULES, Match

SIZE = 32


def candidate(rule: str, risk: str, layers: tuple[str, ...], added: list[str], saved: float) -> Candidate:
    return Candidate(rule, "g", risk, 0, layers, f"{rule} at {layers[0]}", [layers[0]], added, [], added, 1.0, 0,
                     0.0, saved, 0, 0, 0)


def risk(k: int, drop_after: float | None, iterations: int = 10, drop_before: float = 50.0) -> Risk:
    """An unlabelled risk: agreement = 1 - drop / 100."""
    after = None if drop_after is None else 1 - drop_after / 100
    return Risk(k, [], 1 - drop_before / 100, after, 0.5, None if after is None else 0.1, 1.0, "30s", iterations,
                100)


# a net's candidates: 0 an exact fold, 1 pool1 into conv1 (makes conv1_merge), 2 norm1 into conv1_merge (builds on
# 1), 3 a branch merge, 4 another pooling merge
CANDIDATES = [candidate("fuse_batchnorm_into_conv", "exact", ("bn0", "conv0"), [], 1.0),
              candidate("merge_pooling_into_conv", "lossy", ("pool1", "conv1"), ["conv1_merge"], 10.0),
              candidate("merge_lrn_into_conv", "lossy", ("norm1", "conv1_merge"), ["conv1_merge2"], 2.0),
              candidate("merge_inception_branches", "lossy", ("inc/output",), ["inc/3x3_merge"], 5.0),
              candidate("merge_pooling_into_conv", "lossy", ("pool2", "conv2"), ["conv2_merge"], 4.0)]


def kept(decisions: list) -> list[int]:
    return [d.candidate for d in decisions if d.kept]


def test_exact_folds_always_apply_and_recoverable_merges_stay() -> None:
    risks = {1: risk(1, 0.0), 2: risk(2, 0.2), 3: risk(3, 0.3), 4: risk(4, 0.0)}
    decisions = select(CANDIDATES, risks, max_drop=1.0)
    assert kept(decisions) == [0, 1, 2, 3, 4]
    assert decisions[0].reason.startswith("exact")
    # nothing recoverable: the exact fold still applies
    nothing = select(CANDIDATES, {k: risk(k, 30.0) for k in (1, 2, 3, 4)}, max_drop=1.0)
    assert kept(nothing) == [0]
    assert all("30.0 points lost" in d.reason for d in nothing[1:])


def test_a_run_without_an_update_is_not_recoverable() -> None:
    decisions = select(CANDIDATES, {1: risk(1, None, iterations=0), 4: risk(4, 0.0)}, max_drop=5.0)
    by = {d.candidate: d for d in decisions}
    assert not by[1].kept and "no update" in by[1].reason and by[1].drop is None
    assert by[4].kept
    assert 2 not in by and 3 not in by  # not measured (outside --only/--exclude): no decision


def test_a_merge_is_kept_only_with_what_it_builds_on() -> None:
    # the LRN merge (2) builds on pool1's (1): when 1 cannot be recovered, 2 goes too, however cheap it is
    decisions = select(CANDIDATES, {1: risk(1, 8.0), 2: risk(2, 0.0), 4: risk(4, 0.0)}, max_drop=1.0)
    by = {d.candidate: d for d in decisions}
    assert not by[1].kept and not by[2].kept and "builds on #2 (pool1)" in by[2].reason
    assert by[4].kept
    # ranked first for its time per point, 2 brings 1 with it: both or neither
    both = select(CANDIDATES, {1: risk(1, 0.6), 2: risk(2, 0.0), 4: risk(4, 0.5)}, max_drop=1.0)
    assert kept(both) == [0, 1, 2]  # 1 + 2 charge 0.6; 4's 0.5 would pass 1.0


def test_summed_drops_stay_within_the_maximum_taking_time_per_point_first() -> None:
    # per point: 1 saves 10 ms / 0.5, 3 saves 5 / 0.4, 4 saves 4 / 0.1 (the best)
    risks = {1: risk(1, 0.5), 3: risk(3, 0.4), 4: risk(4, 0.1)}
    decisions = select(CANDIDATES, risks, max_drop=0.7)
    assert kept(decisions) == [0, 1, 4]  # 4 (0.1), then 1 (0.6 in all); 3 would make 1.0
    three = next(d for d in decisions if d.candidate == 3)
    assert "sum would pass 0.7" in three.reason
    # a better net than the original (negative drop) is charged nothing
    assert kept(select(CANDIDATES, {1: risk(1, -2.0), 4: risk(4, 0.7)}, max_drop=0.7)) == [0, 1, 4]


def test_permit_lets_exact_rules_through_and_lossy_ones_only_where_kept() -> None:
    rules = {rule.name: rule for rule in RULES}
    decisions = select(CANDIDATES, {1: risk(1, 0.0), 4: risk(4, 9.0)}, max_drop=1.0)
    refused: list[str] = []
    allowed = permit(CANDIDATES, decisions, refused)
    assert allowed(rules["fuse_batchnorm_into_conv"], Match(("bn9", "conv9")))
    assert allowed(rules["merge_pooling_into_conv"], Match(("pool1", "conv1")))
    assert not allowed(rules["merge_pooling_into_conv"], Match(("pool2", "conv2")))  # measured, left out
    assert not allowed(rules["merge_pooling_into_conv"], Match(("pool7", "conv7")))  # never measured
    assert not allowed(rules["decompose_conv_tucker"], Match(("conv1_merge",)))
    assert refused == ["merge_pooling_into_conv at 'pool7'", "decompose_conv_tucker at 'conv1_merge'"]


def test_drop_is_top1_points_with_labels_and_agreement_points_without() -> None:
    unlabelled = risk(0, 2.5, drop_before=40.0)
    assert unlabelled.drop_before == pytest.approx(40.0) and unlabelled.drop_after == pytest.approx(2.5)
    labelled = Risk(0, [], 0.5, 0.9, 1.0, 0.1, 1.0, "1m", 5, 200, original_accuracy=0.8, accuracy_before=0.3,
                    accuracy_after=0.77)
    assert labelled.drop_before == pytest.approx(50.0) and labelled.drop_after == pytest.approx(3.0)
    assert labelled.resolution == pytest.approx(0.5)


def test_labels_the_original_only_guesses_on_are_read_as_no_labels() -> None:
    """Photos listed with one placeholder label (the original's top-1 against it 0%), or class folders in another
    order than the net's outputs: the drop is read from the agreement, not as 0 points of a 0% top-1."""
    assert not labels_are_its_classes(0.0, 125, 1000) and not labels_are_its_classes(1 / 125, 125, 1000)
    assert labels_are_its_classes(2 / 125, 125, 1000) and labels_are_its_classes(0.9, 125, 17)
    assert not labels_are_its_classes(0.10, 125, 17) and not labels_are_its_classes(0.6, 125, 2)
    assert labels_are_its_classes(1.0, 125, 2) and not labels_are_its_classes(None, 125, 2)

    def short_run(original: float, before: float, after: float, classes: int) -> FinetuneResult:
        step = StepResult(1, "whole", [], [], "", "kd", 10, 0, 40, 40, False, 1e-4, {}, "adam", 1.0, 0.5, before,
                          after, None, None, 0.4, 0.1, 0.04, 0.7, 60.0)
        return FinetuneResult("mimic", "whole", "1m", [step], ["whole"], True, 0, 125, original, before, None, "o",
                              "r", "w", 60.0, labels_ignored=not labels_are_its_classes(original, 125, classes))

    placeholder = measured(0, [0], short_run(0.0, 0.0, 0.0, 1000))
    assert placeholder.labels_ignored and not placeholder.labelled
    assert placeholder.drop_before == pytest.approx(96.0) and placeholder.drop_after == pytest.approx(30.0)
    real = measured(0, [0], short_run(0.9, 0.2, 0.85, 17))
    assert not real.labels_ignored and real.labelled
    assert real.drop_before == pytest.approx(70.0) and real.drop_after == pytest.approx(5.0)


def test_a_short_run_without_an_update_reports_no_after_figures() -> None:
    step = StepResult(1, "whole", [], [], "", "kd", 10, 0, 0, 0, False, 1e-4, {}, "adam", float("nan"), float("nan"),
                      None, None, None, None, 0.4, 0.4, 0.9, 0.9, 12.0)
    result = FinetuneResult("mimic", "whole", "30s", [step], ["whole"], True, 0, 64, None, None, None, "o", "r", "w",
                            30.0)
    r = measured(3, [1, 3], result)
    assert r.with_merges == [1] and not r.updated and r.iterations == 0
    assert r.agreement_before == 0.9 and r.agreement_after is None and r.output_error_after is None
    assert r.drop_before == pytest.approx(10.0) and r.drop_after is None


def test_the_budget_is_shared_among_the_runs_and_buys_updates() -> None:
    assert share_budget("5m", 3) == "100s" and share_budget("90it", 4) == "22it" and share_budget("2ep", 4) == "0.5ep"
    assert share_budget("10m", 0) == "600s"
    options = risk_options("20s", seed=3)
    assert options.budget == "20s" and options.batch == RISK_BATCH and options.seed == 3
    assert options.solver.lr is not None  # a given rate: no learning-rate search eats the share
    assert api.FINETUNE_BUDGET == FinetuneOptions().budget == api.RewriteOptions().budget


def photo_crops(path: Path, count: int, size: int = SIZE) -> None:
    """``count`` real-photo crops (scikit-image's photos), unlabelled, as an .npz."""
    import cv2
    from skimage import data

    rng = np.random.default_rng(0)
    photos = [cv2.resize(getattr(data, name)()[..., :3], (128, 128)) for name in ("astronaut", "chelsea", "coffee")]
    crops = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        y, x = (int(v) for v in rng.integers(0, 128 - size, 2))
        crops.append(photo[y:y + size, x:x + size, ::-1])
    np.savez(path, x=np.stack(crops))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, str]:
    folder = tmp_path_factory.mktemp("recoverable")
    proto, model = save(graph_from_text(tiny_inception(SIZE), seed=1), folder, "original")
    photo_crops(folder / "photos.npz", 96)
    return folder, proto, model, str(folder / "photos.npz")


@pytest.fixture(scope="module")
def rewritten(tiny: tuple[Path, str, str, str]) -> Any:
    """``rewrite --max-drop 5 --budget 64it`` of the tiny net on real photo crops (slim.prototxt, slim.json)."""
    folder, proto, model, photos = tiny
    return CliRunner().invoke(main, ["rewrite", proto, str(folder / "slim.prototxt"), "--weights", model,
                                     "--out-weights", str(folder / "slim.caffemodel"), "--report",
                                     str(folder / "slim.json"), "--data", photos, "--scale", "0.00390625",
                                     "--max-drop", "5", "--budget", "64it"])


def test_cli_rewrite_with_max_drop_leaves_out_what_cannot_be_recovered(tiny: tuple[Path, str, str, str],
                                                                        rewritten: Any) -> None:
    folder = tiny[0]
    out = folder / "slim.prototxt"
    done = rewritten
    assert done.exit_code == 0, done.output
    assert "accuracy-aware choice" in done.output and "LEFT OUT" in done.output
    choice = json.loads((folder / "slim.json").read_text())["accuracy"]
    assert choice["max_drop"] == 5 and choice["budget"] == "64it"
    lossy = [d for d in choice["decisions"] if d["risk"] == "lossy"]
    assert choice["share"] == f"{64 // len(lossy)}it"
    layers = {layer.name for layer in read_prototxt(out).layer}
    assert "drop" not in layers  # the exact rule (eliminate_dropout) applied
    kept = [d for d in lossy if d["kept"]]
    left = [d for d in lossy if not d["kept"]]
    assert kept and left
    for d in lossy:
        m = d["measured"]
        assert m["iterations"] > 0 and m["held_out"] > 0 and 0 <= m["drop_before"] <= 100
        recoverable = m["drop_after"] <= 5
        assert d["kept"] <= recoverable  # kept only if recoverable (the rest: dependencies)
        assert 0 < d["time_saved_pct"] < 100
    assert sum(max(d["charged_drop"], 0) for d in kept) <= 5
    for d in left:
        assert d["at"] in layers  # a left-out merge's anchor (its pooling, LRN or concat) is still there
    for d in kept:
        assert d["at"] not in layers or d["rule"] == "merge_inception_branches"


def test_plan_with_max_drop_shows_the_same_choice(tiny: tuple[Path, str, str, str], rewritten: Any) -> None:
    folder, proto, model, photos = tiny
    assert rewritten.exit_code == 0, rewritten.output
    done = CliRunner().invoke(main, ["plan", proto, "--weights", model, "--rounds", "1", "--data", photos,
                                     "--scale", "0.00390625", "--max-drop", "5", "--budget", "64it", "--json",
                                     str(folder / "plan.json")])
    assert done.exit_code == 0, done.output
    assert "drop (points)" in done.output and "accuracy-aware choice" in done.output
    planned = json.loads((folder / "plan.json").read_text())["accuracy"]["decisions"]
    rewritten = json.loads((folder / "slim.json").read_text())["accuracy"]["decisions"]
    assert [(d["rule"], d["at"], d["kept"]) for d in planned] == [(d["rule"], d["at"], d["kept"]) for d in rewritten]


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "1"], "needs data"),
    (["--max-drop", "1", "--data", "DATA", "--no-weights"], "needs the trained weights"),
    (["--data", "DATA"], "no maximum drop"),
    (["--max-drop", "1", "--data", "DATA", "--budget", "soon"], "budget 'soon'"),
])
def test_bad_accuracy_settings_are_one_line_errors(tiny: tuple[Path, str, str, str], args: list[str],
                                                   message: str) -> None:
    folder, proto, model, photos = tiny
    out = folder / "bad.prototxt"
    weights = [] if "--no-weights" in args else ["--weights", model]
    args = [photos if a == "DATA" else a for a in args if a != "--no-weights"]
    done = CliRunner().invoke(main, ["rewrite", proto, str(out), *weights, *args])
    assert done.exit_code == 2, done.output
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error:")
    assert not out.exists()


def test_tucker_ranks_follow_the_maximum_drop(tiny: tuple[Path, str, str, str]) -> None:
    """With Tucker, each decomposition is a lossy candidate: one the budget cannot recover is not made."""
    folder, proto, model, photos = tiny
    out = folder / "tucker.prototxt"
    result = api.rewrite_files(proto, out, model, folder / "tucker.caffemodel", None, api.preset_options(
        None, rules="tucker", rank_method="ranks:1,1", max_drop=0.0, data=photos, budget="24it",
        transform=api.Transform(scale=1 / 256)))
    chosen = result.accuracy
    assert chosen is not None and chosen.risks
    tucker = [d for d in chosen.decisions if chosen.plan.candidates[d.candidate].rule == "decompose_conv_tucker"]
    assert tucker
    made = {change.removed[0] for change in result.report.changes
            if change.rule == "decompose_conv_tucker"}
    for d in tucker:
        anchor = chosen.plan.candidates[d.candidate].layers[0]
        assert (anchor in made) == d.kept, (anchor, d)


def test_a_time_budget_covers_the_runs_and_what_it_cannot_cover_is_not_run(tiny: tuple[Path, str, str, str]) -> None:
    from deeprebirth.plan.candidates import plan_file
    from deeprebirth.plan.recoverable import measure_risks

    _, proto, model, photos = tiny
    plan = plan_file(proto, model, rounds=1, warmup=0)
    chosen = measure_risks(plan, proto, model, photos, 5.0, budget="1s", transform=api.Transform(scale=1 / 256))
    lossy = [k for k, c in enumerate(plan.candidates) if c.risk == "lossy"]
    assert sorted(chosen.risks) == lossy
    skipped = [r for r in chosen.risks.values() if r.budget == "0s"]
    assert skipped and all(not r.updated and r.agreement_before is None for r in skipped)
    ran = [r for r in chosen.risks.values() if r.budget != "0s"]
    assert ran and chosen.seconds < 1 + 2 * max(r.seconds for r in ran)  # B, overrun by about one run at most
    reasons = {d.candidate: d.reason for d in chosen.decisions}
    assert all("spent the budget" in reasons[r.candidate] for r in skipped)


def test_starved_runs_are_made_again_with_a_share_that_covers_their_fixed_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake runs on a fake clock: each costs 30 s before its first update, then its budget; the best merge first."""
    from deeprebirth.finetune.budget import Budget
    from deeprebirth.plan import recoverable

    clock = [0.0]
    calls: list[tuple[int, float]] = []

    def fake_assess(prototxt: str, weights: str, candidates: list, data: str, options: FinetuneOptions, config: object,
                    which: list[int]) -> list[Risk]:
        seconds = Budget.parse(options.budget).amount
        calls.append((which[0], seconds))
        spent = max(seconds, 30.0)
        clock[0] += spent
        iterations = int((seconds - 30) // 5) if seconds > 30 else 0
        measured = risk(which[0], 0.0 if iterations else None, iterations)
        measured.seconds = spent
        return [measured]

    monkeypatch.setattr(recoverable, "assess", fake_assess)
    monkeypatch.setattr(recoverable.time, "monotonic", lambda: clock[0])
    plan = type("FakePlan", (), {"candidates": CANDIDATES})()
    chosen = recoverable.measure_risks(plan, "p", "w", "d", 1.0, budget="3m")  # type: ignore[arg-type]
    # by time saved: 1 (10 ms), 3 (5), 4 (4), 2 (2); 180 s / 4 = 45 s buys 1 its updates
    assert calls[0] == (1, 45.0) and chosen.risks[1].updated
    # 3 gets 135 / 3 = 45 s, 4 gets 90 / 2 = 45 s, 2 the last 45 s: all updated, nothing made twice
    assert [k for k, _ in calls] == [1, 3, 4, 2] and all(r.updated for r in chosen.risks.values())
    # a smaller budget: 100 s / 4 = 25 s starves 1; it is made again with 2 x 30 s; what is left covers no other
    clock[0], calls[:] = 0.0, []
    chosen = recoverable.measure_risks(plan, "p", "w", "d", 1.0, budget="100s")  # type: ignore[arg-type]
    assert calls == [(1, 25.0), (1, 60.0)]
    assert chosen.risks[1].updated and [k for k, d in ((d.candidate, d) for d in chosen.decisions) if d.kept] == [0, 1]
    assert all(chosen.risks[k].budget == "0s" and not chosen.risks[k].updated for k in (2, 3, 4))


def test_a_run_without_an_update_is_shown_without_after_figures() -> None:
    from deeprebirth.cli.render import risk_cells

    cells = risk_cells(risk(0, None, iterations=0, drop_before=12.0))
    assert cells == ["88.00% (no update)", "0.5 (no update)", "12.0 (no update)", "0"]
    assert risk_cells(risk(0, 1.0, iterations=7, drop_before=12.0))[2:] == ["12.0 -> 1.0", "7"]
