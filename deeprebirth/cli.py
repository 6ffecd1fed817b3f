"""The command line: parse options, call ``deeprebirth.api``, render tables. Exit codes: 0 ok, 1 check failed,
2 bad input, 3 internal error."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from typing import Any, TypeVar

import click

from deeprebirth import api
from deeprebirth.cli_render import (
    compare_table,
    finetune_table,
    human,
    num,
    pct,
    profile_header,
    render_report,
    slowest_table,
    table,
    type_table,
)

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(command: F) -> F:
    """Turn library errors into one line on stderr and an exit code, never a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except api.DeepRebirthError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except api.GraphError as err:
            click.echo(f"internal error (please report): {err}", err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was left half-written", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _split(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _click_option(option: Any, use_default: bool = False) -> Callable[[F], F]:
    """A click option built from a library declaration (``deeprebirth.rules.Option``). Without ``use_default`` the
    flag defaults to None, so that a preset's settings apply where the user gave none; help shows the default."""
    kind: Any = option.type
    if option.choices:
        kind = click.Choice(option.choices)
    elif option.minimum is not None:
        kind = (click.IntRange if option.type is int else click.FloatRange)(min=option.minimum)
    help_text = option.help
    if option.default not in (None, ()) and not (use_default and option.show_default):
        help_text += f"  [default: {option.default}]"
    return click.option(f"--{option.flag or option.name.replace('_', '-')}", option.name, type=kind,
                        multiple=option.multiple, metavar=option.metavar, help=help_text,
                        default=option.default if use_default else None,
                        show_default=use_default and option.show_default)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="deeprebirth")
def main() -> None:
    """Slim trained Caffe networks for mobile CPUs (DeepRebirth)."""


def _rewrite_options(command: F) -> F:
    """The options of every command that rewrites (rewrite, batch): each rewrite option, and --preset."""
    presets = "; ".join(f"{name} = " + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in settings.items())
                        for name, settings in api.PRESETS.items())
    options = [click.option("--preset", type=click.Choice(sorted(api.PRESETS)),
                            help=f"a named pipeline: {presets} (options given explicitly override it)  "
                                 f"[default: {api.DEFAULT_PRESET}]")]
    options += [_click_option(option) for option in api.REWRITE_OPTIONS]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("out_prototxt", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="the input caffemodel")
