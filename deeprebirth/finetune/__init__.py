"""Fine-tuning a slimmed net against its original (``finetune_files``): the driver and its options
(``driver``), layer-wise step planning (``steps``), the losses in stock Caffe layers (``losses``), one phase in
pycaffe (``phase``), the budget (``budget``) and the plan as plain Caffe files (``export``)."""

from deeprebirth.finetune.driver import (
    MIMIC_TARGETS,
    MODES,
    SCHEDULES,
    FinetuneOptions,
    FinetuneResult,
    Progress,
    ProgressCallback,
    StepResult,
    Teacher,
    default_work_dir,
    finetune_files,
)
from deeprebirth.finetune.steps import Step, build_step_net, final_step, plan_steps

__all__ = ["MIMIC_TARGETS", "MODES", "SCHEDULES", "FinetuneOptions", "FinetuneResult", "Progress",
           "ProgressCallback", "Step", "StepResult", "Teacher", "build_step_net", "default_work_dir", "final_step",
           "finetune_files", "plan_steps"]
