"""The command line: parse options, call ``deeprebirth.api``, echo what ``cli_render`` makes of the results.
Exit codes: 0 ok, 1 check failed, 2 bad input, 3 internal error.

Shared option groups and the error handling live in ``cli_options``, finetune's progress bar in ``cli_progress``,
all text in ``cli_render``. What is left here is each command's own options and its few lines of glue. Kept as
one module: a little over 400 lines, most of them finetune's thirty options, which read best next to the command
they configure."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from deeprebirth import api
from deeprebirth.cli import render

# underscored: helpers of the commands, not commands
from deeprebirth.cli.options import click_option as _click_option
from deeprebirth.cli.options import rewrite_options as _rewrite_options
from deeprebirth.cli.options import split as _split
from deeprebirth.cli.options import timing_options as _timing_options
from deeprebirth.cli.options import transform as _transform
from deeprebirth.cli.options import transform_options as _transform_options
from deeprebirth.cli.options import user_errors as _user_errors
from deeprebirth.cli.progress import FinetuneProgress as _FinetuneProgress
from deeprebirth.cli.render import finetune_table, pct


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="deeprebirth")
def main() -> None:
    """Slim trained Caffe networks for mobile CPUs (DeepRebirth)."""


@main.command()
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("out_prototxt", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="the input caffemodel")
@click.option("--out-weights", type=click.Path(dir_okay=False), help="where to write the rewritten caffemodel")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write a JSON report here")
@_rewrite_options
@_transform_options
@_user_errors
def rewrite(prototxt: str, out_prototxt: str, weights: str | None, out_weights: str | None,
            report_path: str | None, preset: str | None, transform_from: str | None, scale: float | None,
            mean: str | None, mean_file: str | None, crop: int | None, mirror: bool | None, resize: str | None,
            rgb: bool, **settings: Any) -> None:
    """Rewrite PROTOTXT (and --weights) into OUT_PROTOTXT (and --out-weights). A train_val PROTOTXT gives a
    train_val OUT_PROTOTXT: both phases' layers are kept. With --max-drop and --data, each lossy merge's accuracy
    risk is measured first (short distillation runs sharing --budget; --data is preprocessed as finetune does it)
    and only the merges fine-tuning can recover are made."""
    if settings.get("data") is not None:
        settings["transform"] = _transform(transform_from, scale, mean, mean_file, crop,
                                           True if mirror is None and transform_from is None else mirror, resize, rgb)
    options = api.preset_options(preset, **settings)
    result = api.rewrite_files(prototxt, out_prototxt, weights, out_weights, report_path, options,
                               progress=_risk_progress)
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


@main.command()
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="the caffemodel (lets exact folds be judged)")
@_click_option(api.OPTION["phase"], use_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB:N,C,H,W",
              help="shape of a data layer's top (repeatable)")
@_user_errors
def inspect(prototxt: str, weights: str | None, phase: str, input_shapes: tuple[str, ...]) -> None:
    """Per-layer table (type, output shape, params, MACs, memory) and where each rule would or would not fire."""
    found = api.inspect_file(prototxt, weights, phase, api.parse_input_shapes(input_shapes))
    for warning in found.graph.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(render.inspect_text(found))


# ---------------------------------------------------------------------------------------------------------------
# profile, plan, draw: library in deeprebirth.measure.profile / deeprebirth.plan.candidates / deeprebirth.ir.draw


@main.command("profile")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@_timing_options
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="untimed rounds first")
@click.option("--compare", "compare_prototxt", type=click.Path(dir_okay=False),
              help="a second net (e.g. the rewritten one) to profile side by side")
@click.option("--compare-weights", type=click.Path(dir_okay=False), help="the second net's caffemodel")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write the per-type bar chart (PNG)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the measurements as JSON")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="list the N slowest layers (0: all)")
@click.option("--runtime", type=click.Choice(list(api.RUNTIMES)),
              help="where to time: real Caffe, OpenCV dnn, or the exported model (ONNX Runtime, MNN, ncnn); per "
                   "layer except in ncnn (whole forward passes)  [default: caffe where pycaffe imports, else opencv]")
@click.option("--gpu", type=int, default=None, metavar="ID",
              help="run on this GPU (needs Caffe built with DEEPREBIRTH_CUDA=1)  [default: CPU]")
@_user_errors
def profile_command(prototxt: str, weights: str | None, batch: int | None, threads: int, rounds: int, warmup: int,
                    compare_prototxt: str | None, compare_weights: str | None, plot_path: str | None,
                    json_path: str | None, top: int, clock: str, seed: int, runtime: str | None,
                    gpu: int | None) -> None:
    """Time every layer of PROTOTXT in real Caffe (OpenCV dnn where pycaffe is not importable): per layer, per
    type, the non-tensor share, and memory; or, with --runtime, in another runtime: per layer in OpenCV dnn, ONNX
    Runtime and MNN (their own per-op times), whole forward passes in ncnn and with --compare (interleaved with
    --compare's net)."""

    if compare_weights and not compare_prototxt:
        raise api.DeepRebirthError("--compare-weights needs --compare")
    if runtime in (None, "caffe"):
        runtime = api.pick_reference("caffe" if gpu is not None else runtime)  # no --runtime: the reference
    nets = [(prototxt, weights)] + ([(compare_prototxt, compare_weights)] if compare_prototxt else [])
    timing: dict[str, Any] = {"batch": batch, "threads": threads, "rounds": rounds, "warmup": warmup, "seed": seed,
                              "clock": clock}
    if runtime in api.LAYER_TIMED and not compare_prototxt:
        _runtime_layers(prototxt, weights, runtime, top=top, plot_path=plot_path, json_path=json_path, **timing)
        return
    if runtime != "caffe":
        _runtime_latency(nets, runtime, plot_path=plot_path, json_path=json_path, **timing)
        if not compare_prototxt:
            click.echo(f"no per-layer times in {runtime}: {api.NOT_LAYER_TIMED[runtime]}")
        return
    profiles = [api.profile_net(path, model, batch=batch, threads=threads, rounds=rounds, warmup=warmup, seed=seed,
                            clock=clock, gpu=gpu) for path, model in nets]
    click.echo(render.profile_text(profiles, top))
    labels = ["before", "after"] if len(profiles) == 2 else [profiles[0].prototxt.rsplit("/", 1)[-1]]
    if plot_path:
        api.plot_by_type(profiles, labels, plot_path)
        click.echo(f"wrote {plot_path}")
    if json_path:
        api.save_profiles(json_path, profiles)
        click.echo(f"wrote {json_path}")


def _runtime_layers(prototxt: str, weights: str | None, runtime: str, *, top: int, plot_path: str | None,
                    json_path: str | None, **timing: Any) -> None:
    if plot_path:
        raise api.DeepRebirthError("--plot needs --runtime caffe (the per-layer profile)")
    p = api.profile_on_runtime(prototxt, weights, runtime, **timing)
    click.echo("\n".join(p.describe()))
    click.echo(render.type_table(p))
    click.echo(render.slowest_table(p, top))
    if json_path:
        api.save_runtime_profile(json_path, p)
        click.echo(f"wrote {json_path}")


def _runtime_latency(nets: Sequence[tuple[str, str | None]], runtime: str, *, plot_path: str | None,
                     json_path: str | None, **timing: Any) -> None:
    if plot_path:
        raise api.DeepRebirthError("--plot needs --runtime caffe (the per-layer profile)")
    times = api.latency(nets, runtime, **timing)
    click.echo(render.latency_text(nets, runtime, timing, times))
    if json_path:
        api.save_latency(json_path, runtime, timing, nets, times)
        click.echo(f"wrote {json_path}")


def _runtime_plan(prototxt: str, weights: str | None, runtime: str, *, json_path: str | None, **timing: Any) -> None:
    plan = api.plan_on_runtime(prototxt, weights, runtime, **timing)
    click.echo(render.runtime_plan_text(prototxt, weights, runtime, plan))
    if json_path:
        api.save_runtime_plan(json_path, plan)
        click.echo(f"wrote {json_path}")


@main.command("plan")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@_timing_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the plan as JSON")
@_click_option(api.OPTION["rules"], use_default=True)
@click.option("--data", type=click.Path(), help="images (no labels needed) to measure each lossy merge's accuracy "
              "risk with: a short mimic of the net with only that merge (needs --weights)")
@click.option("--risk-budget", default="30s", show_default=True,
              help="the short mimic's --budget, per merge (without --budget and --max-drop)")
@click.option("--budget", help="the fine-tuning budget you plan: the risk runs share it (each lossy merge an equal "
              f"part)  [default with --max-drop: finetune's, {api.FINETUNE_BUDGET}]")
@click.option("--max-drop", type=click.FloatRange(min=0), help="with --data: mark the lossy merges fine-tuning "
              "cannot bring back to within this many points of top-1 (of agreement without labels), as `rewrite "
              "--max-drop` leaves them out")
@click.option("--runtime", type=click.Choice(["caffe", *api.EXPORTED]),
              help="price merges in the reference's per-layer profile (caffe: real Caffe's), or measure each merge "
                   "alone on an exported runtime (batch 1 unless --batch)  [default: the reference's profile]")
@_click_option(api.OPTION["reference"])
@_transform_options
@_user_errors
def plan_command(prototxt: str, weights: str | None, batch: int | None, threads: int, rounds: int,
                 json_path: str | None, rules: str, clock: str, seed: int, data: str | None, risk_budget: str,
                 budget: str | None, max_drop: float | None, runtime: str | None, reference: str | None,
                 transform_from: str | None, scale: float | None, mean: str | None, mean_file: str | None,
                 crop: int | None, mirror: bool | None, resize: str | None, rgb: bool) -> None:
    """List every merge the rules could make in PROTOTXT, with measured time, MACs and memory saved, and risk."""

    if data is not None and weights is None:
        raise api.DeepRebirthError("measuring the accuracy risk needs the trained weights (--weights)", file=prototxt)
    if (max_drop is not None or budget is not None) and data is None:
        raise api.DeepRebirthError("--max-drop and --budget need --data (images to measure the risks on)")
    if data is not None:
        api.require_pycaffe("plan --data (the accuracy risk: a short fine-tuning)")
    if runtime not in (None, "caffe"):
        if data is not None:
            raise api.DeepRebirthError("--data (accuracy risk) goes with the Caffe plan; leave out --runtime")
        _runtime_plan(prototxt, weights, runtime, rules=rules, batch=batch or 1, threads=threads, rounds=rounds,
                      seed=seed, clock=clock, json_path=json_path)
        return
    plan = api.plan_file(prototxt, weights, rules=rules, batch=batch, threads=threads, rounds=rounds, seed=seed,
                         clock=clock, reference=runtime or reference)
    risks: dict[int, Any] = {}
    chosen = None
    if data is not None:
        assert weights is not None
        if mirror is None and transform_from is None:
            mirror = True
        transform = _transform(transform_from, scale, mean, mean_file, crop, mirror, resize, rgb)
        if budget is not None or max_drop is not None:  # the runs share the planned fine-tuning budget
            chosen = api.measure_risks(plan, prototxt, weights, data, max_drop, budget=budget or api.FINETUNE_BUDGET,
                                       transform=transform, seed=seed, progress=_risk_progress)
            risks, risk_budget = chosen.risks, chosen.share
        else:
            options = api.risk_options(risk_budget, seed=seed, transform=transform)
            risks = {r.candidate: r for r in api.assess(prototxt, weights, plan.candidates, data, options,
                                                        progress=_risk_progress)}
    click.echo(render.plan_text(prototxt, plan, risks, risk_budget))
    if chosen is not None and chosen.max_drop is not None:
        click.echo(render.accuracy_text(chosen))
    if json_path:
        api.save_plan(json_path, plan, risks, chosen)
        click.echo(f"wrote {json_path}")


def _risk_progress(n: int, total: int, candidate: Any) -> None:
    click.echo(f"risk {n}/{total}: {candidate.summary} (a short mimic)", err=True)


@main.command("draw")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--highlight-from", type=click.Path(dir_okay=False),
              help="the original net: highlight layers it does not have")