@click.option("--out-weights", type=click.Path(dir_okay=False), help="where to write the rewritten caffemodel")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write a JSON report here")
@_rewrite_options
@_user_errors
def rewrite(prototxt: str, out_prototxt: str, weights: str | None, out_weights: str | None,
            report_path: str | None, preset: str | None, **settings: Any) -> None:
    """Rewrite PROTOTXT (and --weights) into OUT_PROTOTXT (and --out-weights). A train_val PROTOTXT gives a
    train_val OUT_PROTOTXT: both phases' layers are kept."""
    options = api.preset_options(preset, **settings)
    result = api.rewrite_files(prototxt, out_prototxt, weights, out_weights, report_path, options)
    click.echo(render_report(result.report))
    for warning in result.report.warnings:
        click.echo(f"warning: {warning}", err=True)
    written = [out_prototxt] + [p for p in (out_weights, report_path) if p]
    click.echo(f"wrote {', '.join(written)}")
    if result.check is not None:
        c = result.check
        click.echo(table(["blob", "max |a-b|", "max |a-b| / max |a|"],
                         [[d.blob, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}"] for d in c.diffs]))
        if c.lossy:
            click.echo(f"check on {c.inputs} inputs in real Caffe: the rewrite is lossy, so outputs differ until the "
                       f"new layers are fine-tuned (worst relative difference now {c.worst.max_rel:.3g}); every "
                       "compared output keeps its shape")
        else:
            verdict = "PASSED" if c.passed else "FAILED"
            click.echo(f"check {verdict} on {c.inputs} inputs in real Caffe: worst relative error "
                       f"{c.worst.max_rel:.3g} (tolerance {c.tolerance:g}), "
                       f"predictions changed: {c.predictions_changed}")
        if not c.passed:
            sys.exit(1)
    relearn = result.report.relearn
    if relearn:
        click.echo(f"\n{len(relearn)} layer(s) now need fine-tuning: {', '.join(relearn)}")
        click.echo("next: deeprebirth finetune " + " ".join([prototxt, weights or "ORIGINAL.caffemodel", out_prototxt,
                   out_weights or "SLIM.caffemodel", "--report", report_path or "REPORT.json",
                   "--data", "DATA", "--out", "FINAL.caffemodel", "--budget", "10m"]))


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
    rows = []
    for cost in found.costs:
        shapes = "?" if cost.top_shapes is None else " ".join("x".join(map(str, s)) for s in cost.top_shapes)
        rows.append([cost.name, cost.type, shapes, human(cost.params), human(cost.macs),
                     human(cost.activation_bytes, "B")])
    click.echo(table(["layer", "type", "output", "params", "MACs", "memory"], rows))
    click.echo(f"total: {len(found.costs)} layers, {human(sum(c.params for c in found.costs))} params, "
               f"{human(sum(c.macs for c in found.costs))} MACs, "
               f"{human(sum(c.activation_bytes for c in found.costs), 'B')} activations")
    click.echo("")
    click.echo(f"rules that would fire ({len(found.fires)}):")
    for rule, layers in found.fires:
        click.echo(f"  {rule}: {' + '.join(layers)}")
    if found.skips:
        click.echo(f"places where a rule would not fire ({len(found.skips)}):")
        for rule, skip in found.skips:
            click.echo(f"  {rule}: {skip.layer}: {skip.reason}")


# ---------------------------------------------------------------------------------------------------------------
# profile, plan, draw: library in deeprebirth.profile / deeprebirth.plan / deeprebirth.draw


def _timing_options(command: F) -> F:
    """The options of every command that times a net in real Caffe (profile, plan)."""
    for option in reversed((
        click.option("--weights", type=click.Path(dir_okay=False), help="the caffemodel (default: random weights)"),
        click.option("--batch", type=click.IntRange(min=1), help="reshape the inputs to this batch size"),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="OpenBLAS threads"),
        click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True, help="timed rounds"),
        click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
                     help="wall time, or process CPU time (steadier on a busy machine; with 1 thread only)"),
        click.option("--seed", type=int, default=0, show_default=True, help="seed for random inputs and weights"),
    )):
        command = option(command)
    return command


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
@click.option("--runtime", type=click.Choice(["caffe", "opencv", "onnxruntime", "mnn", "ncnn"]), default="caffe",
              show_default=True, help="where to time: real Caffe, OpenCV dnn, or the exported model (ONNX Runtime, "
                                      "MNN, ncnn); per layer except in ncnn (whole forward passes)")
@click.option("--gpu", type=int, default=None, metavar="ID",
              help="run on this GPU (needs Caffe built with DEEPREBIRTH_CUDA=1)  [default: CPU]")
@_user_errors
def profile_command(prototxt: str, weights: str | None, batch: int | None, threads: int, rounds: int, warmup: int,
                    compare_prototxt: str | None, compare_weights: str | None, plot_path: str | None,
                    json_path: str | None, top: int, clock: str, seed: int, runtime: str, gpu: int | None) -> None:
    """Time every layer of PROTOTXT in real Caffe: per layer, per type, the non-tensor share, and memory; or, with
    --runtime, in another runtime: per layer in OpenCV dnn, ONNX Runtime and MNN (their own per-op times), whole
    forward passes in ncnn and with --compare (interleaved with --compare's net)."""

    if compare_weights and not compare_prototxt:
        raise api.DeepRebirthError("--compare-weights needs --compare")
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
    first = profiles[0]
    if len(profiles) == 1:
        click.echo("\n".join(profile_header(first)))
        click.echo(type_table(first))
        click.echo(slowest_table(first, top))
    else:
        click.echo("\n".join(profile_header(first, "before: ") + profile_header(profiles[1], "after:  ")))
        click.echo(compare_table(first, profiles[1]))
    labels = ["before", "after"] if len(profiles) == 2 else [first.prototxt.rsplit("/", 1)[-1]]
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
    click.echo(type_table(p))
    click.echo(slowest_table(p, top))
    if json_path:
        api.save_runtime_profile(json_path, p)
        click.echo(f"wrote {json_path}")


