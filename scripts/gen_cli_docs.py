"""Write the option tables of every `deeprebirth` command, read from the CLI's own click declarations, so the docs
cannot drift from the flags.

    .venv/bin/python scripts/gen_cli_docs.py [OUT.md]      # default: stdout

`make docs` does not need it: the MkDocs hook (docs/hooks.py) calls ``render()`` at build time and serves the
result as usage/options.md. The script is for reading the tables without building the site.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

HEADER = """# Options of every command

Generated from the command line's own declarations at build time (`scripts/gen_cli_docs.py`); `deeprebirth
COMMAND --help` prints the same. Exit codes everywhere: 0 ok, 1 a check failed, 2 bad input, 3 internal error.
"""


def cli_group() -> click.Command:
    # through the installed entry point rather than a module path: the command group may move between modules
    (script,) = entry_points(group="console_scripts", name="deeprebirth")
    command = script.load()
    if not isinstance(command, click.Command):
        raise SystemExit(f"{script.value} is not a click command")
    return command


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _commands(group: click.Command, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, group)] if path else []
    if isinstance(group, click.Group):
        for name in group.commands:  # declaration order: rewrite first, as `--help` lists them
            found += _commands(group.commands[name], (*path, name))
    return found


def render_command(path: tuple[str, ...], command: click.Command, parent: click.Context) -> str:
    ctx = click.Context(command, info_name=path[-1], parent=parent)
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## `deeprebirth {' '.join(path)}`", "", "```", f"deeprebirth {' '.join(path)} {usage}", "```", ""]
    if command.help:
        lines += [" ".join(command.help.split()), ""]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if arguments:
        lines += ["| argument | required |", "|---|---|"]
        lines += [f"| `{p.human_readable_name}` | {'yes' if p.required else 'no'} |" for p in arguments]
        lines.append("")
    options = [(p, p.get_help_record(ctx)) for p in command.params if isinstance(p, click.Option)]
    options = [(p, record) for p, record in options if record is not None]
    if options:
        lines += ["| option | meaning |", "|---|---|"]
        lines += [f"| `{_cell(flags)}` | {_cell(text) or '&nbsp;'} |" for _, (flags, text) in options]
        lines.append("")
    return "\n".join(lines)


def render() -> str:
    group = cli_group()
    root = click.Context(group, info_name="deeprebirth")
    parts = [HEADER]
    parts += [render_command(path, command, root) for path, command in _commands(group, ())]
    return "\n".join(parts)


def every_flag() -> list[tuple[str, str]]:
    """(command, flag) for every option of every command: what the docs test looks for in the built site."""
    group = cli_group()
    return [(" ".join(path), flag) for path, command in _commands(group, ())
            for p in command.params if isinstance(p, click.Option) and not p.hidden
            for flag in (*p.opts, *p.secondary_opts)]


def main(argv: list[str]) -> None:
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
