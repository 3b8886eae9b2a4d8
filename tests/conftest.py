from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning, module="e2cnn")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def c8_tutorial():
    """e2cnn's tutorial model takes ~12 s to build (basis construction): build it once."""
    from wsviz.models import create_model

    return create_model("e2cnn_c8_tutorial")


def kill_active_runs(runs_dir: str | Path) -> None:
    """SIGKILL the process of every still-active run in the run store at ``runs_dir`` (test
    cleanup: no training a test started outlives it, whatever the test did)."""
    from wsviz.training.runstore import RunStore

    if not (Path(runs_dir) / "wsviz.db").exists():
        return
    for run in RunStore(runs_dir).list():
        if run.pid and run.active and run.pid != os.getpid():
            try:
                os.kill(run.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
