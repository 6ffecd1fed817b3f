"""Finding the models in a zoo: nets sniffed (never parsed) as solver, training or deploy net, weights paired by stem
or by folder (the package docstring says the rules)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from deeprebirth.batch.records import FoundModel
from deeprebirth.io import caffe_io

PROTOTXT_SUFFIXES = (".prototxt.txt", ".prototxt")
CAFFEMODEL_SUFFIX = ".caffemodel"
SNIFF_BYTES = 1 << 20

_SOLVER = re.compile(r"^\s*(base_lr|lr_policy|max_iter|solver_mode|snapshot_prefix|train_net|test_iter|net)\s*:",
                     re.MULTILINE)
_DATA_TYPE_NAMES = (*caffe_io.DATA_LAYER_TYPES, *(v1 for v1, t in caffe_io.V1_LAYER_TYPES.items()
                                                   if t in caffe_io.DATA_LAYER_TYPES))
_TRAINING = re.compile(r"\bphase\s*:\s*TRAIN\b"
                       rf"|\btype\s*:\s*\"?({'|'.join(_DATA_TYPE_NAMES)})\b"
                       r"|\btype\s*:\s*\"?(SoftmaxWithLoss|SOFTMAX_LOSS|EuclideanLoss|EUCLIDEAN_LOSS)\b")


def stem(name: str) -> str:
    for suffix in (*PROTOTXT_SUFFIXES, CAFFEMODEL_SUFFIX):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def sniff_kind(path: Path) -> str:
    """"solver", "train_val" or "deploy" from the file name and the first MiB of text (nothing is parsed)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES).decode("utf-8", errors="replace")
    except OSError:
        head = ""  # unreadable: a deploy candidate, whose worker reports the error
    name = path.name.lower()
    if "solver" in name or _SOLVER.search(head):
        return "solver"
    if _TRAINING.search(head) or re.search(r"train_?val|train_?test", name):
        return "train_val"
    return "deploy"


def discover(zoo_dir: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None) -> list[FoundModel]:
    """Every net, solver and caffemodel under ``zoo_dir`` (sorted by path), paired and classified."""
    zoo = Path(zoo_dir).resolve()
    skip_dir = Path(exclude).resolve() if exclude is not None else None
    found: list[FoundModel] = []
    for root, dirs, files in os.walk(zoo):
        folder = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (folder / d).resolve() != skip_dir)
        nets = sorted(f for f in files if f.endswith(PROTOTXT_SUFFIXES) and (folder / f).is_file())
        models = sorted(f for f in files if f.endswith(CAFFEMODEL_SUFFIX) and (folder / f).is_file())
        if not nets and not models:
            continue
        rel = folder.relative_to(zoo)

        def relpath(name: str, rel: Path = rel) -> str:
            return (rel / name).as_posix()

        kinds = {net: sniff_kind(folder / net) for net in nets}
        unpaired = list(models)
        weights: dict[str, str] = {}
        for net in nets:
            same = f"{stem(net)}{CAFFEMODEL_SUFFIX}"
            if kinds[net] != "solver" and same in unpaired:
                weights[net] = same
                unpaired.remove(same)
        deploy = [n for n in nets if kinds[n] == "deploy"]
        loose = [n for n in deploy if n not in weights] or \
            ([n for n in nets if kinds[n] == "train_val" and n not in weights] if not deploy else [])
        if len(loose) > 1:  # several nets: the one named deploy* takes the folder's only caffemodel
            loose = [n for n in loose if n.lower().startswith("deploy")]
        if len(loose) == 1 and len(unpaired) == 1:
            weights[loose[0]] = unpaired.pop()
        for net in nets:
            kind, skip = kinds[net], ""
            if kind == "solver":
                skip = "solver file: describes training, not a net"
            elif kind == "train_val" and deploy:
                skip = f"training net: its folder's deploy net ({', '.join(deploy)}) is the one rewritten"
            found.append(FoundModel(relpath(net), relpath(weights[net]) if net in weights else None, kind, skip))
        for model in unpaired:
            found.append(FoundModel(relpath(model), None, "caffemodel",
                                    "no prototxt pairs with this caffemodel (give one the same stem)"))
    return sorted(found, key=lambda m: m.prototxt)