def _runtime_latency(nets: Sequence[tuple[str, str | None]], runtime: str, *, plot_path: str | None,
                     json_path: str | None, **timing: Any) -> None:
    import statistics

    if plot_path:
        raise api.DeepRebirthError("--plot needs --runtime caffe (the per-layer profile)")
    times = api.latency(nets, runtime, **timing)
    medians = [statistics.median(t) for t in times]
    click.echo(f"{runtime}: whole forward passes, {timing['threads']} thread(s), median of {timing['rounds']} "
               f"interleaved rounds after {timing['warmup']} warm-up, {timing['clock']} clock"
               f"{'' if nets[0][1] else ', random weights'}")
    labels = ["before", "after"] if len(nets) == 2 else ["net"]
    click.echo(table(["", "net", "median ms", "min ms"],
                     [[label, path, f"{m:.2f}", f"{min(t):.2f}"] for label, (path, _), m, t in
                      zip(labels, nets, medians, times)]))
    if len(nets) == 2 and medians[1] > 0:
        click.echo(f"speed-up before/after in {runtime}: {medians[0] / medians[1]:.2f}x")
    if json_path:
        api.save_latency(json_path, runtime, timing, nets, times)
        click.echo(f"wrote {json_path}")


def _runtime_plan(prototxt: str, weights: str | None, runtime: str, *, json_path: str | None, **timing: Any) -> None:

    plan = api.plan_on_runtime(prototxt, weights, runtime, **timing)
    click.echo(f"{prototxt}{'' if weights else ' (random weights)'}: {plan.original_ms:.2f} ms per forward in "
               f"{runtime} (batch {plan.batch}, {plan.threads} thread(s), median of {plan.rounds} interleaved rounds "
               f"of every variant); each merge applied alone and timed there; noise floor {100 * plan.noise:.1f}% "
               f"(identical copies of the net measured that far apart)")
    rows = []
    for i, c in enumerate(plan.candidates, 1):
        share = 100 * plan.share(c)
        verdict = ("pays" if c.risk == "exact" or share >= 1.0 else
                   "does not pay" if plan.surely_below(c, 1.0) else "within noise")
        rows.append([i, c.rule, c.risk, c.stage, c.layers[0], f"{c.saved_ms:.2f}", f"{share:.1f}%", verdict])
    click.echo(table(["#", "rule", "risk", "stage", "at", f"saved on {runtime} (ms)", "of net", ""], rows))
    losers = [c for c in plan.candidates if c.risk == "lossy" and plan.surely_below(c, 1.0)]
    if losers:
        click.echo(f"{len(losers)} lossy merge(s) save under 1% on {runtime} even allowing for the noise: re-learning "
                   f"them spends accuracy for nothing there (rewrite --runtime {runtime} --min-gain 1 leaves them out)")
    if json_path:
        api.save_runtime_plan(json_path, plan)
        click.echo(f"wrote {json_path}")


def _transform_options(command: F) -> F:
    """The preprocessing options finetune and evaluate share (Caffe's transform_param)."""
    for option in reversed([
        click.option("--transform-from", type=click.Path(dir_okay=False),
                     help="read scale, mean, crop and mirror from this train_val prototxt's data layer"),
        click.option("--scale", type=float, help="multiply (pixel - mean) by this (e.g. 0.00390625)"),
        click.option("--mean", help="mean value(s), one per channel or one for all, comma-separated (BGR)"),
        click.option("--mean-file", type=click.Path(dir_okay=False), help="a binaryproto mean image"),
        click.option("--crop", type=click.IntRange(min=0), help="crop size (random when training, centred else)"),
        click.option("--mirror/--no-mirror", default=None, help="random horizontal flips when training"),
        click.option("--resize", help="resize every image to HxW first (e.g. 256x256)"),
        click.option("--rgb", is_flag=True, help="feed image files as RGB (Caffe's convention is BGR)"),
    ]):
        command = option(command)
    return command


