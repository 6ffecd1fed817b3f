"""Rendering for the command line: tables and summaries of what the library returns, as text. No click here (the
CLI echoes), no I/O: strings in, strings out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from deeprebirth import api
from deeprebirth.api import NetSummary, RewriteReport


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


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def profile_header(p: Any, label: str = "") -> list[str]:
    shapes = ", ".join(f"{name} {'x'.join(map(str, s))}" for name, s in p.input_shapes.items())
    blas = "?" if p.blas_threads is None else p.blas_threads
    weights = p.weights or "random weights"
    return [(f"{label}{p.prototxt} ({weights}): input {shapes}, {p.threads} thread(s) (OpenBLAS uses {blas}), "
             f"median of {p.rounds} rounds after {p.warmup} warm-up, {p.clock} clock"),
            (f"  forward {p.forward_ms:.2f} ms (whole pass); per-layer sum {p.total_ms:.2f} ms: tensor "
             f"{p.class_ms('tensor'):.2f} ms, non-tensor {p.class_ms('non-tensor'):.2f} ms "
             f"({100 * p.non_tensor_share:.1f}% non-tensor)"),
            (f"  memory: Caffe blobs {mib(p.blob_bytes)} + params {mib(p.param_bytes)} = {mib(p.memory_bytes)}; "
             f"process peak RSS {mib(p.peak_rss_bytes)} ({mib(p.base_rss_bytes)} before the net)")]


def type_table(p: Any) -> str:
    return table(["type", "class", "layers", "ms", "share"],
                 [[t.type, api.type_class(t.type), t.layers, f"{t.ms:.2f}", f"{100 * t.share:.1f}%"] for t in p.by_type()])


def slowest_table(p: Any, top: int) -> str:
    """The ``top`` slowest layers of a profile (every layer when ``top`` is 0)."""
    slowest = sorted(p.layers, key=lambda layer: -layer.ms)[:top or None]
    return f"\n{'slowest layers' if top else 'layers'}:\n" + table(
        ["layer", "type", "ms", "share"],
        [[t.name, t.type, f"{t.ms:.3f}", f"{100 * t.ms / p.total_ms:.1f}%" if p.total_ms else "-"] for t in slowest])


def compare_table(a: Any, b: Any) -> str:
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
        ["Caffe blobs + params", "", "", mib(a.memory_bytes), mib(b.memory_bytes),
         ratio(a.memory_bytes, b.memory_bytes)],
        ["peak RSS", "", "", mib(a.peak_rss_bytes), mib(b.peak_rss_bytes), ratio(a.peak_rss_bytes, b.peak_rss_bytes)],
    ]
    return table(["type", "layers before", "layers after", "before", "after", "before/after"], rows)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def finetune_table(steps: Sequence[Any]) -> str:
    def layers(names: Sequence[str]) -> str:
        return ", ".join(names) if len(names) <= 2 else f"{', '.join(names[:2])} +{len(names) - 2}"

    def change(a: float | None, b: float | None, fmt: Callable[[float | None], str]) -> str:
        return f"{fmt(a)} -> {fmt(b)}"

    rows = [[f"{s.index}. {s.name if s.rules == ['final'] else layers(s.relearn)}",
             "+".join(api.RULE_LABELS.get(r, r) for r in s.rules), s.target, f"{s.lr:.3g} {s.solver}",
             f"{s.best_iteration}/{s.iterations}", change(s.accuracy_before, s.accuracy_after, pct),
             change(s.agreement_before, s.agreement_after, pct),
             change(s.error_before, s.error_after, num), change(s.output_error_before, s.output_error_after, num),
             f"{s.seconds:.1f}"] for s in steps]
    return table(["phase: new layers", "merged", "loss on", "lr", "kept/iters", "held-out top-1", "agrees",
                  "error at blob", "error at output", "seconds"], rows)
