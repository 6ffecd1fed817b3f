"""The bundled example reaches the library through ``deeprebirth.api`` alone (and the CLI), as a user would, so a
move inside the package cannot break it; its GoogLeNet part runs end to end in the slow tier."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "open_nsfw.py"


def test_the_example_imports_only_the_public_api() -> None:
    found = set()
    for node in ast.walk(ast.parse(EXAMPLE.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deeprebirth"):
            found.add(node.module if node.module != "deeprebirth" else
                      ",".join(f"deeprebirth.{a.name}" for a in node.names))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("deeprebirth"))
    assert found == {"deeprebirth.api"}, found


@pytest.mark.slow
def test_the_example_slims_googlenet_and_reports_a_measured_speed_up(model_zoo: Path, tmp_path: Path) -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import open_nsfw; from pathlib import Path; "
            "open_nsfw.slim_googlenet(Path(sys.argv[2]), Path(sys.argv[3]))")
    done = subprocess.run([sys.executable, "-c", code, str(EXAMPLE.parent),
                           str(model_zoo / "bvlc_googlenet" / "deploy.prototxt"), str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    speed_up = float(done.stdout.split("speed-up in real Caffe: ")[1].split("x")[0])
    assert speed_up > 1.2, done.stdout  # 2.5x on a quiet machine: the default rules remove 13 of 14 poolings
    assert (tmp_path / "googlenet_types.png").stat().st_size > 0
    assert "deeprebirth finetune" in done.stdout
