"""The rules, in the order the driver tries them. Adding a rule: one module, one test file, one line here."""

from __future__ import annotations

from deeprebirth.rules import (
    decompose_conv_tucker,
    eliminate_dropout,
    fuse_batchnorm_into_conv,
    fuse_scale_into_conv,
    merge_inception_branches,
    merge_lrn_into_conv,
    merge_pooling_into_branch_convs,
    merge_pooling_into_conv,
    merge_pooling_into_widened_branch_convs,
)
from deeprebirth.rules.base import (
    RULE_OPTIONS,
    Change,
    Match,
    Option,
    Rule,
    RuleConfig,
    Skip,
)

RULES: tuple[Rule, ...] = (
    eliminate_dropout.RULE,
    fuse_batchnorm_into_conv.RULE,
    fuse_scale_into_conv.RULE,
    merge_pooling_into_conv.RULE,
    merge_pooling_into_branch_convs.RULE,
    merge_pooling_into_widened_branch_convs.RULE,
    merge_lrn_into_conv.RULE,
    merge_inception_branches.RULE,
    decompose_conv_tucker.RULE,  # opt-in (group "tucker"): not part of "all"
)

# short names for tables (finetune's "merged" column); "final" is the closing whole-net phase
RULE_LABELS = {"merge_pooling_into_conv": "pool", "merge_lrn_into_conv": "lrn", "merge_inception_branches": "branches",
               "decompose_conv_tucker": "tucker", "final": "-"}

__all__ = ["RULES", "RULE_LABELS", "RULE_OPTIONS", "Change", "Match", "Option", "Rule", "RuleConfig", "Skip"]
