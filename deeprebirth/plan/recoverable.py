"""Which lossy merges the user's data and fine-tuning budget can recover: the choice behind ``--max-drop``.

``rewrite --data D --max-drop P [--budget B]`` (and ``plan --data D --max-drop P``) measure each lossy candidate
of the plan (``deeprebirth.plan.candidates``) with a short distillation run of the net with only that merge and the merges
it builds on (``deeprebirth.plan.risk``), and keep only the merges that run says fine-tuning can bring back to within
``P`` points of the original:

* **budget**: the risk runs together cost about ``B``, the fine-tuning budget the user plans (default: that of
  ``finetune``): each of the ``n`` lossy candidates gets ``B / n`` (``risk.share_budget``); under a time budget a
  run gets what is left of ``B`` over the runs still to come, so a run's fixed costs (loading, held-out
  evaluations) come out of the later shares, and once ``B`` is spent the remaining candidates are not run (they
  count as runs without an update). The runs go in order of time saved, so a budget too small for every candidate
  goes to the merges that save the most. Where a run's fixed costs eat its whole share (an ImageNet-size net on a
  CPU: about a minute of loading and held-out evaluations before the first update), the run is made once more with
  ``STARVED_FACTOR`` times what the starved one cost, and every later run gets at least that much: fewer
  candidates are measured, but those that are get real updates, rather than every one getting none. A merge the full
  fine-tuning has to recover together with the others gets, in its own run, only its share: a merge that is back
  within ``P`` after ``B / n`` alone is one the whole budget can recover.
* **drop**, in points (``Risk.drop_after``): with labels the original's held-out top-1 minus the net's, without
  labels 100 x (1 - top-1 agreement with the original), after the short run.
* **recoverable**: the run made at least one update and its drop after is at most ``P``. A run that made no update
  says nothing about recovery: its merge is left out (a budget share too small for one iteration is the typical
  case; a larger ``B`` or fewer candidates buys one).
* **dependencies** (``risk.dependencies``): a merge is kept only with every lossy merge it builds on, so a merge
  whose base is left out is left out too, and nothing a kept merge builds on is dropped.
* **combined**: several merges cost more than each alone, so the choice is conservative: merges are taken greedily
  by time saved per point of drop (drops under ``MIN_DROP`` count as ``MIN_DROP``; time from the plan's
  ``time_saved_ms``), each with what it builds on, while the summed drops of everything kept stay within ``P``
  (a merge measured with the merges it builds on counts their drop again: more conservative still).
* **exact folds** always apply: they change no output.

``permit`` turns the choice into the rewrite's say over each match: exact rules always, lossy ones only at the
places (rule, anchor layer) that were measured and kept, so a merge that only appears once another was left out is
never made unmeasured. The module's pure functions (``select``, ``permit``) take plain candidates and risks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from deeprebirth.caffe.data import PathLike, Transform
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune.budget import Budget
from deeprebirth.plan.candidates import Candidate, Plan, plan_file
from deeprebirth.plan.risk import Risk, assess, dependencies, risk_options, share_budget
from deeprebirth.rules import Match, Rule, RuleConfig

MIN_DROP = 0.1  # points: the least drop a merge is charged when ranking by time saved per point
STARVED_FACTOR = 2.0  # a run that made no update is given this many times its cost: about as much again to train
TOLERANCE = 1e-6  # points: drops are computed from fractions, so 0.7 can come out as 0.7000000000000064
PROFILE_ROUNDS = 5  # timed rounds of the plan's Caffe profile (its times only rank merges and say what they save)


@dataclass
class Decision:
    candidate: int  # index into the plan's candidates
    kept: bool
    reason: str
    drop: float | None = None  # the drop the choice charges for it (points); None: not measured or no update


@dataclass
class AccuracyPlan:
    """A plan, its lossy candidates' measured risks and the choice ``--max-drop`` makes from them."""

    plan: Plan
    max_drop: float | None  # None: risks measured, no choice made
    budget: str  # the fine-tuning budget the risk runs share
    share: str  # each run's budget to start with (B / n; under a time budget the runs adapt it as they go)
    risks: dict[int, Risk]
    decisions: list[Decision]
    seconds: float = 0.0  # the risk runs and the profile
    refused: list[str] = field(default_factory=list)  # lossy matches the rewrite met that the plan did not measure

    def share_of_net(self, k: int) -> float:
        """Candidate ``k``'s time saved, as a percentage of the original net's Caffe time."""
        total = self.plan.profile.total_ms
        return 100 * self.plan.candidates[k].time_saved_ms / total if total else 0.0

    @property
    def left_out(self) -> list[Decision]:
        return [d for d in self.decisions if not d.kept]

    @property
    def kept_lossy(self) -> list[Decision]:
        return [d for d in self.decisions if d.kept and self.plan.candidates[d.candidate].risk == "lossy"]

    def to_json(self) -> dict[str, Any]:
        rows = []
        for d in self.decisions:
            c, r = self.plan.candidates[d.candidate], self.risks.get(d.candidate)
            rows.append({"candidate": d.candidate, "rule": c.rule, "at": c.layers[0], "risk": c.risk,
                         "summary": c.summary, "kept": d.kept, "reason": d.reason, "charged_drop": d.drop,
                         "time_saved_ms": c.time_saved_ms, "time_saved_pct": self.share_of_net(d.candidate),
                         "measured": None if r is None else dict(asdict(r), updated=r.updated,
                                                                 drop_before=r.drop_before,
                                                                 drop_after=r.drop_after)})
        return {"max_drop": self.max_drop, "budget": self.budget, "share": self.share,
                "net_ms": self.plan.profile.total_ms, "seconds": self.seconds, "decisions": rows,
                "refused_unmeasured": self.refused}