@_click_option(api.OPTION["phase"], use_default=True)
@_user_errors
def draw_command(prototxt: str, out: str, highlight_from: str | None, phase: str) -> None:
    """Draw PROTOTXT with graphviz into OUT (.svg, .png, .pdf or .dot); merged layers are highlighted."""

    result = api.draw_file(prototxt, out, highlight_from, phase)
    click.echo(render.draw_text(result))


# ---------------------------------------------------------------------------------------------------------------
# finetune, evaluate: library in deeprebirth.finetune / deeprebirth.caffe.evaluate / deeprebirth.caffe.data


@main.command("finetune")
@click.argument("original_prototxt", type=click.Path(dir_okay=False))
@click.argument("original_weights", type=click.Path(dir_okay=False))
@click.argument("slim_prototxt", type=click.Path(dir_okay=False))
@click.argument("slim_weights", type=click.Path(dir_okay=False))
@click.option("--report", "report_path", required=True, type=click.Path(dir_okay=False),
              help="the JSON report `deeprebirth rewrite --report` wrote")
@click.option("--data", required=True, type=click.Path(),
              help="training data: an image folder (a subfolder per class), a list file, an .npz or a Caffe LMDB")
@click.option("--out", type=click.Path(dir_okay=False), help="where to write the fine-tuned caffemodel")
@click.option("--export", "export_dir", type=click.Path(file_okay=False),
              help="instead of training, write the plan as Caffe files into this new folder: per phase a "
                   "train_val.prototxt, solver.prototxt and starting caffemodel, and run.sh (`caffe train`, "
                   "e.g. ./run.sh -gpu all)")