def _transform(transform_from: str | None, scale: float | None, mean: str | None, mean_file: str | None,
               crop: int | None, mirror: bool | None, resize: str | None, rgb: bool) -> Any:
    import dataclasses

    base = api.transform_from_prototxt(transform_from, "TRAIN") if transform_from else api.Transform()
    changes: dict[str, Any] = {"rgb": rgb or base.rgb}
    if scale is not None:
        changes["scale"] = scale
    if mean is not None:
        try:
            changes["mean"] = tuple(float(v) for v in mean.split(",") if v.strip())
        except ValueError:
            raise api.DeepRebirthError(f"--mean {mean!r}: expected numbers separated by commas") from None
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
            raise api.DeepRebirthError(f"--resize {resize!r}: expected HEIGHTxWIDTH, e.g. 256x256") from None
        changes["resize"] = (height, width)
    return dataclasses.replace(base, **changes)


@main.command("plan")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@_timing_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the plan as JSON")
@_click_option(api.OPTION["rules"], use_default=True)
@click.option("--data", type=click.Path(), help="images (no labels needed) to measure each lossy merge's accuracy "
              "risk with: a short mimic of the net with only that merge (needs --weights)")
@click.option("--risk-budget", default="30s", show_default=True, help="the short mimic's --budget, per merge")
@click.option("--runtime", type=click.Choice(["caffe", "onnxruntime", "mnn", "ncnn"]), default="caffe",
              show_default=True, help="price merges in Caffe's per-layer profile, or measure each merge alone on an "
                                      "exported runtime (batch 1 unless --batch)")
