"""The command line: parse options, call ``deeprebirth.api``, render tables. Exit codes: 0 ok, 1 check failed,
2 bad input, 3 internal error."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from typing import Any, TypeVar

import click

from deeprebirth import api, caffe_io
from deeprebirth.errors import DeepRebirthError
from deeprebirth.graph import GraphError
from deeprebirth.rewrite import NetSummary, RewriteReport

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(command: F) -> F:
    """Turn library errors into one line on stderr and an exit code, never a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DeepRebirthError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except GraphError as err:
            click.echo(f"internal error (please report): {err}", err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was left half-written", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _split(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _input_shapes(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    return dict(caffe_io.parse_input_shape(value) for value in values)


def _image_files(paths: Sequence[str]) -> list[str]:
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path)
                            if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")))
        else:
            files.append(path)
    return files


def human(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(before: NetSummary, after: NetSummary) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    rows: list[list[object]] = [
        ["layers", before.layers, after.layers, ratio(before.layers, after.layers)],
        ["params", human(before.params), human(after.params), ratio(before.params, after.params)],
        ["MACs", human(before.macs), human(after.macs), ratio(before.macs, after.macs)],
        ["activations", human(before.activation_bytes, "B"), human(after.activation_bytes, "B"),
         ratio(before.activation_bytes, after.activation_bytes)],
    ]
    for layer_type in sorted(set(before.layers_by_type) | set(after.layers_by_type)):
        b, a = before.layers_by_type.get(layer_type, 0), after.layers_by_type.get(layer_type, 0)
        if a != b:
            rows.append([f"  {layer_type}", b, a, f"{a - b:+d}"])
    return table(["", "before", "after", "before/after"], rows)


def render_report(report: RewriteReport) -> str:
    assert report.after is not None
    lines = [summary_table(report.before, report.after), ""]
    lines.append(f"{len(report.changes)} changes:")
    lines += [f"  [{c.rule}] {c.summary}" for c in report.changes]
    for rule, skips in report.skipped.items():
        lines.append(f"{rule} did not fire at {len(skips)} place(s):")
        lines += [f"  {s.layer}: {s.reason}" for s in skips]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="deeprebirth")
def main() -> None:
    """Slim trained Caffe networks for mobile CPUs (DeepRebirth)."""


@main.command()
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("out_prototxt", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="the input caffemodel")
@click.option("--out-weights", type=click.Path(dir_okay=False), help="where to write the rewritten caffemodel")
@click.option("--rules", "rules", default=None,
              help="rule names or groups (exact, streamline, branch, tucker, all), comma-separated  [default: all; "
                   "all leaves out the opt-in group tucker]")
@click.option("--preset", type=click.Choice(sorted(api.PRESETS)),
              help="a named pipeline: deeprebirth = --rules all; deeprebirth+tucker = --rules all,tucker "
                   "--rank-method vbmf (options given explicitly override it)")
@click.option("--skip", multiple=True, help="rule names or groups not to apply")
@click.option("--only", multiple=True, help="apply rules only where they involve these layers")
@click.option("--exclude", multiple=True, help="never apply rules that involve these layers")
@click.option("--phase", type=click.Choice(["TEST", "TRAIN"]), default="TEST", show_default=True,
              help="the phase of a train_val prototxt the rules see (the other phase's layers are kept as they are)")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB:N,C,H,W",
              help="shape of a data layer's top (repeatable); default: from transform_param.crop_size and the "
                   "first record of its LMDB")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write a JSON report here")
@click.option("--check", type=click.IntRange(min=0), default=0,
              help="compare both nets in real Caffe on N random inputs")
@click.option("--images", multiple=True, type=click.Path(),
              help="real photos (files or a folder of them; repeatable) to compare on too")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="largest allowed max|a-b|/max|a| on each compared blob")
@click.option("--init", type=click.Choice(["inherit", "filler"]), default="inherit", show_default=True,
              help="start merged layers from the original weights where shapes allow, or from fillers")
@click.option("--widen", type=click.Choice(["3x3", "5x5", "balanced"]), default="balanced", show_default=True,
              help="which inception branch receives the channels of the removed branches")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for random inputs and new weights")
@click.option("--rank-method", default=None,
              help="Tucker ranks per conv (rule decompose_conv_tucker): vbmf, energy:F, speedup:X, ranks:R1,R2 or "
                   "full  [default: vbmf]")