@click.option("--train-val", type=click.Path(dir_okay=False),
              help="with --export: read the training images with this train_val's TRAIN data layer (default: an "
                   "LMDB written from --data)")
@click.option("--gpu", type=int, default=None, metavar="ID",
              help="run on this GPU (needs Caffe built with DEEPREBIRTH_CUDA=1)  [default: CPU]")
@click.option("--mode", type=click.Choice(["label", "mimic"]), default="label", show_default=True,
              help="label: the labels and the original's soft outputs; mimic: the original's outputs only (no labels)")
@click.option("--budget", default="10m", show_default=True,
              help="for the whole run: time (90s, 10m, 1.5h), solver iterations (3000it) or epochs (5ep)")
@click.option("--schedule", type=click.Choice(["whole", "layerwise"]), default="whole", show_default=True,
              help="whole: distil the whole slim net at once; layerwise: the paper's steps, one merge at a time, "
                   "then the whole net")
@click.option("--mimic-at", type=click.Choice(["local", "next", "logits"]), default="logits", show_default=True,
              help="layer-wise steps in mimic mode: the merged blob, the next merge's blob, or the net's output")
@click.option("--kd-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="label mode: share of the distillation loss (the labels get the rest)")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="softmax temperature of the distillation loss")
@click.option("--loss", type=click.Choice(["auto", "kd", "regression"]), default="auto", show_default=True,
              help="what matches the original's logits: distillation at --temperature, regression on the logits, "
                   "or auto: KD, and where the slim net starts far off (agreement < 50%) the better of KD at "
                   "--temperature, KD at T=1 and regression, probed on held-out data")
@click.option("--batch", type=click.IntRange(min=1), help="images per update  [default: 32, or 16 or 8 where the "
              "budget would buy fewer than 400 updates (see README)]")
@click.option("--lr", type=float, help="base learning rate (default: searched per phase on held-out data)")
@click.option("--solver", type=click.Choice(["sgd", "nesterov", "adam", "rmsprop", "adagrad", "adadelta"]),
              default="sgd", show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--new-lr-mult", type=float, default=10.0, show_default=True,
              help="layer-wise steps: learning-rate multiplier of the step's new layers")
@click.option("--freeze-rest", is_flag=True, help="only the new layers learn (the rest stays bit-identical)")
@click.option("--resume", is_flag=True, help="continue an interrupted run without redoing finished phases")
@click.option("--max-steps", type=click.IntRange(min=1), help="stop after this many phases (continue with --resume)")
@click.option("--val", type=click.Path(), help="held-out data (default: --holdout of --data)")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="fraction of --data held out when --val is not given (raised for small data towards 200 images, "
                   "at most a quarter)")
