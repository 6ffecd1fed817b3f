"""The documentation: the MkDocs site builds with warnings as errors, every option of every command appears in its
generated option tables, and the README stays a landing page whose links lead somewhere."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
README_LINES = 150


def _gen_cli_docs():  # type: ignore[no-untyped-def]
    return load_script("scripts/gen_cli_docs.py")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
                          check=False, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "WARNING" not in done.stderr, done.stderr[-4000:]
    return out


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    assert (site / "index.html").is_file()
    for page in ("install", "usage", "usage/options", "finetune", "accuracy", "deploy", "architecture", "benchmarks",
                 "decisions", "decisions/schedule", "decisions/adam-rescue", "decisions/noise-floor",
                 "decisions/removed", "results/slim_speed"):
        assert (site / page / "index.html").is_file(), page


def test_every_option_of_every_command_is_documented(site: Path) -> None:
    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "usage" / "options" / "index.html").read_text()))
    flags = _gen_cli_docs().every_flag()
    assert len({command for command, _ in flags}) >= 9 and len(flags) > 100
    sections = re.split(r"deeprebirth (\w+) \[OPTIONS\]", text)
    by_command = {sections[k]: sections[k + 1] for k in range(1, len(sections) - 1, 2)}
    missing = [(command, flag) for command, flag in flags if flag not in by_command.get(command, "")]
    assert not missing, missing


def test_the_architecture_page_embeds_the_drawing_or_says_how_to_make_it(site: Path) -> None:
    page = (site / "architecture" / "index.html").read_text()
    assert "architecture.svg" in page and "<!-- architecture.svg -->" not in page


def test_the_readme_is_a_landing_page_whose_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
    for command in ("make example", "make test"):
        assert command in text
