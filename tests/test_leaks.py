"""Repeated analyses leave nothing behind: no Python memory, tensor, module or hook per call.

Each call's leftovers are measured directly (see ``conftest.measure_growth``), and the bound is
tied to one call's working set: all the measured calls together may keep less than one call
allocates at its peak, and not one more tensor, module or hook.
"""

from __future__ import annotations

import pytest
import torch
from conftest import measure_growth

from wsviz.analysis.attribution import attribute
from wsviz.analysis.features import feature_maps
from wsviz.data.datasets import load_split
from wsviz.models import create_model


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    x = load_split("mnist5k", "test").images[:4]
    return create_model("msws_resnet_digits").eval(), x


@pytest.mark.parametrize("what", ["feature_maps", "integrated_gradients", "grad_cam"])
def test_repeated_analyses_leave_nothing_behind(model_and_images, what):
    model, x = model_and_images
    calls = {
        "feature_maps": lambda: feature_maps(model, x[0]),
        "integrated_gradients": lambda: attribute(model, x[:2], "integrated_gradients", ig_steps=4),
        "grad_cam": lambda: attribute(model, x[:2], "grad_cam"),
    }
    growth = measure_growth(calls[what], model=model)
    growth.check()
    assert growth.hooks[1] == 0  # and none was left from the warm-up either
