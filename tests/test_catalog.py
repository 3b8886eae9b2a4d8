"""The precomputed zoo table (wsviz/catalog.json) is the live registry's, and loads without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsviz.catalog import build_catalog, load_catalog
from wsviz.models import list_models

ROOT = Path(__file__).resolve().parents[1]


def test_catalog_lists_every_registered_model():
    assert [r["name"] for r in load_catalog()] == [s.name for s in list_models()]


@pytest.mark.slow
def test_shipped_catalog_equals_a_live_count():
    """Builds every model (about 40 s): if this fails, run `python -m wsviz.catalog`."""
    assert build_catalog() == load_catalog()


def test_first_page_needs_no_torch():
    """What app.py and the Models page import before the table is drawn must not pull in torch
    (seconds to import): the cold start depends on it."""
    code = ("import sys; sys.path.insert(0, '.'); import pages._shared, wsviz.catalog, wsviz.training.cards, "
            "wsviz.training.runstore; wsviz.catalog.load_catalog(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
