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
from wsviz.models.registry import ModelSpec, create_model, get_spec, input_shape, list_models
from wsviz.models.taps import TapInfo, list_taps

__all__ = [
    "REUSE_KINDS", "ModelSpec", "ModelSummary", "ParamReuse", "ParamUse", "TapInfo", "applied_weights", "count_flops", "create_model", "reuse_report", "get_spec",
    "input_shape", "list_models", "list_taps", "sharing_report", "summarize",
]
