"""The wsviz model package: five weight-sharing families, their baselines, and accounting."""

from wsviz.models.accounting import ModelSummary, ParamUse, count_flops, sharing_report, summarize
from wsviz.models.registry import ModelSpec, create_model, get_spec, input_shape, list_models
from wsviz.models.taps import TapInfo, list_taps

__all__ = [
    "ModelSpec", "ModelSummary", "ParamUse", "TapInfo", "count_flops", "create_model", "get_spec",
    "input_shape", "list_models", "list_taps", "sharing_report", "summarize",
]