@click.option("--runtime", type=click.Choice(["onnxruntime", "mnn", "ncnn"]),
              help="time every candidate merge on this runtime first and apply only the lossy ones that save at "
                   "least --min-gain there (exact folds always apply)")
@click.option("--min-gain", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="with --runtime: the percent of the net's time on it a lossy merge must save")
@_user_errors
def rewrite(prototxt: str, out_prototxt: str, weights: str | None, out_weights: str | None, rules: str,
            skip: tuple[str, ...], only: tuple[str, ...], exclude: tuple[str, ...], phase: str,
            report_path: str | None, check: int, images: tuple[str, ...], tolerance: float, init: str, widen: str,
            seed: int, preset: str | None, rank_method: str | None, runtime: str | None, min_gain: float,
            input_shapes: tuple[str, ...]) -> None:
    """Rewrite PROTOTXT (and --weights) into OUT_PROTOTXT (and --out-weights). A train_val PROTOTXT gives a
    train_val OUT_PROTOTXT: both phases' layers are kept."""
    options = api.preset_options(preset or "deeprebirth", rules=rules, skip=_split(skip), only=_split(only),
                                 exclude=_split(exclude), phase=phase, check=check, images=_image_files(images),
                                 input_shapes=_input_shapes(input_shapes),
                                 tolerance=tolerance, init=init, widen=widen, seed=seed, rank_method=rank_method,
                                 runtime=runtime, min_gain=min_gain)
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
@click.option("--phase", type=click.Choice(["TEST", "TRAIN"]), default="TEST", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="BLOB:N,C,H,W",
              help="shape of a data layer's top (repeatable)")
@_user_errors
def inspect(prototxt: str, weights: str | None, phase: str, input_shapes: tuple[str, ...]) -> None:
    """Per-layer table (type, output shape, params, MACs, memory) and where each rule would or would not fire."""
    found = api.inspect_file(prototxt, weights, phase, _input_shapes(input_shapes))
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


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _profile_header(p: Any, label: str = "") -> list[str]:
    shapes = ", ".join(f"{name} {'x'.join(map(str, s))}" for name, s in p.input_shapes.items())
    blas = "?" if p.blas_threads is None else p.blas_threads
    weights = p.weights or "random weights"
    return [(f"{label}{p.prototxt} ({weights}): input {shapes}, {p.threads} thread(s) (OpenBLAS uses {blas}), "
             f"median of {p.rounds} rounds after {p.warmup} warm-up, {p.clock} clock"),
            (f"  forward {p.forward_ms:.2f} ms (whole pass); per-layer sum {p.total_ms:.2f} ms: tensor "
             f"{p.class_ms('tensor'):.2f} ms, non-tensor {p.class_ms('non-tensor'):.2f} ms "
             f"({100 * p.non_tensor_share:.1f}% non-tensor)"),
            (f"  memory: Caffe blobs {_mib(p.blob_bytes)} + params {_mib(p.param_bytes)} = {_mib(p.memory_bytes)}; "
             f"process peak RSS {_mib(p.peak_rss_bytes)} ({_mib(p.base_rss_bytes)} before the net)")]


def _type_table(p: Any) -> str:
    from deeprebirth.profile import type_class

    return table(["type", "class", "layers", "ms", "share"],
                 [[t.type, type_class(t.type), t.layers, f"{t.ms:.2f}", f"{100 * t.share:.1f}%"] for t in p.by_type()])


def _compare_table(a: Any, b: Any) -> str:
    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}x" if y else "-"

    rows: list[list[object]] = []
    per_a = {t.type: t for t in a.by_type()}
    per_b = {t.type: t for t in b.by_type()}
    for layer_type in list(per_a) + [t for t in per_b if t not in per_a]:
        ta, tb = per_a.get(layer_type), per_b.get(layer_type)
        ms_a, ms_b = (ta.ms if ta else 0.0), (tb.ms if tb else 0.0)
        rows.append([layer_type, ta.layers if ta else 0, tb.layers if tb else 0, f"{ms_a:.2f}", f"{ms_b:.2f}",
                     ratio(ms_a, ms_b)])
    rows += [
        ["per-layer sum (ms)", len(a.layers), len(b.layers), f"{a.total_ms:.2f}", f"{b.total_ms:.2f}",
         ratio(a.total_ms, b.total_ms)],
        ["forward (ms)", "", "", f"{a.forward_ms:.2f}", f"{b.forward_ms:.2f}", ratio(a.forward_ms, b.forward_ms)],
        ["non-tensor share", "", "", f"{100 * a.non_tensor_share:.1f}%", f"{100 * b.non_tensor_share:.1f}%", ""],
        ["Caffe blobs + params", "", "", _mib(a.memory_bytes), _mib(b.memory_bytes),
         ratio(a.memory_bytes, b.memory_bytes)],
        ["peak RSS", "", "", _mib(a.peak_rss_bytes), _mib(b.peak_rss_bytes), ratio(a.peak_rss_bytes, b.peak_rss_bytes)],
    ]
    return table(["type", "layers before", "layers after", "before", "after", "before/after"], rows)


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
              show_default=True, help="where to time: real Caffe per layer, or whole forward passes in OpenCV dnn "
                                      "or in the exported model (ONNX Runtime, MNN, ncnn)")
