"""``deeprebirth export``: load, export to one format, write atomically, optionally check against the reference
(real Caffe, or OpenCV dnn where pycaffe is not importable)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deeprebirth.caffe.options import REFERENCE_OPTION
from deeprebirth.caffe.reference import pick_reference
from deeprebirth.caffe.runtime import Feed, image_feeds, random_feeds
from deeprebirth.errors import DeepRebirthError
from deeprebirth.export.check import RuntimeCheck, check_export
from deeprebirth.export.runtimes import FORMATS, Shape, model_files, require, require_installed
from deeprebirth.export.subgraph import output_blobs, prune
from deeprebirth.io import caffe_io
from deeprebirth.ir.graph import Graph
from deeprebirth.ir.model import PathLike, load_model, same_file, save_model
from deeprebirth.ir.shapes import infer_shapes
from deeprebirth.option import Option
from deeprebirth.rewrite import PHASE_OPTION

SUFFIXES = {runtime.suffix: fmt for fmt, runtime in FORMATS.items()}


@dataclass
class ExportOptions:
    to: str | None = None  # onnx, mnn, ncnn; None: from OUT's suffix
    opset: int = 13
    batch: int | None = None  # None: the net's own batch
    outputs: Sequence[str] = ()  # Caffe blob names to export up to (default: the net's outputs)
    check: int = 0  # random inputs to compare on
    images: Sequence[PathLike] = ()
    tolerance: float | None = None  # None: the runtime's default (runtimes.RUNTIMES)
    seed: int = 0
    phase: str = "TEST"
    reference: str | None = None  # what runs the original for --check: caffe, opencv; None: caffe where importable


_DEFAULT = ExportOptions()
# ``export``'s options, each declared once: the flags come from here, the defaults from ExportOptions
EXPORT_OPTIONS: tuple[Option, ...] = (
    Option("to", str, _DEFAULT.to, choices=tuple(FORMATS),
           help=f"output format  [default: from OUT's suffix: {', '.join(r.suffix for r in FORMATS.values())}]"),
    Option("opset", int, _DEFAULT.opset, minimum=1, help="ONNX opset"),
    Option("batch", int, _DEFAULT.batch, minimum=1, help="batch size of the inputs  [default: the net's]"),
    Option("outputs", str, _DEFAULT.outputs, multiple=True,
           help="blob names to export up to (comma-separated)  [default: the net's outputs]"),
    Option("check", int, _DEFAULT.check, minimum=0,
           help="run Caffe and the exported model on N random inputs and compare"),
    Option("images", str, _DEFAULT.images, multiple=True, path="any",
           help="real photos (files or folders) to compare on too"),
    Option("tolerance", float, _DEFAULT.tolerance,
           help="largest allowed max|a-b|/max|a| per output  [default: "
                + ", ".join(f"{runtime.name} {runtime.tolerance:.0e}".replace("e-0", "e-") for runtime in FORMATS.values())
                + "]"),
    Option("seed", int, _DEFAULT.seed, help="seed for the random inputs"),
    PHASE_OPTION,
    REFERENCE_OPTION,
)


@dataclass
class ExportResult:
    format: str
    files: list[str]
    inputs: dict[str, Shape]
    outputs: dict[str, Shape | None]  # None: unknown to shape inference (a layer only MNN knows)
    nodes: int | None  # ONNX nodes (None for MNN)
    check: RuntimeCheck | None


def export_format(out: PathLike, to: str | None) -> str:
    """The format asked for: ``to``, else from OUT's suffix."""
    if to is not None:
        if to not in FORMATS:
            raise DeepRebirthError(f"unknown format {to!r} ({', '.join(FORMATS)})")
        return to
    suffix = Path(out).suffix.lower()
    if suffix not in SUFFIXES:
        raise DeepRebirthError(f"cannot tell the format from the suffix {suffix or '(none)'!r}: name the format "
                               f"({', '.join(FORMATS)}) or use {', '.join(SUFFIXES)}", file=str(out), options=("to",))
    return SUFFIXES[suffix]


def _check_packages(fmt: str, check: bool) -> None:
    """Fail before any work when a package the job needs is missing."""
    if fmt in ("onnx", "ncnn"):
        require_installed("onnx")
    if fmt == "mnn":
        require_installed("_tools", "MNN")
    if fmt == "ncnn":
        from deeprebirth.export.ncnn import pnnx_binary

        pnnx_binary()
    if check:
        require_installed(FORMATS[fmt].module, FORMATS[fmt].package)


