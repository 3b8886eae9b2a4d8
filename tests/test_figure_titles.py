"""Panel titles fit over their panels on the narrowest page the app lays out (800 px with the sidebar open, a
figure about 470 px wide, some 380 px of it panels beside the colour bar), stay out of the figure's title, and
still say everything: the kernels' layer, each feature map's full module path and where it was taken."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from wsviz.analysis.features import FeatureMap
from wsviz.figures import attribution_figure, feature_maps_figure, top_kernels_figure

PANELS_PX = 380  # the panels' share of an 800 px page's figure
CHAR = 0.55  # a character's width in its font's size, on average (lower case, digits, dots)
SUP = 0.7  # plotly's <sup> is set at about 70% of the title's size


def lines(title: str) -> list[tuple[str, bool]]:
    """(text, small) for each line of a subplot title."""
    out = []
    for part in title.split("<br>"):
        small = part.startswith("<sup>")
        out.append((re.sub(r"</?sup>", "", part), small))
    return out


def annotations(fig) -> list[dict]:
    return [a for a in fig.to_plotly_json()["layout"]["annotations"]]


def assert_fits(fig, panels: int):
    for a in annotations(fig):
        font = a["font"]["size"] if a.get("font", {}).get("size") else 16
        for text, small in lines(a["text"]):
            width = len(text) * CHAR * font * (SUP if small else 1.0)
            unbreakable = not re.search(r"[ ./_\-]", text.strip())
            assert width <= PANELS_PX / panels or unbreakable, (
                f"{text!r} ({width:.0f} px at {font * (SUP if small else 1):.1f} px) runs over its panel "
                f"({PANELS_PX / panels:.0f} px)")


def top_margin_holds_titles(fig):
    spec = fig.to_plotly_json()["layout"]
    panel_lines = max(len(lines(a["text"])) for a in spec["annotations"])
    title = spec.get("title", {}).get("text", "") or ""
    title_lines = title.count("<br>") + 1 if title else 0
    assert spec["margin"]["t"] >= 11 * panel_lines + 20 * title_lines, (spec["margin"]["t"], panel_lines, title_lines)


NAMES = ["scale-msws-vanilla", "scale-msws-shared", "scale-msws-unshared"]


@pytest.mark.parametrize("count", [2, 3])
def test_kernel_panels_say_variant_and_layer_and_fit_an_800px_page(count):
    rng = np.random.default_rng(0)
    panels = {f"{v} · trunk.stages.2.1.conv2": rng.normal(size=(16, 3, 3)) for v in NAMES[:count]}
    fig = top_kernels_figure(panels, title="Top-16 different kernels")
    assert_fits(fig, count)
    top_margin_holds_titles(fig)
    for a, v in zip(annotations(fig), NAMES):
        text = [t for t, _ in lines(a["text"])]
        small = "".join(t for t, s in lines(a["text"]) if s)
        assert "".join(t for t, s in lines(a["text"]) if not s) == v  # the variant, whole (wrapped at most)
        assert small == "trunk.stages.2.1.conv2", text  # and the layer, in small type


def taps(where: str = "conv, pre-BN") -> list[FeatureMap]:
    return [FeatureMap(f"trunk.stages.{s}.{b}.conv2.taps.{r}", "rate", f"rate {r + 1} ({where})",
                       torch.randn(4, 7, 7)) for s in range(3) for b in range(2) for r in range(2)]


def test_feature_map_panels_fit_and_together_with_the_figure_title_give_every_full_path():
    maps = taps()
    fig = feature_maps_figure(maps, title="msws-shared: channel-mean of each rate output")
    assert_fits(fig, 6)
    top_margin_holds_titles(fig)
    title = fig.layout.title.text
    said = re.search(r"<sup>(.*)</sup>", title).group(1)
    assert "every panel (conv, pre-BN)" in said  # where the taps are taken, said once for all
    prefix = re.search(r"module paths under (\S+)", said).group(1) + "."
    for a, f in zip(annotations(fig), maps):
        parts = lines(a["text"])
        assert parts[0][0] == f.label.partition(" (")[0]  # "rate 1"
        assert prefix + "".join(t for t, s in parts[1:]) == f.name  # the full module path, nothing lost


def test_feature_map_panels_keep_what_differs_between_them():
    maps = taps()[:2]
    maps[1].label = "rate 2 (block output)"
    maps[1].name = "head.pool"
    fig = feature_maps_figure(maps, title="t")
    assert "every panel" not in fig.layout.title.text and "module paths" not in fig.layout.title.text
    texts = ["".join(t for t, _ in lines(a["text"])) for a in annotations(fig)]
    assert "(conv, pre-BN)" in texts[0] and "(block output)" in texts[1]
    assert texts[0].endswith("trunk.stages.0.0.conv2.taps.0") and texts[1].endswith("head.pool")


def test_attribution_panels_with_notes_fit_an_800px_page():
    rng = np.random.default_rng(1)
    maps = {f"{v} → 0": rng.random((28, 28)) for v in NAMES}
    notes = {n: "sum off f(x) − f(black) by 0.8% (128 steps)" for n in maps}
    fig = attribution_figure(np.zeros((28, 28)), maps, "integrated gradients for the predicted class",
                             signed=True, notes=notes)
    assert_fits(fig, 4)
    top_margin_holds_titles(fig)
    for a, n in zip(annotations(fig)[1:], maps):
        assert "".join(t for t, s in lines(a["text"]) if not s).replace(" ", "") == n.replace(" ", "")
