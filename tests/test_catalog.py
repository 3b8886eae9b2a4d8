"""The precomputed zoo table (wsviz/catalog.json) is the live registry's, and loads without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsviz.catalog import build_catalog, load_catalog, load_sharing_map
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
    maps: dict = {}
    assert build_catalog(maps=maps) == load_catalog()
    for name, _ in seen:  # the app draws each architecture's sharing map from the file
        assert load_sharing_map(name).to_dict() == maps[name], f"sharing_maps.json is stale for {name}"
    assert [n for n, _ in seen] == list_models()
    mechanism = {"repeatnet": "tiled", "equivariant": "expanded"}
    for name, s in seen:
        check_reuse_accounting(s)
        family = get_spec(name).family
        reused = {k for r in s.reuse().values() if r.reused for k in r.kinds}
        if s.compression > 1 or reused:
            assert mechanism.get(family, "direct") in reused, (name, reused)


def torch_modules_after(code: str) -> str:
    """Run ``code`` in a fresh interpreter in the checkout; its printed line, which ends with the
    torch modules it imported (``[]`` when none)."""
    probe = ("import sys; sys.path.insert(0, '.'); " + code + "; "
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_first_page_needs_no_torch():
    """What app.py and the Models page import before the table is drawn must not pull in torch
    (seconds to import): the cold start depends on it."""
    assert torch_modules_after("import pages._shared, wsviz.catalog, wsviz.training.cards, wsviz.training.runstore; "
                               "wsviz.catalog.load_catalog()") == "[]"


def test_sharing_map_of_an_architecture_needs_no_torch():
    """The Models page draws a registered architecture's sharing map from the precomputed file, at
    once: reading and drawing it must not import torch (seconds) or build the model."""
    assert torch_modules_after("import wsviz.catalog, wsviz.figures; "
                               "s = wsviz.catalog.load_sharing_map('wsms_resnet152'); "
                               "wsviz.figures.sharing_map_figure(s); print(len(s.reused) > 0, end=' ')") == "True []"