@click.option("--val-limit", type=click.IntRange(min=1), default=2000, show_default=True,
              help="held-out images per evaluation")
@click.option("--work-dir", type=click.Path(file_okay=False), help="solver files, snapshots and state (default: "
              "OUT without suffix + .finetune)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="the report (default: OUT without suffix + .finetune.json)")
@click.option("--cache-mb", type=float, default=1024, show_default=True,
              help="memory for decoded images (half) and the original's outputs on them and on held-out images")
@click.option("--seed", type=int, default=0, show_default=True)
@_transform_options
@_user_errors
def finetune_command(original_prototxt: str, original_weights: str, slim_prototxt: str, slim_weights: str,
                     report_path: str, data: str, out: str | None, export_dir: str | None, train_val: str | None,
                     gpu: int | None, mode: str, budget: str, schedule: str, mimic_at: str,
                     kd_weight: float, temperature: float, loss: str, batch: int | None, lr: float | None,
                     solver: str, momentum: float, weight_decay: float, new_lr_mult: float, freeze_rest: bool,
                     resume: bool, max_steps: int | None, val: str | None, holdout: float, val_limit: int,
                     work_dir: str | None, json_path: str | None, cache_mb: float, seed: int,
                     transform_from: str | None, scale: float | None, mean: str | None, mean_file: str | None,
                     crop: int | None, mirror: bool | None, resize: str | None, rgb: bool) -> None:
    """Re-learn SLIM from ORIGINAL on --data within --budget (distillation; see --schedule)."""

    if export_dir is None:
        api.require_pycaffe("finetune")
    if mirror is None and transform_from is None:
        mirror = True  # Caffe's ImageNet recipes flip training images; --no-mirror for data where that is wrong
    options = api.FinetuneOptions(
        mode=mode, schedule=schedule, mimic_at=mimic_at, budget=budget, kd_weight=kd_weight,
        temperature=temperature, loss=loss,
        batch=batch, solver=api.SolverOptions(solver, lr, momentum, weight_decay), new_lr_mult=new_lr_mult,
        freeze_rest=freeze_rest, resume=resume,
        transform=_transform(transform_from, scale, mean, mean_file, crop, mirror, resize, rgb), val=val,
        holdout=holdout, val_limit=val_limit, seed=seed, max_steps=max_steps, cache_mb=cache_mb, work_dir=work_dir,
        report=json_path, gpu=gpu)
    if export_dir is not None:
        exported = api.export_plan(original_prototxt, original_weights, slim_prototxt, slim_weights, report_path, data,
                               export_dir, options, train_val=train_val)
        click.echo("\n".join(exported.describe()))
        return
    if out is None or train_val is not None:
        raise api.DeepRebirthError("--train-val needs --export" if train_val is not None else "--out is required "
                               "(or --export DIR to write the plan as Caffe files)")
    result = api.finetune_files(original_prototxt, original_weights, slim_prototxt, slim_weights, report_path, data, out,
                            options, progress=_FinetuneProgress())
    click.echo("", err=True)
    click.echo(finetune_table(result.steps))
    click.echo(f"batch {result.batch} ({result.batch_rule})")
    if result.held_out:
        click.echo(f"held-out top-1 ({result.held_out} images): original {pct(result.original_accuracy)}, slim "
                   f"before fine-tuning {pct(result.slim_accuracy)}, after {pct(result.final_accuracy)}")
    if not result.complete:
        click.echo(f"stopped after {len(result.steps)} of {len(result.planned)} phases; state in {result.work_dir}; "
                   "continue with --resume")
        return
    note = f" ({result.resumed} phase(s) from an earlier run)" if result.resumed else ""
    click.echo(f"fine-tuned in {result.seconds:.1f} s (budget {result.budget}){note}; wrote {result.out}, "
               f"{result.report}")


@main.command("evaluate")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help="labelled data: an image folder (a subfolder per class), a list file (path label) or an .npz")
@click.option("--reference", nargs=2, type=click.Path(dir_okay=False), metavar="PROTOTXT CAFFEMODEL",
              help="another net (e.g. the original): report its accuracy and how often the top-1 agrees")
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="evaluate only the first N images")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the result as JSON")
@click.option("--gpu", type=int, default=None, metavar="ID",
              help="run on this GPU (needs Caffe built with DEEPREBIRTH_CUDA=1)  [default: CPU]")
