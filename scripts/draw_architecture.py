"""Draw the imports between the package's folders (and its top-level modules), as the code states them, with
graphviz's ``dot``: every arrow points from an importer down to what it imports, the layers top to bottom.

    python scripts/draw_architecture.py [OUT]      (default docs/architecture.svg; .png, .pdf and .dot work too)

The imports come from ``scripts/import_graph.py``, the reader ``tests/test_layout.py`` checks the layer order with,
so the drawing and the test cannot disagree. An arrow that would point up (a cycle) is drawn red and the script
exits with 1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.import_graph import ROOT, cycle, folder_graph  # run as a script, from anywhere: the repo on the path first

# the folders and modules only the package's own plumbing needs: drawn, they would only add arrows from everywhere
LEFT_OUT = {"deeprebirth", "caffe_pb2", "errors", "option", "aliases"}


def dot_source(graph: dict[str, set[str]]) -> str:
    lines = ["digraph architecture {", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];',
             '  edge [color="#55607a", arrowsize=0.7];']
    nodes = sorted(n for n in graph if n not in LEFT_OUT)
    lines += [f'  "{n}" [label="{n}/"];' if (ROOT / "deeprebirth" / n).is_dir() else f'  "{n}";' for n in nodes]
    looped = set(cycle(graph))
    for source in nodes:
        for target in sorted(graph[source] - LEFT_OUT):
            # a transitive arrow (also reachable through another) only clutters the picture: keep the direct layers
            if any(target in _reachable(graph, other) for other in graph[source] - {target} - LEFT_OUT):
                continue
            colour = ', color="red"' if source in looped and target in looped else ""
            lines.append(f'  "{source}" -> "{target}" [{colour.lstrip(", ")}];' if colour else
                         f'  "{source}" -> "{target}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "architecture.svg"
    graph = folder_graph()
    source = dot_source(graph)
    if out.suffix == ".dot":
        out.write_text(source)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dot", f"-T{out.suffix.lstrip('.')}", "-o", str(out)], input=source, text=True, check=True)
    found = cycle(graph)
    if found:
        print(f"import cycle between folders: {' -> '.join(found)}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