@click.option("--gpu", type=int, default=None, metavar="ID",
              help="run on this GPU (needs Caffe built with DEEPREBIRTH_CUDA=1)  [default: CPU]")
@_user_errors
def profile_command(prototxt: str, weights: str | None, batch: int | None, threads: int, rounds: int, warmup: int,
                    compare_prototxt: str | None, compare_weights: str | None, plot_path: str | None,
                    json_path: str | None, top: int, clock: str, seed: int, runtime: str, gpu: int | None) -> None:
    """Time every layer of PROTOTXT in real Caffe: per layer, per type, the non-tensor share, and memory; or, with
    --runtime, whole forward passes in another runtime (interleaved with --compare's net)."""
    import json

    from deeprebirth.profile import plot_by_type, profile_net

    if compare_weights and not compare_prototxt:
        raise DeepRebirthError("--compare-weights needs --compare")
    nets = [(prototxt, weights)] + ([(compare_prototxt, compare_weights)] if compare_prototxt else [])
    if runtime != "caffe":
        _runtime_latency(nets, runtime, batch=batch, threads=threads, rounds=rounds, warmup=warmup, seed=seed,
                         clock=clock, plot_path=plot_path, json_path=json_path)
        return
    profiles = [profile_net(path, model, batch=batch, threads=threads, rounds=rounds, warmup=warmup, seed=seed,
                            clock=clock, gpu=gpu) for path, model in nets]
    first = profiles[0]
    if len(profiles) == 1:
        click.echo("\n".join(_profile_header(first)))
        click.echo(_type_table(first))
        slowest = sorted(first.layers, key=lambda layer: -layer.ms)[:top or None]
        click.echo(f"\n{'slowest layers' if top else 'layers'}:")
        click.echo(table(["layer", "type", "ms", "share"],
                         [[t.name, t.type, f"{t.ms:.3f}", f"{100 * t.ms / first.total_ms:.1f}%"
                           if first.total_ms else "-"] for t in slowest]))
    else:
        click.echo("\n".join(_profile_header(first, "before: ") + _profile_header(profiles[1], "after:  ")))
        click.echo(_compare_table(first, profiles[1]))
    labels = ["before", "after"] if len(profiles) == 2 else [first.prototxt.rsplit("/", 1)[-1]]
    if plot_path:
        plot_by_type(profiles, labels, plot_path)
        click.echo(f"wrote {plot_path}")
    if json_path:
        caffe_io.atomic_write_bytes(json_path, json.dumps([p.to_json() for p in profiles], indent=2).encode())
        click.echo(f"wrote {json_path}")


def _runtime_latency(nets: Sequence[tuple[str, str | None]], runtime: str, *, plot_path: str | None,
                     json_path: str | None, **timing: Any) -> None:
    import json
    import statistics

    from deeprebirth.export.latency import latency

    if plot_path:
        raise DeepRebirthError("--plot needs --runtime caffe (the per-layer profile)")
    times = latency(nets, runtime, **timing)
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
        payload = {"runtime": runtime, **timing, "nets": [{"prototxt": p, "weights": w, "times_ms": t, "median_ms": m}
                                                          for (p, w), t, m in zip(nets, times, medians)]}
        caffe_io.atomic_write_bytes(json_path, json.dumps(payload, indent=2).encode())
        click.echo(f"wrote {json_path}")