@_transform_options
@_user_errors
def evaluate_command(prototxt: str, weights: str, data: str, reference: tuple[str, str] | None, batch: int,
                     limit: int | None, json_path: str | None, transform_from: str | None, scale: float | None,
                     mean: str | None, mean_file: str | None, crop: int | None, mirror: bool | None,
                     resize: str | None, rgb: bool, gpu: int | None) -> None:
    """Top-1 / top-5 accuracy of PROTOTXT + WEIGHTS on --data in real Caffe."""

    api.require_pycaffe("evaluate")
    transform = _transform(transform_from, scale, mean, mean_file, crop, mirror, resize, rgb)
    result = api.evaluate_files(prototxt, weights, data, reference=tuple(reference) if reference else None,  # type: ignore
                            transform=transform, batch=batch, limit=limit, gpu=gpu)
    click.echo(render.evaluate_text(result, bool(reference)))
    if json_path:
        api.save_evaluation(json_path, result)
        click.echo(f"wrote {json_path}")


# ---------------------------------------------------------------------------------------------------------------
# batch: library in deeprebirth.batch


@main.command("batch")
@click.argument("zoo_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--jobs", type=click.IntRange(min=1), help="worker processes, one model each  [default: one per CPU]")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="seconds per model before its worker is stopped")
@click.option("--force", is_flag=True, help="redo models a previous run finished (same inputs and options)")
@click.option("--strict", is_flag=True, help="exit with 1 when any model failed")
@_rewrite_options
@_user_errors
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


