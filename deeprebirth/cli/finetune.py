"""The commands that train and score: ``finetune`` (re-learning a slim net from its original) and ``evaluate``
(accuracy). Library: ``deeprebirth.finetune``, ``deeprebirth.caffe.evaluate``."""

from __future__ import annotations

from typing import Any

import click

from deeprebirth import api
from deeprebirth.cli import render
from deeprebirth.cli.options import declared_options, user_errors
from deeprebirth.cli.progress import FinetuneProgress
from deeprebirth.cli.render import finetune_table, pct


@click.command("finetune")
@click.argument("original_prototxt", type=click.Path(dir_okay=False))
@click.argument("original_weights", type=click.Path(dir_okay=False))
@click.argument("slim_prototxt", type=click.Path(dir_okay=False))
@click.argument("slim_weights", type=click.Path(dir_okay=False))
@declared_options(api.FINETUNE_OPTIONS)
@user_errors
def finetune_command(original_prototxt: str, original_weights: str, slim_prototxt: str, slim_weights: str,
                     report_path: str, data: str, out: str | None, export_dir: str | None, train_val: str | None,
                     **settings: Any) -> None:
    """Re-learn SLIM from ORIGINAL on --data within --budget (distillation; see --schedule)."""

    if export_dir is None:
        api.require_pycaffe("finetune")
    elif settings.get("budget") is None:
        click.echo(f"budget {api.budget_for(None, export=True)} (--export's default: a time budget cannot be "
                   "exported; --budget Nit or Nep to choose)")
    options = api.finetune_options(settings, export=export_dir is not None)
    if export_dir is not None:
        exported = api.export_plan(original_prototxt, original_weights, slim_prototxt, slim_weights, report_path, data,
                               export_dir, options, train_val=train_val)
        click.echo("\n".join(exported.describe()))
        return
    if out is None or train_val is not None:
        raise api.DeepRebirthError("--train-val needs --export" if train_val is not None else "--out is required "
                               "(or --export DIR to write the plan as Caffe files)")
    result = api.finetune_files(original_prototxt, original_weights, slim_prototxt, slim_weights, report_path, data, out,
                            options, progress=FinetuneProgress())
    click.echo("", err=True)
    if result.note:
        click.echo(result.note)
    else:
        click.echo(finetune_table(result.steps, result.labels_ignored))
        click.echo(f"batch {result.batch} ({result.batch_rule})")
        if result.views_rule:
            click.echo(f"training views: {result.views_rule}")
    if result.labels_ignored:
        click.echo(f"held-out labels ignored ({result.held_out} images): the original's top-1 against them, "
                   f"{pct(result.original_accuracy)}, is no better than a guess; agreement with the original: before "
                   f"fine-tuning {pct(result.steps[0].agreement_before)}, after {pct(result.steps[-1].agreement_after)}")
    elif result.held_out:
        click.echo(f"held-out top-1 ({result.held_out} images): original {pct(result.original_accuracy)}, slim "
                   f"before fine-tuning {pct(result.slim_accuracy)}, after {pct(result.final_accuracy)}"
                   + (f" (change {100 * (result.final_accuracy - result.original_accuracy):+.2f} points, standard "
                      f"error {100 * result.change_error:.2f}, paired)" if result.change_error is not None else ""))
    if not result.complete:
        click.echo(f"stopped after {len(result.steps)} of {len(result.planned)} phases; state in {result.work_dir}; "
                   "continue with --resume")
        return
    note = f" ({result.resumed} phase(s) from an earlier run)" if result.resumed else ""
    click.echo(f"fine-tuned in {result.seconds:.1f} s (budget {result.budget}){note}; wrote {result.out}, "
               f"{result.report}")


@click.command("evaluate")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@declared_options(api.EVALUATE_OPTIONS)
@user_errors
def evaluate_command(prototxt: str, weights: str, data: str, reference: tuple[str, str] | None, batch: int | None,
                     limit: int | None, json_path: str | None, gpu: int | None, **settings: Any) -> None:
    """Top-1 / top-5 accuracy of PROTOTXT + WEIGHTS on --data in real Caffe."""

    api.require_pycaffe("evaluate")
    transform = api.pop_transform(settings)
    result = api.evaluate_files(prototxt, weights, data, reference=tuple(reference) if reference else None,  # type: ignore
                            transform=transform, batch=batch, limit=limit, gpu=gpu)
    click.echo(render.evaluate_text(result, bool(reference)))
    if json_path:
        api.save_evaluation(json_path, result)
        click.echo(f"wrote {json_path}")
