"""The command line's options and its error handling: the click options built from the library's declarations
(``deeprebirth.option.Option``; every command's options are declared there once), and the decorator that turns a
library error into one line naming the command's own flags."""

from __future__ import annotations

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
    """A click option built from a library declaration (``deeprebirth.option.Option``). Without ``use_default`` the
    flag defaults to None, so that a preset's settings apply where the user gave none; help shows the default."""
    kind: Any = option.type
    if option.path:
        kind = click.Path(dir_okay=option.path != "file", file_okay=option.path != "dir")
    elif option.choices:
        kind = click.Choice(option.choices)
    elif option.minimum is not None or option.maximum is not None:
        kind = (click.IntRange if option.type is int else click.FloatRange)(
            min=option.minimum, max=option.maximum, min_open=option.open_bounds in ("min", "both"),
            max_open=option.open_bounds in ("max", "both"))
    help_text = option.help
    if option.default not in (None, (), False) and not (use_default and option.show_default):
        help_text += f"  [default: {option.default}]"
    flag = f"--{option.flag or option.name.replace('_', '-')}"
    if option.switch:
        if option.negatable:  # click makes a flag with a --no- form a boolean flag itself
            return click.option(f"{flag}/--no-{flag[2:]}", option.name, help=help_text,
                                default=option.default if use_default else None)
        return click.option(flag, option.name, is_flag=True, help=help_text,
                            default=option.default if use_default else None)
    return click.option(flag, option.name, type=kind, multiple=option.multiple, metavar=option.metavar,
                        help=help_text, default=option.default if use_default else None, nargs=option.nargs,
                        required=option.required,
                        show_default=use_default and option.show_default and option.default not in (None, ()))


def declared_options(options: Sequence[Any]) -> Callable[[F], F]:
    """Every declared option of a command, in order, with its declared default."""

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = click_option(option, use_default=True)(command)
        return command

    return decorate


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


def risk_progress(n: int, total: int, candidate: Any) -> None:
    """One line per accuracy-risk run (``rewrite --max-drop``, ``plan --data``): each is a short fine-tuning."""
    click.echo(f"risk {n}/{total}: {candidate.summary} (a short mimic)", err=True)
