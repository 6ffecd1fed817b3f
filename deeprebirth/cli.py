"""The command line: parse options, call ``deeprebirth.api``, render tables. Exit codes: 0 ok, 1 check failed,
2 bad input, 3 internal error."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, TypeVar

import click

from deeprebirth import api
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
    if report.relearn:
        lines.append(f"layers to re-learn (lossy changes): {', '.join(report.relearn)}")
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
@click.option("--rules", "rules", default="all", show_default=True,
              help="rule names or groups (exact, streamline, branch, all), comma-separated")
@click.option("--skip", multiple=True, help="rule names or groups not to apply")
@click.option("--only", multiple=True, help="apply rules only where they involve these layers")
@click.option("--exclude", multiple=True, help="never apply rules that involve these layers")
@click.option("--phase", type=click.Choice(["TEST", "TRAIN"]), default="TEST", show_default=True,
              help="which phase's layers to keep from a train_val prototxt")
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
@_user_errors
def rewrite(prototxt: str, out_prototxt: str, weights: str | None, out_weights: str | None, rules: str,
            skip: tuple[str, ...], only: tuple[str, ...], exclude: tuple[str, ...], phase: str,
            report_path: str | None, check: int, images: tuple[str, ...], tolerance: float, init: str, widen: str,
            seed: int) -> None:
    """Rewrite PROTOTXT (and --weights) into OUT_PROTOTXT (and --out-weights)."""
    options = api.RewriteOptions(rules=rules, skip=_split(skip), only=_split(only), exclude=_split(exclude),
                                 phase=phase, check=check, images=_image_files(images), tolerance=tolerance, init=init,
                                 widen=widen, seed=seed)
    result = api.rewrite_files(prototxt, out_prototxt, weights, out_weights, report_path, options)
    click.echo(render_report(result.report))
    written = [out_prototxt] + [p for p in (out_weights, report_path) if p]
    click.echo(f"wrote {', '.join(written)}")
    if result.check is not None:
        c = result.check
        click.echo(table(["blob", "max |a-b|", "max |a-b| / max |a|"],
                         [[d.blob, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}"] for d in c.diffs]))
        verdict = "PASSED" if c.passed else "FAILED"
        click.echo(f"check {verdict} on {c.inputs} inputs in real Caffe: worst relative error "
                   f"{c.worst.max_rel:.3g} (tolerance {c.tolerance:g}), predictions changed: {c.predictions_changed}")
        if not c.passed:
            sys.exit(1)


@main.command()
@click.argument("prototxt", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="the caffemodel (lets exact folds be judged)")
@click.option("--phase", type=click.Choice(["TEST", "TRAIN"]), default="TEST", show_default=True)
@_user_errors
def inspect(prototxt: str, weights: str | None, phase: str) -> None:
    """Per-layer table (type, output shape, params, MACs, memory) and where each rule would or would not fire."""
    found = api.inspect_file(prototxt, weights, phase)
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


if __name__ == "__main__":
    main()