@_transform_options
@_user_errors
def plan_command(prototxt: str, weights: str | None, batch: int | None, threads: int, rounds: int,
                 json_path: str | None, rules: str, clock: str, seed: int, data: str | None, risk_budget: str,
                 runtime: str,
                 transform_from: str | None, scale: float | None, mean: str | None, mean_file: str | None,
                 crop: int | None, mirror: bool | None, resize: str | None, rgb: bool) -> None:
    """List every merge the rules could make in PROTOTXT, with measured time, MACs and memory saved, and risk."""

    if data is not None and weights is None:
        raise api.DeepRebirthError("measuring the accuracy risk needs the trained weights (--weights)", file=prototxt)
    if runtime != "caffe":
        if data is not None:
            raise api.DeepRebirthError("--data (accuracy risk) goes with the Caffe plan; leave out --runtime")
        _runtime_plan(prototxt, weights, runtime, rules=rules, batch=batch or 1, threads=threads, rounds=rounds,
                      seed=seed, clock=clock, json_path=json_path)
        return
    plan = api.plan_file(prototxt, weights, rules=rules, batch=batch, threads=threads, rounds=rounds, seed=seed,
                     clock=clock)
    risks: dict[int, Any] = {}
    if data is not None:

        if mirror is None and transform_from is None:
            mirror = True
        options = api.FinetuneOptions(budget=risk_budget, seed=seed,
                                  transform=_transform(transform_from, scale, mean, mean_file, crop, mirror, resize,
                                                       rgb))
        assert weights is not None

        def progress(n: int, total: int, candidate: Any) -> None:
            click.echo(f"risk {n}/{total}: {candidate.summary} (a {risk_budget} mimic)", err=True)

        risks = {r.candidate: r for r in api.assess(prototxt, weights, plan.candidates, data, options,
                                                 progress=progress)}
    p = plan.profile
    note = " (no --weights: timed and planned with random weights)" if plan.random_weights else ""
    click.echo(f"{prototxt}{note}: {p.total_ms:.2f} ms per forward in Caffe (batch {p.batch}, {p.threads} "
               f"thread(s), {p.clock} clock), {100 * p.non_tensor_share:.1f}% non-tensor; convolution cost "
               f"{plan.conv_ms_per_mac * 1e9:.3f} ms per GMAC")
    rows = []
    for i, c in enumerate(plan.candidates, 1):
        share = f"{100 * c.time_saved_ms / p.total_ms:.1f}%" if p.total_ms else "-"
        row = [i, c.rule, c.group, c.risk, c.stage, c.layers[0], len(c.removed),
               f"{c.time_saved_ms:.3f}{'*' if c.estimated else ''}", share, human(c.macs_saved),
               human(c.params_saved), human(c.memory_saved_bytes, "B")]
        if risks:
            r = risks.get(i - 1)
            row += ["-", "-"] if r is None else [f"{pct(r.agreement_before)} -> {pct(r.agreement_after)}",
                                                 f"{num(r.output_error_before)} -> {num(r.output_error_after)}"]
        rows.append(row)
    headers = ["#", "rule", "group", "risk", "stage", "at", "removes", "time saved (ms)", "of net", "MACs saved",
               "params saved", "memory saved"]
    if risks:
        headers += ["agrees (short mimic)", "error at output"]
    click.echo(table(headers, rows))
    if risks:
        click.echo(f"agrees: held-out top-1 agreement with the original of the net with only that merge (and those "
                   f"it builds on), as merged -> after a {risk_budget} mimic; exact merges agree fully")
    if not plan.candidates:
        click.echo("no rule matches this net")
    for i, c in enumerate(plan.candidates, 1):
        extra = f"; re-learn {', '.join(c.relearn)}" if c.relearn else ""
        click.echo(f"  {i}. {c.summary}{extra}")
    if any(c.estimated for c in plan.candidates):
        click.echo("  * includes layers made by an earlier stage, timed from their MACs")
    if any(c.stage for c in plan.candidates):
        click.echo("  stage n: matches once the candidates of the earlier stages are applied")
    if plan.skips:
        click.echo(f"places where a rule would not fire ({len(plan.skips)}):")
        for rule, skip in plan.skips:
            click.echo(f"  {rule}: {skip.layer}: {skip.reason}")
    if json_path:
        api.save_plan(json_path, plan, risks)
        click.echo(f"wrote {json_path}")


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
    shown = result.highlighted[:8]
    more = f" and {len(result.highlighted) - len(shown)} more" if len(result.highlighted) > len(shown) else ""
    merged = f": {', '.join(shown)}{more}" if shown else ""
    click.echo(f"wrote {result.path} ({result.layers} layers, {len(result.highlighted)} highlighted{merged})")


# ---------------------------------------------------------------------------------------------------------------
# finetune, evaluate: library in deeprebirth.finetune / deeprebirth.evaluate / deeprebirth.data