def select(candidates: Sequence[Candidate], risks: dict[int, Risk], max_drop: float) -> list[Decision]:
    """The choice of the module docstring, one decision per exact candidate and per measured lossy one (in plan
    order); lossy candidates without a risk (outside the user's --only/--exclude) get none."""
    lossy = {k for k, c in enumerate(candidates) if c.risk == "lossy"}
    needs = {k: [j for j in dependencies(candidates, k) if j in lossy] for k in risks}
    own: dict[int, str] = {}  # measured lossy candidates that cannot be kept on their own run's evidence
    for k, risk in risks.items():
        if not risk.updated:
            used_up = ": the runs before it spent the budget" if risk.budget == "0s" else ""
            own[k] = f"no update in its share of the budget ({risk.budget}{used_up}): its recovery is unknown"
        elif risk.drop_after is None or risk.drop_after > max_drop + TOLERANCE:
            own[k] = f"{_points(risk.drop_after)} lost after its short run, more than {max_drop:g}"
    blocked: dict[int, str] = {}
    for k in sorted(risks):
        bad = [j for j in needs[k] if j in own or j in blocked or j not in risks]
        if k not in own and bad:
            blocked[k] = f"builds on #{bad[0] + 1} ({candidates[bad[0]].layers[0]}), which is left out"

    def charge(k: int) -> float:
        return max(risks[k].drop_after or 0.0, 0.0)

    kept: set[int] = set()
    spent = 0.0
    reasons: dict[int, str] = {}
    ranked = sorted((k for k in risks if k not in own and k not in blocked),
                    key=lambda k: (-candidates[k].time_saved_ms / max(charge(k), MIN_DROP), k))
    for k in ranked:
        if k in kept:
            continue
        closure = [j for j in needs[k] + [k] if j not in kept]
        cost = sum(charge(j) for j in closure)
        if spent + cost <= max_drop + TOLERANCE:
            kept.update(closure)
            spent += cost
        else:
            reasons[k] = (f"{_points(charge(k))} lost after its short run; with the {_points(spent)} of the merges "
                          f"kept before it (more time saved per point) the sum would pass {max_drop:g}")
    decisions = []
    for k, c in enumerate(candidates):
        if c.risk == "exact":
            decisions.append(Decision(k, True, "exact: changes no output"))
        elif k in risks:
            drop = risks[k].drop_after if risks[k].updated else None
            why = f"{_points(drop)} lost after its short run, within {max_drop:g}" if k in kept else \
                own.get(k) or blocked.get(k) or reasons.get(k, "")
            decisions.append(Decision(k, k in kept, why, drop))
    return decisions


def permit(candidates: Sequence[Candidate], decisions: Sequence[Decision],
           refused: list[str] | None = None) -> Callable[[Rule, Match], bool]:
    """The rewrite's say over each match: exact rules always; lossy ones only where (rule, anchor) was kept.
    Lossy matches at places the plan never measured are appended to ``refused`` (as "rule at 'layer'")."""
    kept = {(candidates[d.candidate].rule, candidates[d.candidate].layers[0]) for d in decisions if d.kept}
    measured = {(candidates[d.candidate].rule, candidates[d.candidate].layers[0]) for d in decisions}

    def allowed(rule: Rule, found: Match) -> bool:
        place = (rule.name, found.layers[0])
        if rule.exact or place in kept:
            return True
        text = f"{rule.name} at '{found.layers[0]}'"
        if refused is not None and place not in measured and text not in refused:
            refused.append(text)
        return False

    return allowed