def _runtime_plan(prototxt: str, weights: str | None, runtime: str, *, json_path: str | None, **timing: Any) -> None:
    import dataclasses
    import json

    from deeprebirth.export.runtime_plan import plan_on_runtime

    plan = plan_on_runtime(prototxt, weights, runtime, **timing)
    click.echo(f"{prototxt}{'' if weights else ' (random weights)'}: {plan.original_ms:.2f} ms per forward in "
               f"{runtime} (batch {plan.batch}, {plan.threads} thread(s), median of {plan.rounds} interleaved rounds "
               f"of every variant); each merge applied alone and timed there")
    rows = []
    for i, c in enumerate(plan.candidates, 1):
        share = 100 * plan.share(c)
        verdict = "pays" if c.risk == "exact" or share >= 1.0 else "does not pay"
        rows.append([i, c.rule, c.risk, c.stage, c.layers[0], f"{c.saved_ms:.2f}", f"{share:.1f}%", verdict])
    click.echo(table(["#", "rule", "risk", "stage", "at", f"saved on {runtime} (ms)", "of net", ""], rows))
    losers = [c for c in plan.candidates if c.risk == "lossy" and plan.share(c) < 0.01]
    if losers:
        click.echo(f"{len(losers)} lossy merge(s) save under 1% on {runtime}: re-learning them spends accuracy for "
                   f"nothing there (rewrite --runtime {runtime} --min-gain 1 leaves them out)")
    if json_path:
        payload = {**dataclasses.asdict(plan), "candidates": [dict(dataclasses.asdict(c), saved_ms=c.saved_ms,
                                                                   share=plan.share(c)) for c in plan.candidates]}
        caffe_io.atomic_write_bytes(json_path, json.dumps(payload, indent=2).encode())
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

    from deeprebirth.data import Transform, transform_from_prototxt

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


