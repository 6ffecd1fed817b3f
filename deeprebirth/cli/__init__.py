"""The command line: parse options, call ``deeprebirth.api``, echo what ``render`` makes of the results.
Exit codes: 0 ok, 1 check failed, 2 bad input, 3 internal error.

Each command's options are declared once in the library (``deeprebirth.option.Option``) and become click flags in
``options``; the commands live by what they do (``rewrite``: rewrite, batch, inspect, draw; ``measure``: profile,
plan; ``finetune``: finetune, evaluate; ``export``), all text in ``render``, finetune's progress bar in
``progress``."""

from __future__ import annotations

import click

from deeprebirth.cli.export import export_command
from deeprebirth.cli.finetune import evaluate_command, finetune_command
from deeprebirth.cli.measure import plan_command, profile_command
from deeprebirth.cli.rewrite import batch_command, draw_command, inspect, rewrite


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="deeprebirth")
def main() -> None:
    """Slim trained Caffe networks for mobile CPUs (DeepRebirth)."""


for _command in (rewrite, inspect, profile_command, plan_command, draw_command, finetune_command, evaluate_command,
                 batch_command, export_command):
    main.add_command(_command)