def plan_for_accuracy(prototxt: PathLike, weights: PathLike, data: PathLike, max_drop: float | None, *,
                      budget: str, transform: Transform | None = None, rules: Sequence[str] = ("all",),
                      only: Sequence[str] = (), exclude: Sequence[str] = (), config: RuleConfig | None = None,
                      seed: int = 0,
                      progress: Callable[[int, int, Candidate], None] | None = None) -> AccuracyPlan:
    """Profile and plan ``prototxt`` with ``rules`` (rule names), then ``measure_risks``."""
    started = time.monotonic()
    plan = plan_file(prototxt, weights, rules=rules, rounds=PROFILE_ROUNDS, seed=seed, config=config, clock="cpu")
    chosen = measure_risks(plan, prototxt, weights, data, max_drop, budget=budget, transform=transform, only=only,
                     exclude=exclude, config=config, seed=seed, progress=progress)
    chosen.seconds = time.monotonic() - started
    return chosen


def measure_risks(plan: Plan, prototxt: PathLike, weights: PathLike, data: PathLike, max_drop: float | None, *,
            budget: str, transform: Transform | None = None, only: Sequence[str] = (), exclude: Sequence[str] = (),
            config: RuleConfig | None = None, seed: int = 0,
            progress: Callable[[int, int, Candidate], None] | None = None) -> AccuracyPlan:
    """Measure the lossy candidates of ``plan`` that ``only`` / ``exclude`` allow, ``budget`` shared out among
    them, and choose with ``max_drop`` (None: measure only, no choice); see the module docstring."""
    started = time.monotonic()
    chosen = set(only)
    which = [k for k, c in enumerate(plan.candidates) if c.risk == "lossy"
             and (not chosen or chosen.intersection(c.layers)) and not set(exclude).intersection(c.layers)]
    which.sort(key=lambda k: -plan.candidates[k].time_saved_ms)  # a budget too small for all goes to the best first
    share = share_budget(budget, len(which))
    total = Budget.parse(budget)
    transform = transform or Transform(mirror=True)

    def run(k: int, budget_text: str) -> Risk:
        options = risk_options(budget_text, seed=seed, transform=transform)
        return assess(prototxt, weights, plan.candidates, data, options, config, which=[k])[0]

    risks: dict[int, Risk] = {}
    fixed = 0.0  # seconds a run can cost without making an update (loading, evaluations): learned from such runs
    for n, k in enumerate(which):
        if progress is not None:
            progress(n + 1, len(which), plan.candidates[k])
        if not total.timed:
            risks[k] = run(k, share)
            continue
        left = total.amount - (time.monotonic() - started)
        seconds = max(left / (len(which) - n), STARVED_FACTOR * fixed)
        if seconds > left or seconds < 0.001:
            risks[k] = Risk(k, dependencies(plan.candidates, k), None, None, None, None, 0.0, "0s")
            continue
        risk = run(k, f"{seconds:.3f}s")
        if not risk.updated:  # starved: its fixed costs took the whole share; once more with one that covers them
            fixed = max(fixed, risk.seconds)
            if STARVED_FACTOR * fixed <= total.amount - (time.monotonic() - started):
                risk = run(k, f"{STARVED_FACTOR * fixed:.3f}s")
        risks[k] = risk
    decisions = [] if max_drop is None else select(plan.candidates, risks, max_drop)
    return AccuracyPlan(plan, max_drop, budget, share, risks, decisions, time.monotonic() - started)


def check_settings(weights: PathLike | None, max_drop: float | None, data: PathLike | None, budget: str) -> None:
    """A maximum drop needs trained weights and data to measure on, and a valid budget; data is for nothing else.
    Checked before any work."""
    if max_drop is None:
        if data is not None:
            raise DeepRebirthError("data given, but no maximum drop to measure the merges' risk for",
                                   options=("data", "max_drop"))
        return
    if data is None:
        raise DeepRebirthError("a maximum drop needs data to measure each lossy merge's accuracy risk on",
                               options=("max_drop", "data"))
    if weights is None:
        raise DeepRebirthError("a maximum drop needs the trained weights (the risk is measured against them)",
                               options=("max_drop", "weights"))
    Budget.parse(budget)


def _points(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f} points"
