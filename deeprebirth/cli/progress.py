"""Finetune's progress on stderr: a line per phase, the learning-rate search and the held-out checkpoints, and
``click.progressbar`` over each phase's iterations (which click draws on a terminal only; a log gets its label)."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from deeprebirth.cli.render import num, pct


class FinetuneProgress:
    """A callable for ``finetune_files(progress=...)``: renders each event the library reports."""

    def __init__(self) -> None:
        self.bar: Any = None  # the running phase's click progress bar
        self.drawn = False  # the bar's line is on screen and not yet ended by a newline
        self.last = 0.0  # when the bar was last moved: twice a second is enough for a person, and cheap

    def __call__(self, event: Any) -> None:
        if event.event == "iteration":
            self._advance(event)
            return
        if event.event in ("step", "skipped", "finished"):
            self._close()
        else:
            self._end_line()  # a message between two draws of the bar goes below it, not into it
        if event.event == "baseline":
            click.echo(f"measuring the original and the slim net on the held-out data ({event.steps} phase(s) "
                       "planned)", err=True)
        elif event.event == "skipped":
            click.echo(f"phase {event.step}/{event.steps} {event.name}: done in an earlier run", err=True)
        elif event.event == "step":
            click.echo(f"phase {event.step}/{event.steps}: {event.name}", err=True)
        elif event.event == "refit" and (event.iteration == 1 or event.iteration % 10 == 0
                                         or event.iteration == event.iterations):
            click.echo(f"  least-squares refit before phase {event.step}: layer {event.iteration}/{event.iterations}"
                       f" {event.name}", err=True)
        elif event.event == "search":
            click.echo(f"  probe: learning rate {event.lr:.3g} ({event.solver}): held-out search score "
                       f"{event.loss:.4g}", err=True)
        elif event.event == "evaluate" and event.metrics:
            m = event.metrics
            parts = [f"{k} {pct(m[k]) if k in ('accuracy', 'agreement') else num(m[k])}"
                     for k in ("accuracy", "agreement", "loss") if k in m]
            click.echo(f"  held-out at iteration {event.iteration}: {', '.join(parts)}", err=True)

    def _advance(self, event: Any) -> None:
        if self.bar is None or self.bar.length != event.iterations:
            self._close()
            # the library's time left, not click's ETA: a time budget ends a phase before its last iteration
            self.bar = click.progressbar(length=max(event.iterations, 1), label="  training", width=30,
                                         show_eta=False, show_percent=False, show_pos=True,
                                         item_show_func=lambda text: text, file=sys.stderr)
        now = time.monotonic()
        if now - self.last < 0.5 and event.iteration < event.iterations:
            return
        self.last = now
        left = "" if event.seconds_left is None else f", {max(event.seconds_left, 0) / 60:.1f} min left"
        self.bar.update(max(event.iteration - self.bar.pos, 0), f"loss {event.loss:.4g}{left}")
        self.drawn = True

    def _end_line(self) -> None:
        if self.bar is not None and self.drawn:
            self.bar.render_finish()
            self.drawn = False

    def _close(self) -> None:
        self._end_line()
        self.bar = None
