"""Mutation fuzzing of `deeprebirth rewrite` at length: random valid nets with random weights, their prototxt text
and caffemodel bytes mutated (byte flips, truncations, insertions, deleted/duplicated/swapped lines, swapped and
extreme numbers, retyped layers, rewired blobs, contradictory settings, broken blobs), each case run through the
CLI. Prints the counts: cases, ok, clean errors, crashes, and each by kind. The harness is the tests/fuzzing
package, which CI runs a few hundred cases of (tests/test_fuzz.py). Run it as a module from the repository root, so
that ``tests.fuzzing`` imports as a package (no path set-up needed):

    .venv/bin/python -m benchmarks.fuzz [--cases 10000] [--jobs 2] [--seed 0] [--rules all]
                                        [--crashes DIR] [--out benchmarks/results/fuzz.md]

Exit status 1 when any case crashed (its inputs are saved under --crashes, if given, to reproduce it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tests.fuzzing import harness

ROOT = Path(__file__).resolve().parents[1]


def run_share(cases: int, seed: int, rules: str) -> harness.FuzzStats:
    """One worker's share: its own seed, its own temp folder (runs in a spawned process's main thread, where the
    harness's hang alarm works)."""
    with tempfile.TemporaryDirectory(prefix="deeprebirth-fuzz-") as tmp:
        return harness.fuzz(cases, Path(tmp), seed=seed, rules=rules)


def merge(parts: list[harness.FuzzStats]) -> harness.FuzzStats:
    total = harness.FuzzStats()
    for part in parts:
        total.cases += part.cases
        total.ok += part.ok
        total.errors += part.errors
        total.crashes += part.crashes
        total.error_kinds.update(part.error_kinds)
        total.crash_kinds.update(part.crash_kinds)
        total.mutations.update(part.mutations)
        total.crash_cases += part.crash_cases
    return total


def report(stats: harness.FuzzStats, seconds: float, args: argparse.Namespace) -> str:
    def rows(counter: Counter[str], limit: int | None = None) -> list[str]:
        return [f"| {n} | `{kind.replace('|', '/')}` |" for kind, n in counter.most_common(limit)]

    lines = [(f"fuzz: {stats.cases} cases (seed {args.seed}, {args.jobs} job(s), rules `{args.rules}`), "
              f"{seconds:.0f} s"), "",
             "| cases | ok | clean errors | crashes |", "|---|---|---|---|",
             f"| {stats.cases} | {stats.ok} | {stats.errors} | {stats.crashes} |", ""]
    if stats.crashes:
        lines += ["crashes by kind:", "", "| n | kind |", "|---|---|", *rows(stats.crash_kinds), ""]
    lines += [f"clean errors by kind ({len(stats.error_kinds)} kinds; the 40 most frequent):", "",
              "| n | kind |", "|---|---|", *rows(stats.error_kinds, 40), "",
              "mutations applied:", "", "| n | kind |", "|---|---|", *rows(stats.mutations)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rules", default="all")
    parser.add_argument("--crashes", type=Path, help="save each crashing case's inputs here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    shares = [args.cases // args.jobs + (1 if i < args.cases % args.jobs else 0) for i in range(args.jobs)]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_share, n, args.seed * 1000 + i, args.rules) for i, n in enumerate(shares)]
        stats = merge([f.result() for f in futures])
    text = report(stats, time.perf_counter() - start, args)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    if args.crashes and stats.crash_cases:
        args.crashes.mkdir(parents=True, exist_ok=True)
        for case, outcome in stats.crash_cases:
            folder = args.crashes / f"case{case.seed}"
            folder.mkdir(exist_ok=True)
            (folder / "in.prototxt").write_bytes(case.prototxt)
            if case.caffemodel is not None:
                (folder / "in.caffemodel").write_bytes(case.caffemodel)
            (folder / "outcome.txt").write_text(f"{outcome.detail}\nmutations: {case.mutations}\n")
    sys.exit(1 if stats.crashes else 0)


if __name__ == "__main__":
    main()
