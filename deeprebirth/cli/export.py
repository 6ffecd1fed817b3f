"""``export``: a net as ONNX, MNN or ncnn, optionally checked in the format's runtime. Library:
``deeprebirth.export``."""

from __future__ import annotations

import sys

import click

from deeprebirth import api
from deeprebirth.cli import render
from deeprebirth.cli.options import declared_options, split, user_errors


@click.command("export")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("caffemodel", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@declared_options(api.EXPORT_OPTIONS)
@user_errors
def export_command(prototxt: str, caffemodel: str, out: str, to: str | None, opset: int, batch: int | None,
                   outputs: tuple[str, ...], check: int, images: tuple[str, ...], tolerance: float | None, seed: int,
                   phase: str, reference: str | None) -> None:
    """Export PROTOTXT + CAFFEMODEL to OUT as ONNX, MNN or ncnn (OUT.param + OUT.bin), optionally checked in the
    format's runtime (ONNX Runtime, MNN, ncnn; one thread, fp32) against the reference (real Caffe, or OpenCV dnn
    where pycaffe is not importable)."""

    options = api.ExportOptions(to=to, opset=opset, batch=batch, outputs=split(outputs), check=check,
                            images=api.image_files(images), tolerance=tolerance, seed=seed, phase=phase,
                            reference=reference)
    result = api.export_files(prototxt, caffemodel, out, options)
    click.echo(render.export_text(result))
    if result.check is not None and not result.check.passed:
        sys.exit(1)
