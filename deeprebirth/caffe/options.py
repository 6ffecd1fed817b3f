"""The options of the commands that run nets in Caffe, each declared once (``deeprebirth.option``): the GPU, the
preprocessing (Caffe's transform_param) and ``evaluate``'s own; and the Transform the preprocessing options make."""

from __future__ import annotations

import dataclasses
from typing import Any

from deeprebirth.caffe.data import Transform, transform_from_prototxt
from deeprebirth.caffe.reference import REFERENCES
from deeprebirth.errors import DeepRebirthError
from deeprebirth.option import Option

REFERENCE_OPTION = Option("reference", str, None, choices=REFERENCES,
                          help="the reference runtime that runs the Caffe files for --check (and times them for "
                               "plan): real Caffe (pycaffe) or OpenCV dnn  [default: caffe where pycaffe imports, "
                               "else opencv]")
GPU_OPTION = Option("gpu", int, None, metavar="ID",
                    help="run on this GPU (needs Caffe built with DEEPREBIRTH_CUDA=1)  [default: CPU]")

TRANSFORM_OPTIONS: tuple[Option, ...] = (
    Option("transform_from", str, None, path="file",
           help="read scale, mean, crop and mirror from this train_val prototxt's data layer"),
    Option("scale", float, None, help="multiply (pixel - mean) by this (e.g. 0.00390625)"),
    Option("mean", str, None, help="mean value(s), one per channel or one for all, comma-separated (BGR)"),
    Option("mean_file", str, None, path="file", help="a binaryproto mean image"),
    Option("crop", int, None, minimum=0, help="crop size (random when training, centred else)"),
    Option("mirror", bool, None, switch=True, negatable=True, help="random horizontal flips when training"),
    Option("resize", str, None, help="resize every image to HxW first (e.g. 256x256)"),
    Option("rgb", bool, False, switch=True, help="feed image files as RGB (Caffe's convention is BGR)"),
)
TRANSFORM_NAMES = tuple(option.name for option in TRANSFORM_OPTIONS)

EVALUATE_OPTIONS: tuple[Option, ...] = (
    Option("data", str, None, path="any", required=True,
           help="labelled data: an image folder (a subfolder per class), a list file (path label) or an .npz"),
    Option("reference", str, None, path="file", nargs=2, metavar="PROTOTXT CAFFEMODEL",
           help="another net (e.g. the original): report its accuracy and how often the top-1 agrees"),
    Option("batch", int, None, minimum=1, help="images per forward pass (default: as many as about 1 GiB of the net "
           "holds, at most 100)"),
    Option("limit", int, None, minimum=1, help="evaluate only the first N images"),
    Option("json_path", str, None, flag="json", path="file", help="write the result as JSON"),
    *TRANSFORM_OPTIONS,
    GPU_OPTION,
)


def transform(transform_from: str | None = None, scale: float | None = None, mean: str | None = None,
              mean_file: str | None = None, crop: int | None = None, mirror: bool | None = None,
              resize: str | None = None, rgb: bool = False) -> Transform:
    """The Transform TRANSFORM_OPTIONS' values describe: ``transform_from``'s (or the default one), changed where a
    value is given; ``mean`` and ``resize`` as the command line spells them ("104,117,123", "256x256")."""
    base = transform_from_prototxt(transform_from, "TRAIN") if transform_from else Transform()
    changes: dict[str, Any] = {"rgb": rgb or base.rgb}
    if scale is not None:
        changes["scale"] = scale
    if mean is not None:
        try:
            changes["mean"] = tuple(float(v) for v in mean.split(",") if v.strip())
        except ValueError:
            raise DeepRebirthError(f"--mean {mean!r}: expected numbers separated by commas") from None
    if mean_file is not None:
        changes["mean_file"] = mean_file
    if crop is not None:
        changes["crop"] = crop
    if mirror is not None:
        changes["mirror"] = mirror
    if resize is not None:
        try:
            height, width = (int(v) for v in resize.lower().split("x"))
        except ValueError:
            raise DeepRebirthError(f"--resize {resize!r}: expected HEIGHTxWIDTH, e.g. 256x256") from None
        changes["resize"] = (height, width)
    return dataclasses.replace(base, **changes)


def pop_transform(settings: dict[str, Any], mirror: bool | None = None) -> Transform:
    """Take TRANSFORM_OPTIONS' values out of a command's ``settings`` and make their Transform; ``mirror``: the
    flips to use when neither --mirror/--no-mirror nor --transform-from says."""
    values = {name: settings.pop(name, None) for name in TRANSFORM_NAMES}
    if values["mirror"] is None and values["transform_from"] is None:
        values["mirror"] = mirror
    values["rgb"] = bool(values["rgb"])
    return transform(**values)
