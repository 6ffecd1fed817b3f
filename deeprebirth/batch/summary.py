"""The summary files: summary.json, summary.csv and summary.md, one row per model found."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

from deeprebirth.batch.records import BatchSummary, ModelResult
from deeprebirth.io import caffe_io

CSV_COLUMNS = ["prototxt", "weights", "kind", "status", "cached", "layers_before", "layers_after", "params_before",
               "params_after", "macs_before", "macs_after", "activation_bytes_before", "activation_bytes_after",
               "rules_fired", "lossy", "check", "seconds", "warnings", "error"]


def _fired(row: ModelResult) -> str:
    return " ".join(f"{rule}x{n}" for rule, n in row.rules_fired.items())


def summary_csv(summary: BatchSummary) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in summary.results:
        values = asdict(row)
        values["rules_fired"] = _fired(row)
        values["warnings"] = " | ".join(row.warnings)
        values["seconds"] = f"{row.seconds:.2f}"
        writer.writerow(["" if values[c] is None else values[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


def _arrow(before: int | None, after: int | None, scale: float = 1.0, unit: str = "") -> str:
    if before is None or after is None:
        return ""
    if scale == 1.0:
        return f"{before} → {after}"
    return f"{before / scale:.1f} → {after / scale:.1f}{unit}"


def summary_markdown(summary: BatchSummary) -> str:
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
    headers = ["model", "weights", "status", "layers", "params (M)", "MACs (G)", "activations (MiB)", "rules fired",
               "check", "time (s)", "note"]
    lines = [f"# deeprebirth batch: {summary.zoo_dir} → {summary.out_dir}", "",
             (f"{len(summary.results)} entries: {counts}; rules `{summary.options.rules}`, "
              f"{summary.seconds:.1f} s{' (interrupted)' if summary.interrupted else ''}"), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in summary.results:
        note = r.error or " ".join(r.warnings)
        status = r.status + (" (cached)" if r.cached else "")
        lines.append("| " + " | ".join(cell(c) for c in [
            r.prototxt, r.weights or "", status, _arrow(r.layers_before, r.layers_after),
            _arrow(r.params_before, r.params_after, 1e6), _arrow(r.macs_before, r.macs_after, 1e9),
            _arrow(r.activation_bytes_before, r.activation_bytes_after, 2**20), _fired(r), r.check,
            f"{r.seconds:.1f}" if r.seconds else "", note]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: BatchSummary, out: Path) -> list[str]:
    """summary.json, summary.csv, summary.md in ``out``, each written atomically."""
    texts = {"summary.json": json.dumps(summary.to_json(), indent=2), "summary.csv": summary_csv(summary),
             "summary.md": summary_markdown(summary)}
    for name, text in texts.items():
        caffe_io.atomic_write_bytes(out / name, text)
    return [str(out / name) for name in texts]
