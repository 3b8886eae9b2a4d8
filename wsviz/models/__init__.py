"""The wsviz model package: five weight-sharing families, their baselines, and accounting."""

from wsviz.models.accounting import (
    REUSE_KINDS,
    ModelSummary,
    ParamReuse,
    ParamUse,
    applied_weights,
    count_flops,
    reuse_report,
    sharing_report,
    summarize,
)
from wsviz.models.adopt import Adoption, adopt
from wsviz.models.registry import (
    ModelSpec,
    create_model,
    families,
    get_spec,
    input_shape,
    list_models,
    num_classes,
)
from wsviz.models.taps import TapInfo, list_taps

__all__ = [
    "REUSE_KINDS", "Adoption", "ModelSpec", "ModelSummary", "ParamReuse", "ParamUse", "TapInfo", "adopt",
    "applied_weights", "count_flops", "create_model", "families", "get_spec", "input_shape", "list_models",
    "list_taps", "num_classes", "reuse_report", "sharing_report", "summarize",
]
