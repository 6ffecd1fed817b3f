"""Rendering for the command line: tables and summaries of what the library returns, as text. No click here (the
CLI echoes), no I/O: strings in, strings out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def profile_text(profiles: Sequence[Any], top: int) -> str:
    """One profile (per type, the slowest layers), or two side by side."""
    first = profiles[0]
    if len(profiles) == 1:
        return "\n".join([*profile_header(first), type_table(first), slowest_table(first, top)])
    return "\n".join([*profile_header(first, "before: "), *profile_header(profiles[1], "after:  "),
                      compare_table(first, profiles[1])])


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


def finetune_table(steps: Sequence[Any], labels_ignored: bool = False) -> str:
    def layers(names: Sequence[str]) -> str:
        return ", ".join(names) if len(names) <= 2 else f"{', '.join(names[:2])} +{len(names) - 2}"

    def change(a: float | None, b: float | None, fmt: Callable[[float | None], str]) -> str:
        return f"{fmt(a)} -> {fmt(b)}"

    rows = [[f"{s.index}. {s.name if s.rules == ['final'] else layers(s.relearn)}",
             "+".join(api.RULE_LABELS.get(r, r) for r in s.rules), s.target, f"{s.lr:.3g} {s.solver}",
             f"{s.best_iteration}/{s.iterations}",
             "labels ignored" if labels_ignored else change(s.accuracy_before, s.accuracy_after, pct),
             change(s.agreement_before, s.agreement_after, pct),
             change(s.error_before, s.error_after, num), change(s.output_error_before, s.output_error_after, num),
             f"{s.seconds:.1f}"] for s in steps]
    lines = [table(["phase: new layers", "merged", "loss on", "lr", "kept/iters", "held-out top-1", "agrees",
                    "error at blob", "error at output", "seconds"], rows)]
    for s in steps:
        reuse = "" if s.teacher_reuse is None else f", the original's outputs reused for {s.teacher_reuse:.0%}"
        loss = (s.loss or "-") + (f", with the original's Dropout ({', '.join(s.dropout)})" if s.dropout else "")
        lines.append(f"phase {s.index}: learning rate {s.lr:.3g} {s.solver} ({s.search or 'no search'}); loss "
                     f"{loss}; {s.iterations} updates, {s.images_per_second:.0f} training images/s{reuse}")
        lines += [f"  backed off: {b}" for b in s.backoffs]
        if s.refit is not None:
            lines.append("  " + refit_text(s.refit))
    return "\n".join(lines)


def refit_text(rounds: list[dict[str, Any]]) -> str:
    """The least-squares start before a phase (``finetune.refit.RefitResult.to_json`` per round), in a line."""
    first, last = rounds[0], rounds[-1]
    kls = [first["kl_before"], *(r["kl_after"] for r in rounds)]
    kl = "" if None in kls else "; held-out KL to the original " + " -> ".join(f"{v:.3g}" for v in kls)
    skipped = f", {len(last['skipped'])} left as they were" if last["skipped"] else ""
    verdict = "kept" if first["kept"] else "not kept (the held-out outputs did not come closer)"
    if len(rounds) > 1 and not last["kept"]:
        verdict += f"; round {len(rounds)} not kept"
    return (f"refit by least squares: {len(rounds)} round(s), {last['layers']} layer(s) on {last['images']} images "
            f"each{skipped}, {sum(r['seconds'] for r in rounds):.0f} s{kl}: {verdict}")


# ---------------------------------------------------------------------------------------------------------------
# whole command outputs


def next_step(relearn: Sequence[str], prototxt: str, weights: str | None, out_prototxt: str,
              out_weights: str | None, report_path: str | None, data: str | None = None,
              budget: str = "10m") -> str:
    """After a lossy rewrite: which layers need fine-tuning, and the finetune command line that does it (with the
    data and budget the merges were chosen for, after ``--max-drop``)."""
    return "\n".join([f"\n{len(relearn)} layer(s) now need fine-tuning: {', '.join(relearn)}",
                      "next: deeprebirth finetune " + " ".join([
                          prototxt, weights or "ORIGINAL.caffemodel", out_prototxt, out_weights or "SLIM.caffemodel",
                          "--report", report_path or "REPORT.json", "--data", data or "DATA", "--out", "FINAL.caffemodel",
                          "--budget", budget])])


def check_text(c: Any) -> str:
    """A rewrite's check in the reference runtime (named): the per-blob table and the verdict."""
    where = api.describe_reference(c.reference)
    lines = [table(["blob", "max |a-b|", "max |a-b| / max |a|"],
                   [[d.blob, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}"] for d in c.diffs])]
    if c.lossy:
        lines.append(f"check on {c.inputs} inputs in {where}: the rewrite is lossy, so outputs differ until the "
                     f"new layers are fine-tuned (worst relative difference now {c.worst.max_rel:.3g}); every "
                     "compared output keeps its shape")
    else:
        verdict = "PASSED" if c.passed else "FAILED"
        lines.append(f"check {verdict} on {c.inputs} inputs, both nets in {where}: worst relative error "
                     f"{c.worst.max_rel:.3g} (tolerance {c.tolerance:g}), predictions changed: {c.predictions_changed}")
    return "\n".join(lines)


def skips_lines(skips: Sequence[tuple[str, Any]]) -> list[str]:
    if not skips:
        return []
    return [f"places where a rule would not fire ({len(skips)}):"] + [f"  {rule}: {skip.layer}: {skip.reason}"
                                                                      for rule, skip in skips]


def inspect_text(found: Any) -> str:
    rows = []
    for cost in found.costs:
        shapes = "?" if cost.top_shapes is None else " ".join("x".join(map(str, s)) for s in cost.top_shapes)
        rows.append([cost.name, cost.type, shapes, human(cost.params), human(cost.macs),
                     human(cost.activation_bytes, "B")])
    lines = [table(["layer", "type", "output", "params", "MACs", "memory"], rows),
             (f"total: {len(found.costs)} layers, {human(sum(c.params for c in found.costs))} params, "
              f"{human(sum(c.macs for c in found.costs))} MACs, "
              f"{human(sum(c.activation_bytes for c in found.costs), 'B')} activations"),
             "", f"rules that would fire ({len(found.fires)}):"]
    lines += [f"  {rule}: {' + '.join(layers)}" for rule, layers in found.fires]
    return "\n".join(lines + skips_lines(found.skips))


def latency_text(nets: Sequence[tuple[str, str | None]], runtime: str, timing: dict[str, Any],
                 times: Sequence[Sequence[float]]) -> str:
    import statistics

    medians = [statistics.median(t) for t in times]
    labels = ["before", "after"] if len(nets) == 2 else ["net"]
    lines = [(f"{runtime}: whole forward passes, {timing['threads']} thread(s), median of {timing['rounds']} "
             f"interleaved rounds after {timing['warmup']} warm-up, {timing['clock']} clock"
             f"{'' if nets[0][1] else ', random weights'}"),
             table(["", "net", "median ms", "min ms"],
                   [[label, path, f"{m:.2f}", f"{min(t):.2f}"] for label, (path, _), m, t in
                    zip(labels, nets, medians, times)])]
    if len(nets) == 2 and medians[1] > 0:
        lines.append(f"speed-up before/after in {runtime}: {medians[0] / medians[1]:.2f}x")
    return "\n".join(lines)


def runtime_plan_text(prototxt: str, weights: str | None, runtime: str, plan: Any) -> str:
    lines = [(f"{prototxt}{'' if weights else ' (random weights)'}: {plan.original_ms:.2f} ms per forward in "
             f"{runtime} (batch {plan.batch}, {plan.threads} thread(s), median of {plan.rounds} interleaved rounds "
             f"of every variant); each merge applied alone and timed there; noise floor {100 * plan.noise:.1f}% "
             f"(identical copies of the net measured that far apart)")]
    rows = []
    for i, c in enumerate(plan.candidates, 1):
        share = 100 * plan.share(c)
        verdict = ("pays" if c.risk == "exact" or share >= 1.0 else
                   "does not pay" if plan.surely_below(c, 1.0) else "within noise")
        rows.append([i, c.rule, c.risk, c.stage, c.layers[0], f"{c.saved_ms:.2f}", f"{share:.1f}%", verdict])
    lines.append(table(["#", "rule", "risk", "stage", "at", f"saved on {runtime} (ms)", "of net", ""], rows))
    losers = [c for c in plan.candidates if c.risk == "lossy" and plan.surely_below(c, 1.0)]
    if losers:
        lines.append(f"{len(losers)} lossy merge(s) save under 1% on {runtime} even allowing for the noise: "
                     f"re-learning them spends accuracy for nothing there (rewrite --runtime {runtime} --min-gain 1 "
                     "leaves them out)")
    return "\n".join(lines)


def plan_text(prototxt: str, plan: Any, risks: dict[int, Any], risk_budget: str) -> str:
    p = plan.profile
    note = " (no --weights: timed and planned with random weights)" if plan.random_weights else ""
    where = api.describe_reference(p.runtime)
    lines = [(f"{prototxt}{note}: {p.total_ms:.2f} ms per forward in {where} (batch {p.batch}, {p.threads} "
             f"thread(s), {p.clock} clock), {100 * p.non_tensor_share:.1f}% non-tensor; convolution cost "
             f"{plan.conv_ms_per_mac * 1e9:.3f} ms per GMAC")]
    rows = []
    for i, c in enumerate(plan.candidates, 1):
        share = f"{100 * c.time_saved_ms / p.total_ms:.1f}%" if p.total_ms else "-"
        row = [i, c.rule, c.group, c.risk, c.stage, c.layers[0], len(c.removed),
               f"{c.time_saved_ms:.3f}{'*' if c.estimated else ''}", share, human(c.macs_saved),
               human(c.params_saved), human(c.memory_saved_bytes, "B")]
        if risks:
            r = risks.get(i - 1)
            row += ["-"] * 4 if r is None else risk_cells(r)
        rows.append(row)
    headers = ["#", "rule", "group", "risk", "stage", "at", "removes", "time saved (ms)", "of net", "MACs saved",
               "params saved", "memory saved"]
    if risks:
        headers += ["agrees (short mimic)", "error at output", "drop (points)", "updates"]
    lines.append(table(headers, rows))
    if risks:
        some = next(iter(risks.values()))
        lines.append(f"agrees: held-out top-1 agreement with the original of the net with only that merge (and "
                     f"those it builds on), as merged -> after a {risk_budget} mimic; exact merges agree fully; "
                     f"drop: points of held-out {some.measure} lost ({some.held_out} images: one is "
                     f"{some.resolution or 0:.2g} points); updates: solver iterations of the mimic (0: no update, "
                     "so no figures after it)")
    if not plan.candidates:
        lines.append("no rule matches this net")
    for i, c in enumerate(plan.candidates, 1):
        extra = f"; re-learn {', '.join(c.relearn)}" if c.relearn else ""
        lines.append(f"  {i}. {c.summary}{extra}")
    if any(c.estimated for c in plan.candidates):
        lines.append("  * includes layers made by an earlier stage, timed from their MACs")
    if any(c.stage for c in plan.candidates):
        lines.append("  stage n: matches once the candidates of the earlier stages are applied")
    return "\n".join(lines + skips_lines(plan.skips))


def risk_cells(r: Any) -> list[str]:
    """A measured risk's columns: agreement, error at the output and drop, as merged -> after the short run."""
    if not r.updated:
        return [f"{pct(r.agreement_before)} (no update)", f"{num(r.output_error_before)} (no update)",
                f"{points(r.drop_before)} (no update)", "0"]
    return [f"{pct(r.agreement_before)} -> {pct(r.agreement_after)}",
            f"{num(r.output_error_before)} -> {num(r.output_error_after)}",
            f"{points(r.drop_before)} -> {points(r.drop_after)}", str(r.iterations)]


def points(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def accuracy_text(chosen: Any) -> str:
    """``--max-drop``: what was kept and what was left out, with the measured risk and the time at stake."""
    plan = chosen.plan
    lines = [(f"accuracy-aware choice: lossy merges fine-tuning can bring back to within {chosen.max_drop:g} points "
              f"with a {chosen.budget} budget (each measured by a short mimic of the net with it, the runs sharing "
              f"the budget: {chosen.share} each to start with; {chosen.seconds:.0f} s in all); exact folds always "
              "apply")]
    rows = []
    for d in chosen.decisions:
        c = plan.candidates[d.candidate]
        if c.risk == "exact":
            continue
        r = chosen.risks[d.candidate]
        rows.append([d.candidate + 1, "kept" if d.kept else "LEFT OUT", c.rule, c.layers[0],
                     f"{c.time_saved_ms:.2f} ms ({chosen.share_of_net(d.candidate):.1f}%)",
                     f"{points(r.drop_before)} -> {points(r.drop_after)}" if r.updated
                     else f"{points(r.drop_before)} (no update)", r.iterations, f"{r.seconds:.0f}", d.reason])
    lines.append(table(["#", "choice", "rule", "at", "time saved (of net)", "drop (points)", "updates", "seconds",
                        "why"], rows) if rows else "no lossy merge to choose from")
    lines += [f"drop: points of held-out {r.measure}" for r in chosen.risks.values() if r.labels_ignored][:1]
    out = chosen.left_out
    if out:
        saved = sum(chosen.share_of_net(d.candidate) for d in out)
        lines.append(f"left out {len(out)} lossy merge(s), {saved:.1f}% of the net's Caffe time; kept "
                     f"{len(chosen.kept_lossy)}")
    for text in chosen.refused:
        lines.append(f"  not made: {text} (a place the plan did not measure)")
    return "\n".join(lines)


def evaluate_text(result: Any, reference: bool) -> str:
    rows = [["net", pct(result.top1), pct(result.top5), pct(result.agreement) if reference else "-"]]
    rows += [["reference", pct(result.reference_top1), pct(result.reference_top5), ""]] if reference else []
    change = (f"\ntop-1 change {100 * (result.top1 - result.reference_top1):+.2f} points, standard error "
              f"{100 * result.top1_change_error:.2f} (paired; a change within twice that is noise)" if reference else "")
    return "\n".join([table(["", "top-1", "top-5", "top-1 agrees with reference"], rows),
                      f"{result.images} images, {result.classes} classes, {result.seconds:.1f} s{change}"])


def draw_text(result: Any) -> str:
    shown = result.highlighted[:8]
    more = f" and {len(result.highlighted) - len(shown)} more" if len(result.highlighted) > len(shown) else ""
    merged = f": {', '.join(shown)}{more}" if shown else ""
    return f"wrote {result.path} ({result.layers} layers, {len(result.highlighted)} highlighted{merged})"


def batch_row(row: Any, done: int, total: int) -> str:
    """One finished model as the batch goes (a log line: it says what happened to that model, not only how far)."""
    detail = row.error or (f"{row.layers_before} -> {row.layers_after} layers" +
                           (f", check {row.check}" if row.check else ""))
    cached = " (done earlier)" if row.cached else ""
    return f"[{done}/{total}] {row.status}{cached} {row.prototxt} ({row.seconds:.1f} s): {detail}"


def batch_text(summary: Any) -> str:
    rows = [[r.prototxt, r.status + (" (earlier)" if r.cached else ""),
             "" if r.layers_before is None else f"{r.layers_before} -> {r.layers_after}",
             "" if r.macs_before is None else f"{human(r.macs_before)} -> {human(r.macs_after or 0)}",
             r.check or "", r.error[:80]] for r in summary.results]
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
    return "\n".join([table(["model", "status", "layers", "MACs", "check", "note"], rows),
                      (f"{len(summary.results)} found: {counts} ({summary.seconds:.1f} s); wrote "
                      f"{', '.join(summary.files)}")])


def export_text(result: Any) -> str:
    def shapes(found: Mapping[str, tuple[int, ...] | None]) -> str:
        return ", ".join(f"{name} {'x'.join(map(str, shape)) if shape else '?'}" for name, shape in found.items())

    nodes = f", {result.nodes} ONNX nodes" if result.nodes is not None else ""
    lines = [(f"wrote {', '.join(result.files)} ({result.format}{nodes}): {shapes(result.inputs)} -> "
             f"{shapes(result.outputs)}")]
    c = result.check
    if c is not None:
        lines.append(table(["output", "max |a-b|", "max |a-b| / max |a|"],
                           [[d.blob, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}"] for d in c.diffs]))
        verdict = "PASSED" if c.passed else "FAILED"
        lines.append(f"check {verdict} on {c.inputs} inputs, {api.describe_reference(c.reference)} vs {c.runtime}: "
                     f"worst relative error "
                     f"{c.worst.max_rel:.3g} (tolerance {c.tolerance:g}), predictions changed: "
                     f"{c.predictions_changed}")
    return "\n".join(lines)
