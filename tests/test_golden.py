"""Behaviour kept bit for bit: every real net, rewritten under every rule group, preset and init/widen/rank choice,
writes the same prototxt, caffemodel and report as when tests/golden was recorded (tests/golden/record.py says
how, and how to record again after an intended change). Tucker pieces' weights are compared by their norms, to a
relative 1e-4: their last bits follow the CPU's LAPACK kernels (record.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from golden import record

CASES = dict(record.cases())
PARAMS = [pytest.param(net, case, id=f"{net}:{case}",
                       marks=() if case in record.QUICK_CASES or (net not in record.BIG_NETS and
                                                                  case in record.GROUPS) else pytest.mark.slow)
          for net in record.nets() for case in CASES]
_INPUTS: dict[str, tuple[str, str]] = {}


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, Any]]:
    return {net: record.load(net) for net in record.nets()}


def _inputs(net: str, factory: pytest.TempPathFactory, golden: dict[str, dict[str, Any]]) -> tuple[str, str]:
    if net not in _INPUTS:
        proto, model = record.prepare(net, factory.mktemp(f"golden-{net}"))
        # the inputs themselves (seeded random weights for the zoo nets) must not have drifted either
        assert record.sha256(proto) == golden[net]["input_prototxt_sha256"], f"{net}: input prototxt changed"
        assert record.sha256(model) == golden[net]["input_caffemodel_sha256"], f"{net}: input weights changed"
        _INPUTS[net] = (proto, model)
    return _INPUTS[net]


@pytest.mark.parametrize(("net", "case"), PARAMS)
def test_rewrite_matches_golden(net: str, case: str, golden: dict[str, dict[str, Any]],
                                tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    proto, model = _inputs(net, tmp_path_factory, golden)
    got = record.run_case(proto, model, CASES[case], tmp_path)
    want = golden[net]["cases"][case]
    for key in ("report", "prototxt_sha256", "caffemodel_sha256"):  # the report first: it says what differs
        if key == "report" and got[key] != want[key]:
            differ = [k for k in sorted(want[key].keys() | got[key].keys()) if want[key].get(k) != got[key].get(k)]
            pytest.fail(f"{net} {case}: report differs in {differ}: {got[key].get(differ[0])!r:.400} "
                        f"!= {want[key].get(differ[0])!r:.400}")
        assert got.get(key) == want.get(key), f"{net} {case}: {key}"
    if "caffemodel_norms" in want:  # Tucker pieces: LAPACK's last bits differ between CPUs (record.py)
        assert got["caffemodel_norms"].keys() == want["caffemodel_norms"].keys(), f"{net} {case}: layers"
        for layer, norms in want["caffemodel_norms"].items():
            assert got["caffemodel_norms"][layer] == [pytest.approx(n, rel=1e-4) for n in norms], \
                f"{net} {case}: {layer}"
