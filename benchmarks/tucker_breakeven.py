"""When do Tucker pieces run faster than the convolution they replace? One conv (+ ReLU) against its
`decompose_conv_tucker` pieces at explicit ranks whose MACs approach the conv's, timed side by side in real Caffe
(batch 1, 1 OpenBLAS thread, interleaved rounds, random weights). Three shapes: an RGB stem (Tucker-1: 3 -> 64,
7x7 stride 2 at 224x224, as open_nsfw's and GoogLeNet's), a middle conv (64 -> 64, 3x3 at 56x56) and a wide one
(256 -> 256, 3x3 at 14x14). The rule's `MIN_SAVING` (a tenth of the MACs, for ranks read off the kernel) comes
from this table: it goes to benchmarks/results/tucker_breakeven.md.

    .venv/bin/python benchmarks/tucker_breakeven.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deeprebirth.measure.profile import interleaved_latency, random_caffemodel

SHAPES = {  # name: (C, H=W, N, kernel, stride, pad, explicit ranks (R1, R2) to time)
    "RGB stem, Tucker-1": (3, 224, 64, 7, 2, 3, [(3, r) for r in (8, 16, 24, 32, 40, 44)]),
    "middle conv": (64, 56, 64, 3, 1, 1, [(r, r) for r in (16, 24, 32, 40, 48, 52, 56)]),
    "wide conv": (256, 14, 256, 3, 1, 1, [(r, r) for r in (64, 96, 128, 160, 192, 208, 224)]),
}


def conv_net(c: int, size: int, n: int, kernel: int, stride: int, pad: int) -> str:
    return (f'name: "conv"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {c} '
            f'dim: {size} dim: {size} }} }} }}\n'
            f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {{ '
            f'num_output: {n} kernel_size: {kernel} stride: {stride} pad: {pad} }} }}\n'
            'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n')


def decomposed(base: Path, ranks: tuple[int, int], folder: Path) -> tuple[Path, Path, float]:
    """The pieces at ``ranks`` (the project's own rule), random weights, and their MACs over the conv's."""
    out, report = folder / f"r{ranks[0]}_{ranks[1]}.prototxt", folder / f"r{ranks[0]}_{ranks[1]}.json"
    subprocess.run([str(Path(sys.executable).parent / "deeprebirth"), "rewrite", str(base), str(out), "--rules",
                    "decompose_conv_tucker", "--rank-method", f"ranks:{ranks[0]},{ranks[1]}", "--report", str(report)],
                   check=True, capture_output=True)
    weights = out.with_suffix(".caffemodel")
    random_caffemodel(out, weights)
    saved = json.loads(report.read_text())
    return out, weights, saved["after"]["macs"] / saved["before"]["macs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    how = (f"`.venv/bin/python benchmarks/tucker_breakeven.py --rounds {args.rounds}`: batch 1, 1 thread, the conv "
           "and its pieces at each rank timed in turn in one process; time = median over the rounds of the pieces' "
           "forward time over the conv's (each net ends in a ReLU). Random weights.")
    lines = ["# Tucker pieces against the conv they replace, in real Caffe", "", how, "",
             "| shape | ranks (R1, R2) | MACs, pieces / conv | time, pieces / conv |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for shape, (c, size, n, kernel, stride, pad, ranks) in SHAPES.items():
            folder = Path(tmp) / shape.split()[0]
            folder.mkdir()
            base = folder / "conv.prototxt"
            base.write_text(conv_net(c, size, n, kernel, stride, pad))
            random_caffemodel(base, base.with_suffix(".caffemodel"))
            pieces = [decomposed(base, r, folder) for r in ranks]
            print(f"{shape}: timing the conv and {len(pieces)} decompositions ...", file=sys.stderr, flush=True)
            times = interleaved_latency([(base, base.with_suffix(".caffemodel"))] + [(p, w) for p, w, _ in pieces],
                                        rounds=args.rounds, warmup=3)
            for r, (_, _, macs), t in zip(ranks, pieces, times[1:]):
                ratio = statistics.median(a / b for a, b in zip(t, times[0]))
                lines.append(f"| {shape} ({c} -> {n}, {kernel}x{kernel}, {size}x{size}) | {r[0]}, {r[1]} | "
                             f"{macs:.3f} | {ratio:.3f} |")
    out = ROOT / "benchmarks" / "results" / "tucker_breakeven.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