class _FinetuneProgress:
    """Renders finetune's progress events on stderr: a bar per phase with the time left, the learning-rate search,
    the held-out checkpoints."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, event: Any) -> None:
        import time

        if event.event == "baseline":
            click.echo(f"measuring the original and the slim net on the held-out data ({event.steps} phase(s) "
                       "planned)", err=True)
        elif event.event == "skipped":
            click.echo(f"phase {event.step}/{event.steps} {event.name}: done in an earlier run", err=True)
        elif event.event == "step":
            click.echo(f"phase {event.step}/{event.steps}: {event.name}", err=True)
        elif event.event == "search":
            click.echo(f"  learning rate {event.lr:.3g} ({event.solver}): held-out loss {event.loss:.4g}", err=True)
        elif event.event == "evaluate" and event.metrics:
            m = event.metrics
            parts = [f"{k} {pct(m[k]) if k in ('accuracy', 'agreement') else num(m[k])}"
                     for k in ("accuracy", "agreement", "loss") if k in m]
            click.echo(f"\r  held-out at iteration {event.iteration}: {', '.join(parts)}" + " " * 20, err=True)
        elif event.event == "iteration":
            now = time.monotonic()
            if now - self.last < 0.5 and event.iteration < event.iterations:
                return
            self.last = now
            width = 30
            filled = width * event.iteration // max(event.iterations, 1)
            left = "" if event.seconds_left is None else f", {max(event.seconds_left, 0) / 60:.1f} min left"
            click.echo(f"\r  [{'#' * filled}{'-' * (width - filled)}] {event.iteration}/{event.iterations} "
                       f"loss {event.loss:.4g}{left}   ", nl=False, err=True)


@main.command("finetune")
@click.argument("original_prototxt", type=click.Path(dir_okay=False))
@click.argument("original_weights", type=click.Path(dir_okay=False))
@click.argument("slim_prototxt", type=click.Path(dir_okay=False))
@click.argument("slim_weights", type=click.Path(dir_okay=False))
@click.option("--report", "report_path", required=True, type=click.Path(dir_okay=False),
              help="the JSON report `deeprebirth rewrite --report` wrote")
@click.option("--data", required=True, type=click.Path(),
              help="training data: an image folder (a subfolder per class), a list file, an .npz or a Caffe LMDB")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="where to write the fine-tuned caffemodel")
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
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
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
              help="fraction of --data held out when --val is not given")
@click.option("--val-limit", type=click.IntRange(min=1), default=2000, show_default=True,
              help="held-out images per evaluation")
@click.option("--work-dir", type=click.Path(file_okay=False), help="solver files, snapshots and state (default: "
              "OUT without suffix + .finetune)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="the report (default: OUT without suffix + .finetune.json)")
@click.option("--cache-mb", type=float, default=1024, show_default=True,
              help="memory for the original's held-out outputs")
@click.option("--seed", type=int, default=0, show_default=True)
@_transform_options
@_user_errors
def finetune_command(original_prototxt: str, original_weights: str, slim_prototxt: str, slim_weights: str,
                     report_path: str, data: str, out: str, mode: str, budget: str, schedule: str, mimic_at: str,
                     kd_weight: float, temperature: float, batch: int, lr: float | None,
                     solver: str, momentum: float, weight_decay: float, new_lr_mult: float, freeze_rest: bool,
                     resume: bool, max_steps: int | None, val: str | None, holdout: float, val_limit: int,
                     work_dir: str | None, json_path: str | None, cache_mb: float, seed: int,
                     transform_from: str | None, scale: float | None, mean: str | None, mean_file: str | None,
                     crop: int | None, mirror: bool | None, resize: str | None, rgb: bool) -> None:
    """Re-learn SLIM from ORIGINAL on --data within --budget (distillation; see --schedule)."""

    if mirror is None and transform_from is None:
        mirror = True  # Caffe's ImageNet recipes flip training images; --no-mirror for data where that is wrong
    options = api.FinetuneOptions(
        mode=mode, schedule=schedule, mimic_at=mimic_at, budget=budget, kd_weight=kd_weight,
        temperature=temperature,
        batch=batch, solver=api.SolverOptions(solver, lr, momentum, weight_decay), new_lr_mult=new_lr_mult,
        freeze_rest=freeze_rest, resume=resume,
        transform=_transform(transform_from, scale, mean, mean_file, crop, mirror, resize, rgb), val=val,
        holdout=holdout, val_limit=val_limit, seed=seed, max_steps=max_steps, cache_mb=cache_mb, work_dir=work_dir,
        report=json_path)
    result = api.finetune_files(original_prototxt, original_weights, slim_prototxt, slim_weights, report_path, data, out,
                            options, progress=_FinetuneProgress())
    click.echo("", err=True)
    click.echo(finetune_table(result.steps))
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

    transform = _transform(transform_from, scale, mean, mean_file, crop, mirror, resize, rgb)
    result = api.evaluate_files(prototxt, weights, data, reference=tuple(reference) if reference else None,  # type: ignore
                            transform=transform, batch=batch, limit=limit, gpu=gpu)
    rows = [["net", pct(result.top1), pct(result.top5), "-"]]
    if reference:
        rows.append(["reference", pct(result.reference_top1), pct(result.reference_top5), ""])
        rows[0][3] = pct(result.agreement)
    click.echo(table(["", "top-1", "top-5", "top-1 agrees with reference"], rows))
    click.echo(f"{result.images} images, {result.classes} classes, {result.seconds:.1f} s")
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
        if row.status == "skipped":
            return
        detail = row.error or (f"{row.layers_before} -> {row.layers_after} layers" +
                               (f", check {row.check}" if row.check else ""))
        cached = " (done earlier)" if row.cached else ""
        click.echo(f"[{done}/{total}] {row.status}{cached} {row.prototxt} ({row.seconds:.1f} s): {detail}", err=True)

    options = api.preset_options(preset, api.BatchOptions, jobs=jobs, timeout=timeout, force=force, **settings)
    assert isinstance(options, api.BatchOptions)
    summary = api.run_batch(zoo_dir, out_dir, options, on_result=progress)
    rows = [[r.prototxt, r.status + (" (earlier)" if r.cached else ""),
             "" if r.layers_before is None else f"{r.layers_before} -> {r.layers_after}",
             "" if r.macs_before is None else f"{human(r.macs_before)} -> {human(r.macs_after or 0)}",
             r.check or "", r.error[:80]] for r in summary.results]
    click.echo(table(["model", "status", "layers", "MACs", "check", "note"], rows))
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
    click.echo(f"{len(summary.results)} found: {counts} ({summary.seconds:.1f} s); wrote {', '.join(summary.files)}")
    if strict and summary.failed:
        click.echo(f"{len(summary.failed)} model(s) failed (--strict)", err=True)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------------------
# export: library in deeprebirth.export


@main.command("export")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("caffemodel", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(["onnx", "mnn", "ncnn"]),
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
@_user_errors
def export_command(prototxt: str, caffemodel: str, out: str, to: str | None, opset: int, batch: int | None,
                   outputs: tuple[str, ...], check: int, images: tuple[str, ...], tolerance: float | None, seed: int,
                   phase: str) -> None:
    """Export PROTOTXT + CAFFEMODEL to OUT as ONNX, MNN or ncnn (OUT.param + OUT.bin), optionally checked against
    real Caffe in the format's runtime (ONNX Runtime, MNN, ncnn; one thread, fp32)."""

    options = api.ExportOptions(to=to, opset=opset, batch=batch, outputs=_split(outputs), check=check,
                            images=api.image_files(images), tolerance=tolerance, seed=seed, phase=phase)
    result = api.export_files(prototxt, caffemodel, out, options)

    def shapes(found: Mapping[str, tuple[int, ...] | None]) -> str:
        return ", ".join(f"{name} {'x'.join(map(str, shape)) if shape else '?'}" for name, shape in found.items())

    nodes = f", {result.nodes} ONNX nodes" if result.nodes is not None else ""
    click.echo(f"wrote {', '.join(result.files)} ({result.format}{nodes}): {shapes(result.inputs)} -> "
               f"{shapes(result.outputs)}")
    c = result.check
    if c is not None:
        click.echo(table(["output", "max |a-b|", "max |a-b| / max |a|"],
                         [[d.blob, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}"] for d in c.diffs]))
        verdict = "PASSED" if c.passed else "FAILED"
        click.echo(f"check {verdict} on {c.inputs} inputs, Caffe vs {c.runtime}: worst relative error "
                   f"{c.worst.max_rel:.3g} (tolerance {c.tolerance:g}), predictions changed: {c.predictions_changed}")
        if not c.passed:
            sys.exit(1)


if __name__ == "__main__":
    main()