# ---------------------------------------------------------------------------------------------------------------
# export: library in deeprebirth.export


@main.command("export")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("caffemodel", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(list(api.FORMATS)),
              help="output format  [default: from OUT's suffix: .onnx, .mnn, .param]")
@click.option("--opset", type=click.IntRange(min=1), default=13, show_default=True, help="ONNX opset")
@click.option("--batch", type=click.IntRange(min=1), help="batch size of the inputs  [default: the net's]")
@click.option("--outputs", multiple=True, help="blob names to export up to (comma-separated)  [default: the net's "
                                               "outputs]")
@click.option("--check", type=click.IntRange(min=0), default=0,
              help="run Caffe and the exported model on N random inputs and compare")
@click.option("--images", multiple=True, type=click.Path(), help="real photos (files or folders) to compare on too")
@click.option("--tolerance", type=float, help="largest allowed max|a-b|/max|a| per output  [default: onnxruntime "
                                              "1e-4, ncnn 1e-4, mnn 1e-3]")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for the random inputs")
@_click_option(api.OPTION["phase"], use_default=True)
@_click_option(api.OPTION["reference"])
@_user_errors
def export_command(prototxt: str, caffemodel: str, out: str, to: str | None, opset: int, batch: int | None,
                   outputs: tuple[str, ...], check: int, images: tuple[str, ...], tolerance: float | None, seed: int,
                   phase: str, reference: str | None) -> None:
    """Export PROTOTXT + CAFFEMODEL to OUT as ONNX, MNN or ncnn (OUT.param + OUT.bin), optionally checked in the
    format's runtime (ONNX Runtime, MNN, ncnn; one thread, fp32) against the reference (real Caffe, or OpenCV dnn
    where pycaffe is not importable)."""

    options = api.ExportOptions(to=to, opset=opset, batch=batch, outputs=_split(outputs), check=check,
                            images=api.image_files(images), tolerance=tolerance, seed=seed, phase=phase,
                            reference=reference)
    result = api.export_files(prototxt, caffemodel, out, options)
    click.echo(render.export_text(result))
    if result.check is not None and not result.check.passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