@main.command("plan")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@_timing_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the plan as JSON")
@click.option("--rules", "rules", default="all", show_default=True,
              help="rule names or groups to plan with, comma-separated (as for rewrite)")
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
    import dataclasses
    import json

    from deeprebirth.plan import plan_file

    if data is not None and weights is None:
        raise DeepRebirthError("measuring the accuracy risk needs the trained weights (--weights)", file=prototxt)
    if runtime != "caffe":
        if data is not None:
            raise DeepRebirthError("--data (accuracy risk) goes with the Caffe plan; leave out --runtime")
        _runtime_plan(prototxt, weights, runtime, rules=rules, batch=batch or 1, threads=threads, rounds=rounds,
                      seed=seed, clock=clock, json_path=json_path)
        return
    plan = plan_file(prototxt, weights, rules=rules, batch=batch, threads=threads, rounds=rounds, seed=seed,
                     clock=clock)
    risks: dict[int, Any] = {}
    if data is not None:
        from deeprebirth.finetune import FinetuneOptions
        from deeprebirth.risk import assess

        if mirror is None and transform_from is None:
            mirror = True
        options = FinetuneOptions(budget=risk_budget, seed=seed,
                                  transform=_transform(transform_from, scale, mean, mean_file, crop, mirror, resize,
                                                       rgb))
        assert weights is not None

        def progress(n: int, total: int, candidate: Any) -> None:
            click.echo(f"risk {n}/{total}: {candidate.summary} (a {risk_budget} mimic)", err=True)

        risks = {r.candidate: r for r in assess(prototxt, weights, plan.candidates, data, options,
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
            row += ["-", "-"] if r is None else [f"{_pct(r.agreement_before)} -> {_pct(r.agreement_after)}",
                                                 f"{_num(r.output_error_before)} -> {_num(r.output_error_after)}"]
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
        payload = {"prototxt": plan.prototxt, "random_weights": plan.random_weights, "profile": p.to_json(),
                   "conv_ms_per_mac": plan.conv_ms_per_mac,
                   "candidates": [dict(dataclasses.asdict(c), memory_saved_bytes=c.memory_saved_bytes,
                                       accuracy_risk=dataclasses.asdict(risks[k]) if k in risks else None)
                                  for k, c in enumerate(plan.candidates)],
                   "skips": [{"rule": rule, "layer": s.layer, "reason": s.reason} for rule, s in plan.skips]}
        caffe_io.atomic_write_bytes(json_path, json.dumps(payload, indent=2).encode())
        click.echo(f"wrote {json_path}")


@main.command("draw")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--highlight-from", type=click.Path(dir_okay=False),
              help="the original net: highlight layers it does not have")
@click.option("--phase", type=click.Choice(["TEST", "TRAIN"]), default="TEST", show_default=True)
@_user_errors
def draw_command(prototxt: str, out: str, highlight_from: str | None, phase: str) -> None:
    """Draw PROTOTXT with graphviz into OUT (.svg, .png, .pdf or .dot); merged layers are highlighted."""
    from deeprebirth.draw import draw_file

    result = draw_file(prototxt, out, highlight_from, phase)
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
            parts = [f"{k} {_pct(m[k]) if k in ('accuracy', 'agreement') else _num(m[k])}"
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


RULE_LABELS = {"merge_pooling_into_conv": "pool", "merge_lrn_into_conv": "lrn", "merge_inception_branches": "branches",
               "decompose_conv_tucker": "tucker", "final": "-"}


def finetune_table(steps: Sequence[Any]) -> str:
    def layers(names: Sequence[str]) -> str:
        return ", ".join(names) if len(names) <= 2 else f"{', '.join(names[:2])} +{len(names) - 2}"

    def change(a: float | None, b: float | None, fmt: Callable[[float | None], str]) -> str:
        return f"{fmt(a)} -> {fmt(b)}"

    rows = [[f"{s.index}. {s.name if s.rules == ['final'] else layers(s.relearn)}",
             "+".join(RULE_LABELS.get(r, r) for r in s.rules), s.target, f"{s.lr:.3g} {s.solver}",
             f"{s.best_iteration}/{s.iterations}", change(s.accuracy_before, s.accuracy_after, _pct),
             change(s.agreement_before, s.agreement_after, _pct),
             change(s.error_before, s.error_after, _num), change(s.output_error_before, s.output_error_after, _num),
             f"{s.seconds:.1f}"] for s in steps]
    return table(["phase: new layers", "merged", "loss on", "lr", "kept/iters", "held-out top-1", "agrees",
                  "error at blob", "error at output", "seconds"], rows)


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
                     report_path: str, data: str, out: str | None, export_dir: str | None, train_val: str | None,
                     gpu: int | None, mode: str, budget: str, schedule: str, mimic_at: str,
                     kd_weight: float, temperature: float, batch: int, lr: float | None,
                     solver: str, momentum: float, weight_decay: float, new_lr_mult: float, freeze_rest: bool,
                     resume: bool, max_steps: int | None, val: str | None, holdout: float, val_limit: int,
                     work_dir: str | None, json_path: str | None, cache_mb: float, seed: int,
                     transform_from: str | None, scale: float | None, mean: str | None, mean_file: str | None,
                     crop: int | None, mirror: bool | None, resize: str | None, rgb: bool) -> None:
    """Re-learn SLIM from ORIGINAL on --data within --budget (distillation; see --schedule)."""
    from deeprebirth.finetune import FinetuneOptions, finetune_files
    from deeprebirth.train import SolverOptions

    if mirror is None and transform_from is None:
        mirror = True  # Caffe's ImageNet recipes flip training images; --no-mirror for data where that is wrong
    options = FinetuneOptions(
        mode=mode, schedule=schedule, mimic_at=mimic_at, budget=budget, kd_weight=kd_weight,
        temperature=temperature,
        batch=batch, solver=SolverOptions(solver, lr, momentum, weight_decay), new_lr_mult=new_lr_mult,
        freeze_rest=freeze_rest, resume=resume,
        transform=_transform(transform_from, scale, mean, mean_file, crop, mirror, resize, rgb), val=val,
        holdout=holdout, val_limit=val_limit, seed=seed, max_steps=max_steps, cache_mb=cache_mb, work_dir=work_dir,
        report=json_path, gpu=gpu)
    if export_dir is not None:
        from deeprebirth.finetune.export import export_plan

        exported = export_plan(original_prototxt, original_weights, slim_prototxt, slim_weights, report_path, data,
                               export_dir, options, train_val=train_val)
        click.echo("\n".join(exported.describe()))
        return
    if out is None or train_val is not None:
        raise DeepRebirthError("--train-val needs --export" if train_val is not None else "--out is required "
                               "(or --export DIR to write the plan as Caffe files)")
    result = finetune_files(original_prototxt, original_weights, slim_prototxt, slim_weights, report_path, data, out,
                            options, progress=_FinetuneProgress())
    click.echo("", err=True)
    click.echo(finetune_table(result.steps))
    if result.held_out:
        click.echo(f"held-out top-1 ({result.held_out} images): original {_pct(result.original_accuracy)}, slim "
                   f"before fine-tuning {_pct(result.slim_accuracy)}, after {_pct(result.final_accuracy)}")
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
    import dataclasses
    import json

    from deeprebirth.evaluate import evaluate_files

    transform = _transform(transform_from, scale, mean, mean_file, crop, mirror, resize, rgb)
    result = evaluate_files(prototxt, weights, data, reference=tuple(reference) if reference else None,  # type: ignore
                            transform=transform, batch=batch, limit=limit, gpu=gpu)
    rows = [["net", _pct(result.top1), _pct(result.top5), "-"]]
    if reference:
        rows.append(["reference", _pct(result.reference_top1), _pct(result.reference_top5), ""])
        rows[0][3] = _pct(result.agreement)
    click.echo(table(["", "top-1", "top-5", "top-1 agrees with reference"], rows))
    click.echo(f"{result.images} images, {result.classes} classes, {result.seconds:.1f} s")
    if json_path:
        caffe_io.atomic_write_bytes(json_path, json.dumps(dataclasses.asdict(result), indent=2).encode())
        click.echo(f"wrote {json_path}")


# ---------------------------------------------------------------------------------------------------------------
# batch: library in deeprebirth.batch


@main.command("batch")
@click.argument("zoo_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--jobs", type=click.IntRange(min=1), help="worker processes, one model each  [default: one per CPU]")
@click.option("--rules", default="all", show_default=True,
              help="rule names or groups (exact, streamline, branch, all), comma-separated")
@click.option("--check", type=click.IntRange(min=0), default=0,
              help="compare each rewrite with its original in real Caffe on N random inputs (models with weights)")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="largest allowed max|a-b|/max|a| for exact rewrites")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="seconds per model before its worker is stopped")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for random inputs and new weights")
