"""The commands that rewrite: ``rewrite``, ``batch`` (a model zoo), and the two that look at a net, ``inspect`` and
``draw``. Library: ``deeprebirth.pipeline``, ``deeprebirth.batch``, ``deeprebirth.ir.draw``."""

from __future__ import annotations

import sys
from typing import Any

import click

from deeprebirth import api
from deeprebirth.cli import render
from deeprebirth.cli.options import click_option, declared_options, rewrite_options, risk_progress, user_errors


@click.command()
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("out_prototxt", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="the input caffemodel")
@click.option("--out-weights", type=click.Path(dir_okay=False), help="where to write the rewritten caffemodel")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write a JSON report here")
@rewrite_options
@declared_options(api.TRANSFORM_OPTIONS)
@user_errors
def rewrite(prototxt: str, out_prototxt: str, weights: str | None, out_weights: str | None,
            report_path: str | None, preset: str | None, **settings: Any) -> None:
    """Rewrite PROTOTXT (and --weights) into OUT_PROTOTXT (and --out-weights). A train_val PROTOTXT gives a
    train_val OUT_PROTOTXT: both phases' layers are kept. With --max-drop and --data, each lossy merge's accuracy
    risk is measured first (short distillation runs sharing --budget; --data is preprocessed as finetune does it)
    and only the merges fine-tuning can recover are made."""
    transform = {name: settings.pop(name) for name in api.TRANSFORM_NAMES}
    if settings.get("data") is not None:
        settings["transform"] = api.pop_transform(transform, mirror=True)
    options = api.preset_options(preset, **settings)
    result = api.rewrite_files(prototxt, out_prototxt, weights, out_weights, report_path, options,
                               progress=risk_progress)
    click.echo(render.render_report(result.report))
    if result.accuracy is not None:
        click.echo(render.accuracy_text(result.accuracy))
    for warning in result.report.warnings:
        click.echo(f"warning: {warning}", err=True)
    written = [out_prototxt] + [p for p in (out_weights, report_path) if p]
    click.echo(f"wrote {', '.join(written)}")
    if result.check is not None:
        c = result.check
        click.echo(render.check_text(c))
        if not c.passed:
            sys.exit(1)
    relearn = result.report.relearn
    if relearn:
        chosen = result.accuracy
        click.echo(render.next_step(relearn, prototxt, weights, out_prototxt, out_weights, report_path,
                                    *((options.data, chosen.budget) if chosen is not None else ())))


@click.command()
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="the caffemodel (lets exact folds be judged)")
@click_option(api.OPTION["phase"], use_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB:N,C,H,W",
              help="shape of a data layer's top (repeatable)")
@user_errors
def inspect(prototxt: str, weights: str | None, phase: str, input_shapes: tuple[str, ...]) -> None:
    """Per-layer table (type, output shape, params, MACs, memory) and where each rule would or would not fire."""
    found = api.inspect_file(prototxt, weights, phase, api.parse_input_shapes(input_shapes))
    for warning in found.graph.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(render.inspect_text(found))


@click.command("draw")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--highlight-from", type=click.Path(dir_okay=False),
              help="the original net: highlight layers it does not have")
@click_option(api.OPTION["phase"], use_default=True)
@user_errors
def draw_command(prototxt: str, out: str, highlight_from: str | None, phase: str) -> None:
    """Draw PROTOTXT with graphviz into OUT (.svg, .png, .pdf or .dot); merged layers are highlighted."""

    result = api.draw_file(prototxt, out, highlight_from, phase)
    click.echo(render.draw_text(result))


@click.command("batch")
@click.argument("zoo_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@declared_options(api.BATCH_OPTIONS)
@rewrite_options
@user_errors
def batch_command(zoo_dir: str, out_dir: str, jobs: int | None, timeout: float, force: bool, strict: bool,
                  preset: str | None, **settings: Any) -> None:
    """Rewrite every model under ZOO_DIR into OUT_DIR (same relative paths), with summary.{csv,md,json}.

    Every rewrite option applies to each model (--check and --images to the models with weights).
    Deploy prototxts are paired with the caffemodel of the same stem or the folder's only one; solvers, and
    train_val files beside a deploy net, are listed and skipped. A model that fails (or crashes Caffe, or runs
    past --timeout) is recorded and the batch goes on; a second run skips the models already done."""

    def progress(row: api.ModelResult, done: int, total: int) -> None:
        if row.status != "skipped":
            click.echo(render.batch_row(row, done, total), err=True)

    options = api.preset_options(preset, api.BatchOptions, jobs=jobs, timeout=timeout, force=force, **settings)
    assert isinstance(options, api.BatchOptions)
    summary = api.run_batch(zoo_dir, out_dir, options, on_result=progress)
    click.echo(render.batch_text(summary))
    if strict and summary.failed:
        click.echo(f"{len(summary.failed)} model(s) failed (--strict)", err=True)
        sys.exit(1)
