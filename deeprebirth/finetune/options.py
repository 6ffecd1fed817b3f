"""Fine-tuning's options, its progress events and its results, and the checks and default paths that follow
from the options alone (no net, no data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deeprebirth.caffe.data import PathLike, Transform
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune.budget import Budget
from deeprebirth.finetune.train import SOLVER_TYPES, SolverOptions

MODES = ("label", "mimic")
DEFAULT_TEMPERATURE = 4.0  # of the distillation loss, in both modes (docs/decisions/temperature.md)
DEFAULT_BATCH = 32  # the largest batch the pace rule picks, and the batch of iteration budgets and exports
SCHEDULES = ("whole", "layerwise")
MIMIC_TARGETS = ("local", "next", "logits")
LOSS_CHOICES = ("auto", "kd", "regression")  # auto: KD at --temperature, or the search's pick where far off
HINT_CHOICES = ("auto", "on", "off")  # ``finetune.hints``; auto: on where updates are few (``driver.resolve_auto``)
REFIT_CHOICES = HINT_CHOICES  # ``finetune.refit``; auto: where updates are fewest (``driver.resolve_refit``)
BLEND_CHOICES = ("off", "on")  # ``finetune.mixup``: asked for, never automatic (docs/decisions/blends.md)


def setting(default: Any, kind: type, help: str, **declaration: Any) -> Any:
    """A FinetuneOptions field that is also a ``finetune`` flag: its declaration (``deeprebirth.option.Option``'s
    type, help, choices, bounds) sits in the field's metadata, so the field is the one place a new setting is made;
    ``finetune.settings`` builds the flags from these."""
    return field(default=default, metadata={"option": {"type": kind, "help": help, **declaration}})


@dataclass
class FinetuneOptions:
    mode: str = setting("label", str, "label: the labels and the original's soft outputs; mimic: the original's "
                        "outputs only (no labels)", choices=MODES)
    schedule: str = setting("whole", str, "whole: distil the whole slim net at once; layerwise: the paper's steps, "
                            "one merge at a time, then the whole net", choices=SCHEDULES)
    mimic_at: str = setting("logits", str, "layer-wise steps in mimic mode: the merged blob, the next merge's blob, "
                            "or the net's output", choices=MIMIC_TARGETS)
    budget: str = "10m"  # time (90s, 10m, 1.5h), solver iterations (3000it) or epochs (5ep) for the whole run
    kd_weight: float = setting(0.5, float, "label mode: share of the distillation loss (the labels get the rest)",
                               minimum=0, maximum=1)
    temperature: float = setting(DEFAULT_TEMPERATURE, float, "softmax temperature of the distillation loss",
                                 minimum=0, open_bounds="min")
    loss: str = setting("auto", str, "what matches the original's logits: distillation at --temperature, "
                        "regression on the logits, or auto: KD, and where the slim net starts far off (agreement "
                        "< 50%) the better of KD at --temperature, KD at T=1 (when that is not 1) and regression, "
                        "probed on held-out data", choices=LOSS_CHOICES)
    hints: str = setting("auto", str, "whole-net phase: also match up to 4 blobs of the original between the merges "
                         "and the logits (cuts: block outputs) by relative squared error, beside the logits; auto: "
                         "on where the budget buys fewer than 400 updates of 32 (docs/decisions/hints.md)",
                         choices=HINT_CHOICES)
    refit: str = setting("auto", str, "before the whole-net phase, refit each layer downstream of a merge by least "
                         "squares onto the original's blob of the same name, on a sample of training images (kept "
                         "only if the held-out outputs come closer; with --freeze-rest only the new layers); auto: with "
                         "--schedule whole, where the budget buys fewer than 400 updates of 16 (the batch then comes "
                         "down to 8; docs/decisions/refit.md)", choices=REFIT_CHOICES)
    batch: int | None = None  # None: from the budget and the measured pace (``driver.choose_batch``)
    solver: SolverOptions = field(default_factory=lambda: SolverOptions(solver="sgd", lr=None))  # lr None: search
    new_lr_mult: float = setting(10.0, float, "layer-wise steps: learning-rate multiplier of the step's new layers")
    freeze_rest: bool = setting(False, bool, "only the new layers learn (the rest stays bit-identical)", switch=True)
    dropout: str = setting("auto", str, "train with the original's Dropout layers, which the rewrite removed (the "
                           "written net has none); auto: in label mode, where the labels' cross-entropy memorises a "
                           "small training set (the original's soft targets in mimic mode do not); off for an "
                           "original that was not trained with them", choices=HINT_CHOICES)
    mixup: str = setting("off", str, "mimic mode: half of each training batch blends two training images, the "
                         "original's outputs on each blend the target; over many passes the slim net comes closer to "
                         "the original's outputs, its own mistakes included (docs/decisions/blends.md)",
                         choices=BLEND_CHOICES)
    resume: bool = setting(False, bool, "continue an interrupted run without redoing finished phases", switch=True)
    transform: Transform = field(default_factory=lambda: Transform(mirror=True))  # training preprocessing
    val: PathLike | None = None  # held-out data; default: ``holdout`` of --data
    holdout: float = setting(0.1, float, "fraction of --data held out when --val is not given (raised for small "
                             "data towards 200 images, at most a quarter)", minimum=0, maximum=1, open_bounds="max")
    val_limit: int | None = setting(2000, int, "held-out images per evaluation", minimum=1)
    seed: int = setting(0, int, "seed for the data order, the held-out split and new weights")
    patience: int = 3  # stop a phase when this many held-out checkpoints in a row are worse beyond the noise (0: never)
    max_steps: int | None = setting(None, int, "stop after this many phases (continue with --resume)", minimum=1)
    cache_mb: float = setting(1024.0, float, "memory for decoded images (half) and the original's outputs on them "
                              "and on held-out images")
    work_dir: PathLike | None = None  # default: <out without suffix>.finetune next to --out
    report: PathLike | None = None  # default: <out without suffix>.finetune.json
    gpu: int | None = None  # run pycaffe on this GPU (a CUDA build of Caffe)
    shuffle: bool = True  # False: every phase reads the training images in their order (as an unshuffled LMDB)
    cache_teacher: bool = True  # False: the original runs inside the train net at every iteration (the old way;
    # benchmarks/finetune_speed.py's baseline)
    teacher_process: bool = True  # the cached original's new views run ahead in a second process where a core is
    # spare (``teacher_process``); False: in this one (the same numbers, later: benchmarks/finetune_speed.py)


@dataclass
class StepResult:
    index: int
    name: str
    rules: list[str]
    relearn: list[str]
    reproduces: str
    target: str  # what the loss looked at: "labels+kd", "kd", "local", "next:<blob>"
    learned: int  # layers that learned
    frozen: int  # layers with lr_mult 0 (the frozen teacher not counted)
    iterations: int
    best_iteration: int  # the kept checkpoint (0: the starting weights)
    stopped_early: bool
    lr: float
    lr_search: dict[str, float]  # candidate rate -> held-out loss after a short run
    solver: str
    loss_start: float  # mean of the first tenth of the iterations
    loss_end: float  # mean of the last tenth
    accuracy_before: float | None  # held-out top-1 of the net with steps 1..k merged, before / after this step
    accuracy_after: float | None
    error_before: float | None  # held-out relative squared error at the step's blob
    error_after: float | None
    output_error_before: float | None  # ... at the net's logits
    output_error_after: float | None
    agreement_before: float | None  # held-out top-1 agreement with the original
    agreement_after: float | None
    seconds: float
    checkpoints: list[dict[str, float]] = field(default_factory=list)  # held-out metrics during the phase
    loss: str = ""  # what matched the original's outputs: "KD T=4", "KD T=1" or "logit regression"
    backoffs: list[str] = field(default_factory=list)  # restarts from the start when nothing improved on it
    search: str = ""  # how the rate was chosen, in words
    images_per_second: float = 0.0  # training images per second of solver steps
    teacher_reuse: float | None = None  # share of the original's training outputs served from memory
    refit: list[dict[str, Any]] | None = None  # the least-squares start's rounds (``RefitResult.to_json``)
    dropout: list[str] = field(default_factory=list)  # the original's Dropout layers it trained with


@dataclass
class Progress:
    """One thing that happened; ``event`` is "baseline", "step", "refit" (layer ``name``, the ``iteration``-th of
    ``iterations``), "search", "iteration", "evaluate", "finished" or "skipped" (a step finished by an earlier run,
    with ``resume``)."""

    event: str
    step: int = 0
    steps: int = 0
    name: str = ""
    iteration: int = 0
    iterations: int = 0
    loss: float | None = None
    result: StepResult | None = None
    seconds_left: float | None = None  # of the whole run's time budget
    lr: float | None = None  # "search": the candidate rate, with its held-out ``loss``
    solver: str | None = None  # "search": the candidate's solver
    metrics: dict[str, float] | None = None  # "evaluate"


ProgressCallback = Callable[[Progress], None]


@dataclass
class FinetuneResult:
    mode: str
    schedule: str
    budget: str
    steps: list[StepResult]
    planned: list[str]  # every phase's name, in order
    complete: bool  # False when stopped by ``max_steps``
    resumed: int  # phases taken over from an earlier run
    held_out: int  # held-out images per evaluation
    original_accuracy: float | None
    slim_accuracy: float | None  # the slim net as rewritten, before fine-tuning
    final_accuracy: float | None  # the slim net after fine-tuning (None until complete)
    out: str | None
    report: str | None
    work_dir: str
    seconds: float  # this run's wall time
    batch: int = DEFAULT_BATCH
    batch_rule: str = ""  # why this batch size
    views_rule: str = ""  # how many crops per image the training views draw from, and why ("": no random crop)
    note: str = ""  # why nothing was trained, where nothing was
    change_error: float | None = None  # standard error of final - original held-out top-1, paired over the images
    labels_ignored: bool = False  # the original only guesses on the held-out labels (placeholders): no top-1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_options(options: FinetuneOptions) -> Budget:
    if options.mode not in MODES:
        raise DeepRebirthError(f"unknown mode {options.mode!r} ({', '.join(MODES)})")
    if options.schedule not in SCHEDULES:
        raise DeepRebirthError(f"unknown schedule {options.schedule!r} ({', '.join(SCHEDULES)})")
    if options.mimic_at not in MIMIC_TARGETS:
        raise DeepRebirthError(f"unknown mimic target {options.mimic_at!r} ({', '.join(MIMIC_TARGETS)})")
    if options.loss not in LOSS_CHOICES:
        raise DeepRebirthError(f"unknown loss {options.loss!r} ({', '.join(LOSS_CHOICES)})")
    for name, value in (("hints", options.hints), ("refit", options.refit), ("dropout", options.dropout)):
        if value not in HINT_CHOICES:
            raise DeepRebirthError(f"unknown {name} setting {value!r} ({', '.join(HINT_CHOICES)})")
    if options.refit == "on" and options.schedule != "whole":
        raise DeepRebirthError("--refit on starts the whole schedule; with --schedule layerwise the paper's steps are "
                               "the start (use --refit auto or off)")
    if options.mixup not in BLEND_CHOICES:
        raise DeepRebirthError(f"unknown mixup setting {options.mixup!r} ({', '.join(BLEND_CHOICES)})")
    if options.mixup == "on" and options.mode != "mimic":
        raise DeepRebirthError("--mixup on needs --mode mimic: a blend of two photos has no label")
    if options.batch is not None and options.batch < 1:
        raise DeepRebirthError("the batch size must be at least 1")
    if not 0.0 <= options.kd_weight <= 1.0:
        raise DeepRebirthError(f"the distillation weight must be in [0, 1], got {options.kd_weight}")
    if options.temperature <= 0:
        raise DeepRebirthError(f"the temperature must be positive, got {options.temperature}")
    if options.solver.solver not in SOLVER_TYPES:
        raise DeepRebirthError(f"unknown solver {options.solver.solver!r} (known: {', '.join(SOLVER_TYPES)})")
    return Budget.parse(options.budget)


def default_report(out: PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".finetune.json")


def default_work_dir(out: PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".finetune")


def options_json(options: FinetuneOptions) -> dict[str, Any]:
    payload = asdict(options)
    for key in ("val", "work_dir", "report"):
        payload[key] = None if payload[key] is None else str(payload[key])
    return payload
