"""Fine-tuning a slimmed net against its original (``finetune_files``): the run (``driver``), its options,
progress and results (``options``), what its phases share and the original as reference (``context``), resume
(``state``), one phase's nets and losses (``spec``), layer-wise step planning (``steps``), the losses in stock
Caffe layers (``losses``), one phase in pycaffe (``phase``), the budget (``budget``) and the plan as plain Caffe
files (``export``)."""

from deeprebirth.finetune.context import Teacher
from deeprebirth.finetune.driver import finetune_files
from deeprebirth.finetune.options import (
    MIMIC_TARGETS,
    MODES,
    SCHEDULES,
    FinetuneOptions,
    FinetuneResult,
    Progress,
    ProgressCallback,
    StepResult,
    default_work_dir,
)
from deeprebirth.finetune.steps import Step, build_step_net, final_step, plan_steps

__all__ = ["MIMIC_TARGETS", "MODES", "SCHEDULES", "FinetuneOptions", "FinetuneResult", "Progress",
           "ProgressCallback", "Step", "StepResult", "Teacher", "build_step_net", "default_work_dir", "final_step",
           "finetune_files", "plan_steps"]
