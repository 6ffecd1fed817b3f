"""Does `deeprebirth finetune`'s default learning-rate choice generalise? (issue 16)

For every row (a variant of a case from benchmarks/recovery_cases.py), at the same epoch budget:

* ``default``: `deeprebirth finetune` with its defaults: only the data, the transform flags, `--budget` and `--mode`;
* ``lr X`` for each fixed rate (`--lr 0.001, 0.003, 0.01, 0.03`, SGD, the default solver);

each result evaluated on the case's test set with `deeprebirth evaluate --reference` the original: test top-1 for
label-mode rows, top-1 agreement with the original for the label-free flowers17 row, and for open_nsfw (where
agreement saturates at 100%) the mean total-variation distance of the output probabilities to the original's
(lower is better; measured for every run, in a second table). The table shows the
rate and solver the default run chose (from its `finetune --json` report), its result, each fixed rate's result,
the best fixed rate in hindsight and the gap (default minus hindsight best, in points; the aim: >= -0.3).

``--loss-table`` (issue 16, item 4) instead compares distillation losses on the low-agreement rows (default:
open_nsfw/mimic and flowers17/tucker): the default (`--loss auto`: the search picks the loss where agreement
starts low), and each loss fixed: KD at T=4 (`--loss kd`), KD at T=1 (`--loss kd --temperature 1`), regression on
the logits (`--loss regression`), each with the default rate choice, at the same budget; `--loss-variant
NAME=FLAGS` adds more.

    .venv/bin/python benchmarks/lr_choice.py --cases mnist,flowers17 --tag before
    .venv/bin/python benchmarks/lr_choice.py --cases flowers17/label --budget flowers17/label=4ep
    .venv/bin/python benchmarks/lr_choice.py --loss-table --tag before
    .venv/bin/python benchmarks/lr_choice.py --rates "" --flags="--hints on" --tag hints   # every run hinted

Every run is cached in the case folder (runs/<row>/<run>/: the caffemodel, the finetune report and log, the
evaluation), keyed by the command line, the inputs and the code of deeprebirth/ (so a changed fine-tuning
rerun everything; ``--fresh`` forces it). The tables go to benchmarks/results/lr_choice[_TAG].md /
loss_choice[_TAG].md with the raw JSON next to them; rows of an earlier run with the same tag that were not rerun
are kept (``--replace`` drops them). Progress: one line on stderr when each run starts and ends (``--verbose``
passes `finetune`'s own progress through).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("GLOG_minloglevel", "2")

import recovery_cases as rc

RATES = (0.001, 0.003, 0.01, 0.03)
LOSS_ROWS = ("open_nsfw/mimic", "flowers17/tucker")
LOSS_VARIANTS = {"default (auto)": [], "KD T=4": ["--loss", "kd"], "KD T=1": ["--loss", "kd", "--temperature", "1"],
                 "logit regression": ["--loss", "regression"]}
RESULTS = HERE / "results"
log = rc.log


SEARCH_CODE = ("deeprebirth/finetune/search.py", "deeprebirth/finetune/probes.py")


def code_key(fixed_rate: bool) -> list[str]:
    """What a run's result depends on in the project's code: the whole package (fine-tuning, data, evaluation),
    less the rate search's two modules for a run given its rate (`--lr` skips the search), so a change to the
    search reruns only the default runs."""
    files = sorted((ROOT / "deeprebirth").rglob("*.py"))
    if fixed_rate:
        files = [f for f in files if f.relative_to(ROOT).as_posix() not in SEARCH_CODE]
    return rc.example.file_key(*files)


def data_key(path: str) -> Any:
    p = Path(path)
    return rc.folder_key(p) if p.is_dir() else rc.example.file_key(p)


def run_one(case: rc.Case, row: rc.Variant, label: str, extra: list[str], budget: str, fresh: bool,
            verbose: bool, index: str) -> dict[str, Any]:
    """One `finetune` + `evaluate`, cached in the case folder."""
    folder = Path(case.folder) / "runs" / row.name.replace("/", "_") / f"{label}_{budget}"
    folder.mkdir(parents=True, exist_ok=True)
    original = case.original_files
    slim_prototxt, slim_weights, report = case.files(row.net)
    cli = rc.deeprebirth_cli()
    finetune = [cli, "finetune", *original, slim_prototxt, slim_weights, "--report", report, "--data", row.train,
                "--out", str(folder / "final.caffemodel"), "--json", str(folder / "finetune.json"),
                "--work-dir", str(folder / "work"), "--budget", budget, "--mode", row.mode, *case.transform, *row.flags, *extra]
    evaluate = [cli, "evaluate", slim_prototxt, str(folder / "final.caffemodel"), "--data", case.test,
                "--reference", *original, "--json", str(folder / "eval.json"), *case.transform]
    in_process = row.score == "output_distance"
    key = {"finetune": finetune[1:], "evaluate": "in-process (compare_outputs)" if in_process else evaluate[1:],
           "code": code_key("--lr" in extra),
           "inputs": rc.example.file_key(*map(Path, (*original, slim_prototxt, slim_weights, report))),
           "train": data_key(row.train), "test": data_key(case.test)}
    record = folder / "run.json"
    digest = rc.example.digest_of(key)
    if not fresh and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == digest and (folder / "final.caffemodel").is_file():
            result = saved["result"]
            if "output_distance" not in result:  # runs recorded before the distance was measured
                result["output_distance"] = output_distance(case, slim_prototxt, str(folder / "final.caffemodel"))
                record.write_text(json.dumps(saved, indent=2))
            log(f"{index} {row.name} {label} {budget}: cached ({describe(result, row)})")
            return result  # type: ignore[no-any-return]
    log(f"{index} {row.name} {label} {budget}: finetune ... (log: {folder / 'finetune.log'})")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", GLOG_minloglevel="2")
    started = time.perf_counter()
    for stale in ("final.caffemodel", "finetune.json", "eval.json"):
        (folder / stale).unlink(missing_ok=True)
    with open(folder / "finetune.log", "w") as handle:
        done = subprocess.run(finetune, check=False, env=env, stdout=handle, stderr=None if verbose else subprocess.STDOUT)
    finetune_seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (folder / "finetune.log").read_text().strip().splitlines()[-3:]
        log(f"{index} {row.name} {label}: finetune FAILED (exit {done.returncode}): " + " | ".join(tail))
        return {"failed": True, "returncode": done.returncode, "log_tail": tail, "finetune_seconds": finetune_seconds}
    started = time.perf_counter()
    compared = compare_outputs(case, slim_prototxt, str(folder / "final.caffemodel"))
    distance = compared["distance"]
    if in_process:
        # no labels to score: the agreement comes from the same outputs (`evaluate --reference` would run the
        # original again on every run, which on open_nsfw costs as much as the fine-tuned net)
        evaluation = {"top1": None, "agreement": compared["agreement"], "images": compared["images"]}
    else:
        subprocess.run(evaluate, env=env, check=True, stdout=subprocess.DEVNULL)
        evaluation = json.loads((folder / "eval.json").read_text())
    evaluate_seconds = time.perf_counter() - started
    report_json = json.loads((folder / "finetune.json").read_text())
    steps = report_json.get("steps", [])
    result = {"label": label, "budget": budget, "extra": extra, "top1": evaluation.get("top1"),
              "agreement": evaluation.get("agreement"), "reference_top1": evaluation.get("reference_top1"),
              "top1_change_error": evaluation.get("top1_change_error"),
              "images": evaluation.get("images"), "output_distance": distance,
              "chosen": [{"name": s.get("name"), "solver": s.get("solver"), "lr": s.get("lr"), "loss": s.get("loss"),
                          "backoffs": s.get("backoffs"), "search": s.get("search"),
                          "lr_search": s.get("lr_search"), "iterations": s.get("iterations"),
                          "best_iteration": s.get("best_iteration"), "stopped_early": s.get("stopped_early")}
                         for s in steps],
              "held_out": {k: report_json.get(k) for k in ("held_out", "original_accuracy", "slim_accuracy",
                                                            "final_accuracy")},
              "finetune_seconds": finetune_seconds, "evaluate_seconds": evaluate_seconds,
              "command": " ".join(["deeprebirth", *finetune[1:]]), "folder": str(folder)}
    record.write_text(json.dumps({"key": digest, "settings": key, "result": result}, indent=2))
    log(f"{index} {row.name} {label} {budget}: {describe(result, row)}, finetune {finetune_seconds:.0f} s + "
        f"evaluate {evaluate_seconds:.0f} s")
    return result


def test_outputs(case: rc.Case, prototxt: str, weights: str) -> Any:
    """The net's output (class probabilities) on the case's test images, in pycaffe (1 thread)."""
    import numpy as np

    from deeprebirth.caffe.data import Batches, open_data
    from deeprebirth.caffe.evaluate import NetIO, predict
    from deeprebirth.caffe.runtime import import_caffe
    from deeprebirth.ir.model import load_model

    caffe = import_caffe()
    io = NetIO.of(load_model(prototxt), prototxt)
    transform = rc.TRANSFORMS[case.name].for_evaluation()
    data = open_data(case.test, channels=io.channels, input_size=io.size, transform=transform)
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
    return predict(net, io, Batches(data, transform, io.size), np.arange(len(data)))


def compare_outputs(case: rc.Case, prototxt: str, weights: str) -> dict[str, float]:
    """The net against the original on the test images, from their output probabilities (the original's cached):
    ``distance``, the mean total-variation distance in points (a continuous measure where top-1 agreement saturates:
    open_nsfw calls every flower photo safe), and ``agreement``, the top-1 agreement (a fraction). Cached in the case
    folder by the files' contents."""
    import numpy as np

    table_path = Path(case.folder) / "output_distances.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    original = case.original_files
    key = rc.example.digest_of({"net": rc.example.file_key(Path(prototxt), Path(weights)), "test": data_key(case.test),
                                "original": rc.example.file_key(*map(Path, original))})
    if not isinstance(table.get(key), dict):
        reference_key = rc.example.digest_of({"original": rc.example.file_key(*map(Path, original)),
                                              "test": data_key(case.test)})
        reference_path = Path(case.folder) / f"test_outputs_original.{reference_key}.npy"
        if reference_path.is_file():
            reference = np.load(reference_path)
        else:
            reference = test_outputs(case, *original)
            np.save(reference_path, reference)
        mine = test_outputs(case, prototxt, weights)
        table[key] = {"distance": float(100 * np.mean(0.5 * np.abs(mine - reference).sum(axis=1))),
                      "agreement": float(np.mean(mine.argmax(axis=1) == reference.argmax(axis=1))),
                      "images": len(mine)}
        table_path.write_text(json.dumps(table, indent=1))
    return table[key]  # type: ignore[no-any-return]


def output_distance(case: rc.Case, prototxt: str, weights: str) -> float:
    return float(compare_outputs(case, prototxt, weights)["distance"])


LOWER_IS_BETTER = {"output_distance"}


def score(result: dict[str, Any], row: rc.Variant) -> float | None:
    """The row's score in points: top-1 or agreement (%, higher is better), or the output distance (lower)."""
    if result.get("failed"):
        return None
    value = result.get(row.score)
    if value is None:
        return None
    return float(value) if row.score in LOWER_IS_BETTER else 100 * value


def noise(result: dict[str, Any], row: rc.Variant) -> str:
    """One standard error of the row's score, in points, from the test set's size: paired over the images for a
    top-1 change against the original (``evaluate``'s), binomial for an agreement; '-' for a distance or where not
    recorded (runs made before evaluate reported it)."""
    if row.score == "top1" and result.get("top1_change_error") is not None:
        return f"{100 * result['top1_change_error']:.2f}"
    if row.score == "agreement" and result.get("agreement") is not None and result.get("images"):
        a = float(result["agreement"])
        return f"{100 * (a * (1 - a) / int(result['images'])) ** 0.5:.2f}"
    return "-"


def chosen_text(result: dict[str, Any]) -> str:
    if result.get("failed"):
        return "failed"
    parts = [f"{s['solver']} {s['lr']:.3g}" + ("" if s.get("loss") in (None, "", "KD T=4") else f" {s['loss']}")
             + (" (backed off)" if s.get("backoffs") else "")
             for s in result.get("chosen", []) if s.get("lr") is not None]
    return ", ".join(parts) or "?"


def describe(result: dict[str, Any], row: rc.Variant) -> str:
    value = score(result, row)
    text = "failed" if value is None else f"{row.score} {value:.2f}"
    if row.score != "output_distance" and result.get("output_distance") is not None:
        text += f", output distance {result['output_distance']:.2f}"
    return f"{text} (chosen: {chosen_text(result)})"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def select(names: list[str], cases: dict[str, rc.Case]) -> list[tuple[rc.Case, rc.Variant]]:
    rows = []
    for case in cases.values():
        for row in case.variants:
            if case.name in names or row.name in names:
                rows.append((case, row))
    return rows


def machine() -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": rc.commit(),
            "host": platform.node(), "cpus": os.cpu_count(), "load": os.getloadavg(),
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def merge(path: Path, rows: dict[str, Any], replace_all: bool) -> dict[str, Any]:
    old = {} if replace_all or not path.is_file() else json.loads(path.read_text()).get("rows", {})
    old.update(rows)
    return old


def before_values(case: rc.Case, row: rc.Variant) -> tuple[str, float]:
    """The rewritten net before fine-tuning: the row's score (text) and the output distance."""
    distance = output_distance(case, *case.files(row.net)[:2])
    if row.score == "output_distance":
        return f"{distance:.2f}", distance
    value = case.nets.get(row.net, {}).get("test_before", {}).get(row.score)
    return ("-" if value is None else f"{100 * value:.2f}"), distance


def lr_table(data: dict[str, Any], rates: list[float]) -> list[str]:
    lines = [("| row | mode | budget | score | before fine-tuning | default: chosen | default (± 1 s.e.) | "
              + "".join(f"lr {r:g} | " for r in rates) + "hindsight best | gap (pt) | within 0.3 pt |"),
             "|" + "---|" * (10 + len(rates))]
    for name, entry in data.items():
        runs = entry["runs"]
        fixed = {r: runs.get(f"lr{r:g}", {}).get("score") for r in rates}
        known = {r: v for r, v in fixed.items() if v is not None}
        default = runs.get("default", {})
        lower = entry["score"] in LOWER_IS_BETTER
        best_rate = (min if lower else max)(known, key=lambda r: known[r]) if known else None
        best_text, gap_text, ok = "-", "-", "-"
        if best_rate is not None:
            best_text = f"{known[best_rate]:.2f} (lr {best_rate:g})"
            if default.get("score") is not None:
                gap = (known[best_rate] - default["score"]) if lower else (default["score"] - known[best_rate])
                gap_text, ok = f"{gap:+.2f}", "yes" if gap >= -0.3 else "**no**"
                if lower:
                    ok = "n/a (distance)"
        budget = " ".join([entry["budget"], *entry.get("flags", [])])
        spread = f" (± {default['noise']})" if default.get("noise", "-") != "-" else ""
        lines.append(f"| {name} | {entry['mode']} | {budget} | {entry['score']} | {entry['before']} | "
                     f"{default.get('chosen', '-')} | {pct(default.get('score'))}{spread} | "
                     + "".join(f"{pct(fixed[r])} | " for r in rates) + f"{best_text} | {gap_text} | {ok} |")
    return lines


def distance_table(data: dict[str, Any], names: list[str]) -> list[str]:
    lines = ["| row | before fine-tuning | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for row_name, entry in data.items():
        cells = [entry["runs"].get(n, {}).get("output_distance") for n in names]
        before = entry.get("before_distance")
        lines.append(f"| {row_name} | {pct(before)} | " + " | ".join(pct(c) for c in cells) + " |")
    return lines


def search_table(data: dict[str, Any]) -> list[str]:
    """What the default run's rate search saw (from its finetune report), per phase."""
    lines = [("| row | phase | held-out loss after each candidate's short run | chose | kept / iterations | "
              "stopped early |"), "|---|---|---|---|---|---|"]
    for row_name, entry in data.items():
        for step in entry["runs"].get("default", {}).get("chosen_steps", []) or []:
            search = ", ".join(f"{rate}: {loss:.4g}" for rate, loss in (step.get("lr_search") or {}).items()) or "-"
            lines.append(f"| {row_name} | {step.get('name')} | {search} | {step.get('solver')} {step.get('lr'):g} | "
                         f"{step.get('best_iteration')} / {step.get('iterations')} | {step.get('stopped_early')} |")
    return lines


def times_table(data: dict[str, Any]) -> list[str]:
    lines = ["| row | run | finetune (s) | evaluate (s) |", "|---|---|---|---|"]
    for name, entry in data.items():
        for label, run in entry["runs"].items():
            lines.append(f"| {name} | {label} | {run.get('finetune_seconds', 0):.0f} | "
                         f"{run.get('evaluate_seconds', 0):.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None,
                        help="cases or rows, comma-separated (default: every row; with --loss-table: "
                             f"{','.join(LOSS_ROWS)})")
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES), help="the fixed SGD rates")
    parser.add_argument("--budget", action="append", default=[], metavar="ROW=BUDGET",
                        help="override a row's budget (repeatable), e.g. open_nsfw/mimic=90s")
    parser.add_argument("--loss-table", action="store_true", help="item 4: the default's loss choice vs each loss fixed (+ --loss-variant)")
    parser.add_argument("--loss-variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="another loss for --loss-table: a name and the finetune flags that select it")
    parser.add_argument("--flags", default="", help="more finetune flags for every run of the table, e.g. \"--hints on\"")
    parser.add_argument("--seed", type=int, default=0,
                        help="finetune --seed for every run (0: finetune's default); a repeat with another seed "
                             "shows how much of a difference is noise (give it its own --tag)")
    parser.add_argument("--tag", default="", help="results go to lr_choice_TAG.md / loss_choice_TAG.md")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--replace", action="store_true", help="drop rows of an earlier run with the same tag")
    parser.add_argument("--fresh", action="store_true", help="rerun even where a cached run matches")
    parser.add_argument("--verbose", action="store_true", help="pass finetune's own progress through to stderr")
    parser.add_argument("--cache", type=Path, default=rc.CACHE)
    parser.add_argument("--flowers17", type=Path, default=rc.FLOWERS17)
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r]
    wanted = (args.cases.split(",") if args.cases else
              list(LOSS_ROWS) if args.loss_table else list(rc.CASES))
    case_names = sorted({w.split("/")[0] for w in wanted}, key=lambda n: rc.CASES.index(n) if n in rc.CASES else 99)
    cases = rc.prepare(case_names, args.cache, False, args.flowers17)
    rows = select(wanted, cases)
    budgets = dict(b.split("=", 1) for b in args.budget)
    if args.loss_table:
        variants = dict(LOSS_VARIANTS)
        for item in args.loss_variant:
            name, _, flags = item.partition("=")
            variants[name] = flags.split()
        plan = [(case, row, name, "default" if not flags else "loss_" + "_".join(f.strip("-") for f in flags), flags)
                for case, row in rows for name, flags in variants.items()]
    else:
        plan = [(case, row, "default", "default", []) for case, row in rows]
        plan += [(case, row, f"lr{r:g}", f"lr{r:g}", ["--lr", f"{r:g}"]) for case, row in rows for r in rates]
        plan.sort(key=lambda p: rows.index((p[0], p[1])))
    if args.flags:
        more = args.flags.split()
        suffix = "_".join(f.strip("-") for f in more)
        plan = [(case, row, name, f"{label}_{suffix}", [*flags, *more]) for case, row, name, label, flags in plan]
    if args.seed:
        plan = [(case, row, name, f"{label}_seed{args.seed}", [*flags, "--seed", str(args.seed)])
                for case, row, name, label, flags in plan]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for i, (case, row, name, label, flags) in enumerate(plan, 1):
        budget = budgets.get(row.name, row.budget)
        result = run_one(case, row, label, flags, budget, args.fresh, args.verbose, f"[{i}/{len(plan)}]")
        entry = results.setdefault(row.name, {"case": case.name, "mode": row.mode, "net": row.net, "budget": budget,
                                              "score": row.score, "before": None, "before_distance": None,
                                              "train": row.train, "test": case.test, "note": row.note, "flags": list(row.flags),
                                              "original_top1": case.original.get("test", {}).get("top1"),
                                              "runs": {}})
        if entry["before"] is None:
            entry["before"], entry["before_distance"] = before_values(case, row)
        entry["runs"][name] = {**result, "score": score(result, row), "noise": noise(result, row),
                               "chosen": chosen_text(result),
                               "chosen_steps": result.get("chosen", [])}
    stem = "loss_choice" if args.loss_table else "lr_choice"
    stem += f"_{args.tag}" if args.tag else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw_path = args.out_dir / f"{stem}.json"
    data = merge(raw_path, results, args.replace)
    raw_path.write_text(json.dumps({"machine": machine(), "rates": rates, "rows": data,
                                    "cases": {n: asdict(c) for n, c in cases.items()}}, indent=2, default=str))
    command = "benchmarks/lr_choice.py" + (" --loss-table" if args.loss_table else "") + (
        f" --seed {args.seed}" if args.seed else "") + (f" --tag {args.tag}" if args.tag else "")
    lines = [f"# {'Distillation loss' if args.loss_table else 'Learning-rate choice'} at a fixed budget"
             + (f" ({args.tag})" if args.tag else ""), "",
             (f"`.venv/bin/python {command}` (cases from benchmarks/recovery_cases.py; {machine()['date']}, commit "
              f"{machine()['commit']}, 1 OpenBLAS thread). Scores in %: test top-1 (labels) or top-1 agreement with "
              "the original on the test set; before fine-tuning: the rewritten net as it comes out of `rewrite`."), ""]
    if args.loss_table:
        names = list(dict.fromkeys(n for entry in data.values() for n in entry["runs"]))
        lines += ["| row | mode | budget | score | before | " + " | ".join(f"{n}: result (chosen)" for n in names)
                  + " | winner |", "|" + "---|" * (6 + len(names))]
        for row_name, entry in data.items():
            runs = entry["runs"]
            cells = [f"{pct(runs[n]['score'])} ({runs[n]['chosen']})" if n in runs else "-" for n in names]
            scored = {n: runs[n]["score"] for n in names if n in runs and runs[n]["score"] is not None}
            pick = min if entry["score"] in LOWER_IS_BETTER else max
            winner = pick(scored, key=lambda n: scored[n]) if scored else "-"
            budget = " ".join([entry["budget"], *entry.get("flags", [])])
            lines.append(f"| {row_name} | {entry['mode']} | {budget} | {entry['score']} | {entry['before']} | "
                         + " | ".join(cells) + f" | {winner} |")
    else:
        lines += lr_table(data, rates)
    names = list(dict.fromkeys(n for entry in data.values() for n in entry["runs"]))
    lines += ["", ("Output distance to the original on the test set (mean total-variation distance between the output "
                   "probabilities, in points; lower is better; it does not saturate where top-1 agreement does):"), "",
              *distance_table(data, names)]
    if not args.loss_table:
        lines += ["", "The default runs' learning-rate search (from their `finetune --json` reports):", "",
                  *search_table(data)]
    lines += ["", "Wall time per run (1 thread, shared 2-core machine):", "", *times_table(data), ""]
    md_path = args.out_dir / f"{stem}.md"
    md_path.write_text("\n".join(lines))
    print("\n".join(lines))
    log(f"wrote {md_path} and {raw_path} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
