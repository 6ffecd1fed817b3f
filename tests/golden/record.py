"""The golden set: what ``rewrite`` writes (prototxt text, caffemodel bytes, report JSON) for every real net under
every rule group, preset and widen/init/rank choice, recorded once on trusted code and compared bit for bit by
tests/test_golden.py, so a refactor that claims to preserve behaviour can prove it.

    PYTHONPATH=$PWD python -m tests.golden.record            # rewrite tests/golden/*.json from the current code

Inputs: the model-zoo deploy nets (GoogLeNet, AlexNet, CaffeNet) and the Fashion-MNIST example's net get seeded
random weights (no trained caffemodel is bundled); open_nsfw and the SSD face detector use their real weights.
Outputs are stored as sha256 digests (the caffemodels are megabytes), reports in full so a change reads as a diff.
A caffemodel with Tucker pieces is stored as each blob's L1 and L2 norms instead (``weight_norms``), compared to a
relative 1e-4: its weights come from LAPACK's symmetric eigensolver, whose last bits (and the signs of its
eigenvectors) follow the CPU's BLAS kernels, so their bytes differ between an Intel and an AMD machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
WEIGHT_SEED = 3

# each net's cases: (case name, RewriteOptions settings). Every rule group and preset with the defaults, then the
# choices that change what lossy rules build: init x widen on "all" and "all,tucker", and every kind of rank method
GROUPS = ("exact", "streamline", "branch", "tucker", "all")
CHOICES = [(init, widen) for init in ("inherit", "filler") for widen in ("3x3", "5x5", "balanced")]
RANKS = ("energy:0.9", "speedup:2", "ranks:8,16", "full")
# the 61 M weights of AlexNet and CaffeNet take seconds per rewrite: test_golden runs their full grid only as slow
BIG_NETS = ("bvlc_alexnet", "bvlc_reference_caffenet")
QUICK_CASES = ("all", "preset:deeprebirth+tucker", "all/filler/balanced")


def cases() -> Iterator[tuple[str, dict[str, Any]]]:
    for group in GROUPS:
        yield group, {"rules": group}
    yield "preset:deeprebirth+tucker", {"preset": "deeprebirth+tucker"}
    for init, widen in CHOICES:
        yield f"all/{init}/{widen}", {"rules": "all", "init": init, "widen": widen}
        yield f"all,tucker/{init}/{widen}", {"rules": "all,tucker", "init": init, "widen": widen}
    for rank in RANKS:
        yield f"tucker/{rank}", {"rules": "tucker", "rank_method": rank}
    yield "all/seed7", {"rules": "all", "seed": 7, "init": "filler"}


def assets() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("fetch_assets", ROOT / "scripts" / "fetch_assets.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fetch()  # type: ignore[no-any-return]


def nets() -> tuple[str, ...]:
    return ("bvlc_googlenet", "bvlc_alexnet", "bvlc_reference_caffenet", "open_nsfw", "ssd_face", "fashion_mnist")


def prepare(net: str, folder: Path) -> tuple[str, str]:
    """(prototxt, caffemodel) of ``net`` in ``folder``: real files where bundled, else seeded random weights."""
    from deeprebirth.ir.initializers import random_weights
    from deeprebirth.ir.model import load_model, save_model

    found = assets()
    if net in ("open_nsfw", "ssd_face"):
        return found[f"{net}.prototxt"], found[f"{net}.caffemodel"]
    if net == "fashion_mnist":
        sys.path.insert(0, str(ROOT / "examples" / "fashion_mnist"))
        try:
            import net as fashion_net  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(ROOT / "examples" / "fashion_mnist"))
        source = folder / f"{net}.prototxt"
        source.write_text(fashion_net.prototxt())
    else:
        source = Path(found["model_zoo"]) / net / "deploy.prototxt"
    graph = load_model(source)
    random_weights(graph, seed=WEIGHT_SEED)
    proto, model = folder / f"{net}_in.prototxt", folder / f"{net}_in.caffemodel"
    save_model(graph, proto, model)
    return str(proto), str(model)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weight_norms(path: str | Path) -> dict[str, list[list[float]]]:
    """Per layer, per blob: [L1 norm, L2 norm] in float64, rounded to 9 significant digits. Both are unchanged by
    an eigenvector's sign, and by rounding in the last bits beyond a relative 1e-6 or so."""
    from deeprebirth.io import caffe_io

    def norms(blob: np.ndarray) -> list[float]:
        wide = blob.astype(np.float64)
        return [float(f"{np.abs(wide).sum():.9g}"), float(f"{np.linalg.norm(wide):.9g}")]

    return {name: [norms(b) for b in blobs] for name, blobs in sorted(caffe_io.read_weights(path).items())}


