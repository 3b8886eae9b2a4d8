from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning, module="e2cnn")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def c8_tutorial():
    """e2cnn's tutorial model takes ~12 s to build (basis construction): build it once."""
    from wsviz.models import create_model

    return create_model("e2cnn_c8_tutorial")
