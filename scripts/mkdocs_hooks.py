"""MkDocs hooks (mkdocs.yml ``hooks:``): pages made at build time from the project itself, so they cannot go stale.

- ``usage/options.md``: every command's options, rendered from the CLI's click declarations (gen_cli_docs.py).
- ``results/…``: the measurement tables and plots the benchmarks and the Fashion-MNIST example commit, served as
  they are so the benchmarks page can link its sources.
- ``architecture.md``: embeds ``docs/architecture.svg`` (drawn from the imports by scripts/draw_architecture.py)
  where it exists, and says how to draw it where it does not, so a strict build passes either way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"results": ROOT / "benchmarks" / "results", "results/fashion_mnist": ROOT / "examples" / "fashion_mnist"}
SERVED = (".md", ".png", ".svg")
DRAWING = "<!-- architecture.svg -->"


def _gen_cli_docs() -> Any:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "usage/options.md", content=_gen_cli_docs().render()))
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.iterdir()):
            if path.suffix in SERVED:
                files.append(File.generated(config, f"{prefix}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if DRAWING not in markdown:
        return markdown
    if (Path(config["docs_dir"]) / "architecture.svg").is_file():
        drawing = "![Imports between the layers, drawn from the code](architecture.svg)"
    else:
        drawing = ("*The drawing is not in this checkout yet: `python scripts/draw_architecture.py` writes "
                   "`docs/architecture.svg` from the imports, and the next build embeds it here.*")
    return markdown.replace(DRAWING, drawing)