@click.option("--force", is_flag=True, help="redo models a previous run finished (same inputs and options)")
@click.option("--strict", is_flag=True, help="exit with 1 when any model failed")
@_user_errors
def batch_command(zoo_dir: str, out_dir: str, jobs: int | None, rules: str, check: int, tolerance: float,
                  timeout: float, seed: int, force: bool, strict: bool) -> None:
    """Rewrite every model under ZOO_DIR into OUT_DIR (same relative paths), with summary.{csv,md,json}.

    Deploy prototxts are paired with the caffemodel of the same stem or the folder's only one; solvers, and
    train_val files beside a deploy net, are listed and skipped. A model that fails (or crashes Caffe, or runs
    past --timeout) is recorded and the batch goes on; a second run skips the models already done."""
    from deeprebirth.batch import BatchOptions, ModelResult, run_batch

    def progress(row: ModelResult, done: int, total: int) -> None:
        if row.status == "skipped":
            return
        detail = row.error or (f"{row.layers_before} -> {row.layers_after} layers" +
                               (f", check {row.check}" if row.check else ""))
        cached = " (done earlier)" if row.cached else ""
        click.echo(f"[{done}/{total}] {row.status}{cached} {row.prototxt} ({row.seconds:.1f} s): {detail}", err=True)

    options = BatchOptions(rules=rules, check=check, tolerance=tolerance, seed=seed, jobs=jobs, timeout=timeout,
                           force=force)
    summary = run_batch(zoo_dir, out_dir, options, on_result=progress)
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
@click.option("--phase", type=click.Choice(["TEST", "TRAIN"]), default="TEST", show_default=True)
@_user_errors
def export_command(prototxt: str, caffemodel: str, out: str, to: str | None, opset: int, batch: int | None,
                   outputs: tuple[str, ...], check: int, images: tuple[str, ...], tolerance: float | None, seed: int,
                   phase: str) -> None:
    """Export PROTOTXT + CAFFEMODEL to OUT as ONNX, MNN or ncnn (OUT.param + OUT.bin), optionally checked against
    real Caffe in the format's runtime (ONNX Runtime, MNN, ncnn; one thread, fp32)."""
    from deeprebirth.export.api import ExportOptions, export_files

    options = ExportOptions(to=to, opset=opset, batch=batch, outputs=_split(outputs), check=check,
                            images=_image_files(images), tolerance=tolerance, seed=seed, phase=phase)
    result = export_files(prototxt, caffemodel, out, options)

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