def decomposes(report: dict[str, Any]) -> bool:
    return any(change.get("rule") == "decompose_conv_tucker" for change in report.get("changes", []))


def run_case(proto: str, model: str, settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One rewrite through the library's file API; what it wrote, as digests, and its report. OpenBLAS runs on one
    thread meanwhile: its SVD (Tucker's HOSVD) differs in the last bits between thread counts, and a golden digest
    must not depend on how many cores the machine has."""
    from threadpoolctl import threadpool_limits

    from deeprebirth import api
    settings = dict(settings)
    options = api.preset_options(settings.pop("preset", "deeprebirth"), **settings)
    out_proto, out_model, report = folder / "out.prototxt", folder / "out.caffemodel", folder / "report.json"
    for path in (out_proto, out_model, report):
        path.unlink(missing_ok=True)
    with threadpool_limits(limits=1, user_api="blas"):
        api.rewrite_files(proto, out_proto, model, out_model, report, options)
    written = json.loads(report.read_text())
    weights = {"caffemodel_norms": weight_norms(out_model)} if decomposes(written) else \
        {"caffemodel_sha256": sha256(out_model)}
    return {"prototxt_sha256": sha256(out_proto), **weights, "report": written}


def record_net(net: str, folder: Path, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    proto, model = prepare(net, folder)
    result: dict[str, Any] = {"input_prototxt_sha256": sha256(proto), "input_caffemodel_sha256": sha256(model),
                              "cases": {}}
    for name, settings in cases():
        if only is None or name in only:
            result["cases"][name] = run_case(proto, model, settings, folder)
    return result


def digest(report: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()[:16]


def dumps(result: dict[str, Any]) -> str:
    """Compact and diffable: one line per case and per distinct report (cases share reports by digest)."""
    reports = {digest(case["report"]): case["report"] for case in result["cases"].values()}
    lines = [f' "input_caffemodel_sha256": "{result["input_caffemodel_sha256"]}",',
             f' "input_prototxt_sha256": "{result["input_prototxt_sha256"]}",', ' "cases": {']
    cases = [f'  {json.dumps(name)}: {json.dumps({**case, "report": digest(case["report"])}, sort_keys=True)}'
             for name, case in result["cases"].items()]
    lines += [",\n".join(cases), ' },', ' "reports": {']
    lines += [",\n".join(f'  "{key}": {json.dumps(reports[key], sort_keys=True)}' for key in sorted(reports))]
    return "{\n" + "\n".join(lines) + "\n }\n}\n"


def load(net: str) -> dict[str, Any]:
    """The recorded result of ``net``, reports put back into their cases."""
    stored = json.loads(golden_path(net).read_text())
    for case in stored["cases"].values():
        case["report"] = stored["reports"][case["report"]]
    del stored["reports"]
    return stored


def golden_path(net: str) -> Path:
    return GOLDEN / f"{net}.json"


def main() -> None:
    import tempfile
    import time

    for net in (sys.argv[1:] or nets()):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="deeprebirth-golden-") as tmp:
            result = record_net(net, Path(tmp))
        golden_path(net).write_text(dumps(result))
        print(f"[record] {net}: {len(result['cases'])} cases in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
