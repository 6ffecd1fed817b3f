"""What a batch finds and what it records: the options, a found model, one summary row, the whole summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from deeprebirth.option import Option
from deeprebirth.pipeline import RewriteOptions

FAILED = ("check_failed", "failed", "crashed", "timeout")


@dataclass
class BatchOptions(RewriteOptions):
    """Every rewrite option (applied to each model; ``check`` only to models with weights), and the batch's own."""

    jobs: int | None = None  # worker processes; None: one per CPU
    timeout: float = 600.0  # seconds per model, rewrite and check together
    force: bool = False  # redo models that a previous run finished


_DEFAULT = BatchOptions()
# ``batch``'s own options (besides every rewrite option), each declared once: defaults from BatchOptions
BATCH_OPTIONS: tuple[Option, ...] = (
    Option("jobs", int, _DEFAULT.jobs, minimum=1, help="worker processes, one model each  [default: one per CPU]"),
    Option("timeout", float, _DEFAULT.timeout, minimum=1, help="seconds per model before its worker is stopped"),
    Option("force", bool, _DEFAULT.force, switch=True,
           help="redo models a previous run finished (same inputs and options)"),
    Option("strict", bool, False, switch=True, help="exit with 1 when any model failed"),
)


@dataclass
class FoundModel:
    """A prototxt (or a lone caffemodel) found in the zoo; paths relative to the zoo, with "/"."""

    prototxt: str
    weights: str | None
    kind: str  # "deploy", "train_val", "solver", "caffemodel"
    skip: str = ""  # why it is not rewritten ("" : it is)


@dataclass
class ModelResult:
    """One row of the summary."""

    prototxt: str
    weights: str | None
    kind: str
    status: str  # "ok", "check_failed", "failed", "crashed", "timeout", "skipped", "interrupted"
    error: str = ""  # why it failed or was skipped
    layers_before: int | None = None
    layers_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    activation_bytes_before: int | None = None
    activation_bytes_after: int | None = None
    rules_fired: dict[str, int] = field(default_factory=dict)
    lossy: bool = False
    relearn: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    check: str = ""  # "passed ...", "lossy ...", "FAILED ...", "skipped: why", "" (not asked)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # relative to the output folder
    cached: bool = False  # finished by an earlier run with the same inputs and options

    @property
    def failed(self) -> bool:
        return self.status in FAILED


@dataclass
class BatchSummary:
    zoo_dir: str
    out_dir: str
    options: BatchOptions
    results: list[ModelResult]
    seconds: float
    interrupted: bool = False
    files: list[str] = field(default_factory=list)  # the summary files written

    @property
    def failed(self) -> list[ModelResult]:
        return [r for r in self.results if r.failed]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.results))

    def to_json(self) -> dict[str, Any]:
        return {"zoo_dir": self.zoo_dir, "out_dir": self.out_dir, "options": asdict(self.options),
                "seconds": round(self.seconds, 3), "interrupted": self.interrupted, "counts": self.counts,
                "models": [asdict(r) for r in self.results]}
