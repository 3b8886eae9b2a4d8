"""The precomputed zoo table (wsviz/catalog.json) is the live registry's, and loads without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsviz.catalog import build_catalog, load_catalog
from wsviz.models import get_spec, list_models

ROOT = Path(__file__).resolve().parents[1]


def test_catalog_lists_every_registered_model():
    assert [r["name"] for r in load_catalog()] == list_models()


@pytest.mark.slow
def test_shipped_catalog_equals_a_live_count_and_reuse_accounts_for_every_model(monkeypatch):
    """Builds every registered model once (about 40 s) and checks two things on it:

    * the shipped catalog is the live count (if not, run `python -m wsviz.catalog`);
    * for every model the reuse report accounts for its effective parameters exactly, is
      non-empty whenever compression > 1, and names the family's mechanism (RepeatNet tiles,
      e2cnn expands a basis, the others apply one weight at several places).
    """
    from test_truthful_views import check_reuse_accounting

    import wsviz.analysis.zoo as zoo

    seen = []

    def recording(model, *a, **k):
        s = real(model, *a, **k)
        seen.append((model.wsviz_name, s))
        return s

    real = zoo.summarize
    monkeypatch.setattr(zoo, "summarize", recording)
    assert build_catalog() == load_catalog()
    assert [n for n, _ in seen] == list_models()
    mechanism = {"repeatnet": "tiled", "equivariant": "expanded"}
    for name, s in seen:
        check_reuse_accounting(s)
        family = get_spec(name).family
        reused = {k for r in s.reuse().values() if r.reused for k in r.kinds}
        if s.compression > 1 or reused:
            assert mechanism.get(family, "direct") in reused, (name, reused)


def test_first_page_needs_no_torch():
    """What app.py and the Models page import before the table is drawn must not pull in torch
    (seconds to import): the cold start depends on it."""
    code = ("import sys; sys.path.insert(0, '.'); import pages._shared, wsviz.catalog, wsviz.training.cards, "
            "wsviz.training.runstore; wsviz.catalog.load_catalog(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