def export_files(prototxt: PathLike, caffemodel: PathLike, out: PathLike,
                 options: ExportOptions | None = None) -> ExportResult:
    """Export (prototxt, caffemodel) to ``out`` in one format; with ``check``/``images`` compare with Caffe."""
    from deeprebirth.io.caffe_io import set_batch

    options = options or ExportOptions()
    fmt = export_format(out, options.to)
    files = model_files(FORMATS[fmt].name, out)
    for target in files:
        for source in (prototxt, caffemodel):
            if same_file(source, target):
                raise DeepRebirthError("the output would overwrite an input", file=str(target))
    _check_packages(fmt, bool(options.check or options.images))
    if options.check or options.images:
        pick_reference(options.reference)  # a missing pycaffe is one line before any work
    if options.batch is not None and options.batch < 1:
        raise DeepRebirthError(f"batch must be at least 1, got {options.batch}")
    graph = load_model(prototxt, caffemodel, phase=options.phase)
    if options.batch is not None:
        set_batch(graph, options.batch)
    if options.outputs:
        graph = prune(graph, options.outputs)
    shapes = infer_shapes(graph)
    inputs: dict[str, Shape] = {}
    for blob in graph.inputs():
        shape = shapes[blob]
        if shape is None:
            raise DeepRebirthError("an input of unknown shape", file=str(prototxt))
        inputs[graph.caffe_name(blob)] = shape
    if not inputs:
        raise DeepRebirthError("the net has no Input layer (or net-level inputs)", file=str(prototxt))
    out_blobs = output_blobs(graph, options.outputs)
    outputs = {graph.caffe_name(b): shapes[b] for b in out_blobs}
    folder = Path(out).parent
    if not folder.is_dir():
        raise DeepRebirthError("output folder does not exist", file=str(out))
    # the model is made and checked in a staging folder next to OUT and moved into place only then, so a runtime
    # that refuses it (or a converter or Caffe that fails half-way) leaves no partial output
    with tempfile.TemporaryDirectory(prefix=".deeprebirth-export-", dir=folder) as stage:
        staged = Path(stage) / Path(out).name
        nodes = None
        if fmt in ("onnx", "ncnn"):
            nodes = _write_onnx_or_ncnn(graph, fmt, staged, options.opset, options.outputs, inputs, outputs)
        else:
            from deeprebirth.export.mnn import caffe_to_mnn

            proto, weights = Path(stage) / "net.prototxt", Path(stage) / "net.caffemodel"
            save_model(graph, proto, weights)
            caffe_to_mnn(proto, weights, staged)
        check = None
        if options.check or options.images:
            feeds = export_feeds(inputs, options.check, options.images, options.seed)
            check = check_export(prototxt, caffemodel, FORMATS[fmt].name, staged, outputs,
                                 feeds, options.tolerance, options.reference)
        for made, target in zip(model_files(FORMATS[fmt].name, staged), files):
            os.replace(made, target)
    return ExportResult(fmt, files, inputs, outputs, nodes, check)


def _write_onnx_or_ncnn(graph: Graph, fmt: str, out: PathLike, opset: int, names: Sequence[str],
                        inputs: dict[str, Shape], outputs: Mapping[str, Shape | None]) -> int:
    """Export to ONNX (refusing unsupported layers by name), check it with onnx.checker, write it or convert it to
    ncnn; returns the number of ONNX nodes."""
    from deeprebirth.export.onnx import to_onnx

    onnx = require("onnx")
    model = to_onnx(graph, opset=opset, outputs=names or None)
    payload = model.SerializeToString()
    try:
        onnx.checker.check_model(payload, full_check=True)
    except Exception as err:  # a checker failure here is a bug in the exporter, not bad input
        raise RuntimeError(f"the exported ONNX model fails onnx.checker: {err}") from err
    if fmt == "onnx":
        caffe_io.atomic_write_bytes(out, payload)
    else:
        from deeprebirth.export.ncnn import onnx_to_ncnn

        onnx_to_ncnn(payload, out, inputs, list(outputs))
    return len(model.graph.node)


def export_feeds(inputs: dict[str, Shape], count: int, images: Sequence[PathLike], seed: int = 0) -> list[Feed]:
    """``count`` N(0, 1) feeds, then one feed per photo (single-input nets only)."""
    feeds = random_feeds(inputs, count, seed)
    if images:
        if len(inputs) != 1:
            raise DeepRebirthError("comparing on images needs a net with exactly one input", options=("images",))
        (name, shape), = inputs.items()
        feeds += image_feeds([os.fspath(p) for p in images], name, shape)
    return feeds
