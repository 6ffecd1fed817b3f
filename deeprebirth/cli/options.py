"""The command line's option groups and its error handling: the click options built from the library's
declarations (``deeprebirth.rules.Option``), the groups several commands share, and the decorator that turns a
library error into one line naming the command's own flags."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, TypeVar

import click

from deeprebirth import api

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(command: F) -> F:
    """Turn library errors into one line on stderr and an exit code, never a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except api.DeepRebirthError as err:
            click.echo(f"error: {err}{_flags(err.options)}", err=True)
            sys.exit(2)
        except api.GraphError as err:
            click.echo(f"internal error (please report): {err}", err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was left half-written", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _flags(options: Sequence[str]) -> str:
    """`` (--weights, --out-weights)``: the running command's flags (or arguments) for the API parameters a library
    error names; a parameter this command does not have is left out."""
    context = click.get_current_context(silent=True)
    if context is None or not options:
        return ""
    spelled = {p.name: p.opts[0] if isinstance(p, click.Option) else p.human_readable_name
               for p in context.command.params}
    flags = [spelled[name] for name in options if name in spelled]
    return f" ({', '.join(flags)})" if flags else ""


def split(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def click_option(option: Any, use_default: bool = False) -> Callable[[F], F]:
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


def rewrite_options(command: F) -> F:
    """The options of every command that rewrites (rewrite, batch): each rewrite option, and --preset."""
    presets = "; ".join(f"{name} = " + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in settings.items())
                        for name, settings in api.PRESETS.items())
    options = [click.option("--preset", type=click.Choice(sorted(api.PRESETS)),
                            help=f"a named pipeline: {presets} (options given explicitly override it)  "
                                 f"[default: {api.DEFAULT_PRESET}]")]
    options += [click_option(option) for option in api.REWRITE_OPTIONS]
    for option in reversed(options):
        command = option(command)
    return command


def timing_options(command: F) -> F:
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


def transform_options(command: F) -> F:
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


def transform(transform_from: str | None, scale: float | None, mean: str | None, mean_file: str | None,
               crop: int | None, mirror: bool | None, resize: str | None, rgb: bool) -> Any:
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
