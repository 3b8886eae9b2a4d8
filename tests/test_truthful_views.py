"""Every view tells the truth: one notion of reuse, like-for-like kernel views, one resampling
operator, Grad-CAM that explains the whole model, fair comparisons within one test set.

Each test names what a researcher would be misled by if it broke.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsviz.analysis.attribution import attribute, cam_candidates, default_cam_layer
from wsviz.analysis.kernels import default_layers, kernel_layers, layer_weight
from wsviz.analysis.stats import fair_comparison, group_by_test_set, pairwise_significance
from wsviz.analysis.sweeps import layer_scale_invariance, scale_sweep
from wsviz.data.datasets import load_split
from wsviz.data.digits import DigitSplit, scale_protocol
from wsviz.data.resample import rescale, rotate
from wsviz.models import create_model, summarize
from wsviz.training.checkpoint import load_checkpoint
from wsviz.training.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints"
SHIPPED = sorted(p.name for p in CKPT.iterdir() if (p / "card.json").is_file())


def shipped(name: str):
    if name not in SHIPPED:
        pytest.skip(f"checkpoint {name} is not shipped")
    return load_checkpoint(CKPT / name)[0]


# ------------------------------------------------------------------ one notion of reuse
SMALL = {  # one small instance of every mechanism the families use
    "msws shared": ("msws_resnet_digits", {"sharing": "shared"}),
    "msws unshared": ("msws_resnet_digits", {"sharing": "unshared"}),
    "wsms": ("wsms_resnet_digits", {}),
    "shardnet S": ("shardnet_vgg", {"kind": "S", "width": 16}),
    "shardnet SL": ("shardnet_vgg", {"kind": "SL", "width": 16}),
    "shardnet E": ("shardnet_vgg", {"kind": "E", "width": 16}),
    "sharesnet": ("sharesnet_wrn_digits", {}),
    "repeat linear": ("repeatnet_rotmnist_cnn", {"mode": "linear", "match": "c4", "width": 0.25}),
    "repeat swish": ("repeatnet_rotmnist_cnn", {"mode": "swish", "match": "c4", "width": 0.25}),
    "repeat bireal": ("repeatnet_rotmnist_cnn", {"mode": "bireal", "match": "c4", "width": 0.25}),
    "steerable C4": ("steerable_rotmnist", {"N": 4, "width": 0.25}),
    "plain": ("resnet_digits", {}),
}


def check_reuse_accounting(s) -> None:
    """The reuse report accounts for every effective parameter, and a compressed model shares."""
    reuse = s.reuse()
    accounted = sum(r.applied for r in reuse.values()) + sum(math.prod(s.param_shapes[n]) for n in s.unused_params)
    assert accounted == s.effective_params
    assert sum(r.applied - r.numel for r in reuse.values()) == s.effective_params - s.unique_params
    if s.compression > 1:
        assert s.shared_params(), "compression > 1 but no weight is reported as reused"
    for r in reuse.values():
        assert r.applied == sum(u.applied for u in r.uses)
        assert set(r.kinds) <= {"direct", "tiled", "expanded", "derived", "modulates"}


@pytest.mark.parametrize("label", list(SMALL))
def test_reuse_report_accounts_for_effective_params(label):
    name, cfg = SMALL[label]
    s = summarize(create_model(name, **cfg))
    check_reuse_accounting(s)
    kinds = {k for r in s.reuse().values() if r.reused for k in r.kinds}
    expected = {"repeat linear": {"tiled"}, "repeat swish": {"tiled"},
                "repeat bireal": {"tiled"}, "steerable C4": {"expanded"},
                "msws unshared": set(), "shardnet E": set(), "plain": set()}.get(label, {"direct"})
    assert kinds == expected


def test_repeatnet_tiling_is_counted_against_the_realised_block():
    m = create_model("repeatnet_rotmnist_cnn", mode="swish", match="c8", width=0.25)
    reuse = summarize(m).reuse()
    convs = [(n, mod) for n, mod in m.named_modules() if hasattr(mod, "realised_weight") and mod.repeats]
    assert convs
    for name, mod in convs:
        r = reuse[f"{name}.weight"]
        realised = mod.realised_weight().numel()  # counted independently of the tracer
        assert r.kinds == ["tiled"] and r.applied == realised
        assert r.factor == pytest.approx(realised / mod.weight.numel())
        for p in ("alphas", "betas"):
            assert reuse[f"{name}.{p}"].kinds == ["modulates"] and reuse[f"{name}.{p}"].applied == 0
    bireal = create_model("repeatnet_rotmnist_cnn", mode="bireal", match="c8", width=0.25)
    rb = summarize(bireal).reuse()
    masks = [n for n in rb if n.endswith("sign_latent")]
    assert masks and all(rb[n].kinds == ["modulates"] for n in masks)  # the sign mask carries no weight


def test_e2cnn_basis_expansion_is_counted_against_the_expanded_filters():
    m = create_model("steerable_rotmnist", N=4, width=0.25)
    reuse = summarize(m).reuse()
    convs = [(n, mod) for n, mod in m.named_modules() if hasattr(mod, "expand_parameters")]
    assert len(convs) == 6
    m.train()
    for name, mod in convs:
        r = reuse[f"{name}.weights"]
        filt, _ = mod.expand_parameters()
        assert r.kinds == ["expanded"] and r.applied == filt.numel() and r.factor > 5


def test_sharing_map_picture_shows_which_layers_share_which_weight():
    from wsviz.figures import sharing_map_figure

    fig = sharing_map_figure(summarize(create_model("sharesnet_wrn_digits")))
    direct = next(t for t in fig.data if t.name == "direct")
    rows: dict[str, set] = {}
    for x, y in zip(direct.x, direct.y):
        rows.setdefault(y, set()).add(x)
    assert rows["stages.2.1.conv2.weight"] == {"stages.2.1.conv2", "stages.2.2.conv2"}
    rep = sharing_map_figure(summarize(create_model("repeatnet_rotmnist_cnn", mode="linear", match="c4", width=0.25)))
    tiled = next(t for t in rep.data if t.name == "tiled")
    assert all(re.fullmatch(r"×[0-9.]+", t) and float(t[1:]) > 1 for t in tiled.text)
    # msws applies each shared kernel at two rates in one place: one marker there, labelled ×2 (two
    # stacked unlabelled markers read "applied once", against the table's ×2)
    s = summarize(create_model("msws_resnet_digits"))
    msws = next(t for t in sharing_map_figure(s).data if t.name == "direct")
    points = list(zip(msws.x, msws.y))
    assert len(points) == len(set(points))
    for (site, param), label in zip(points, msws.text):
        times = sum(u.applied for u in s.reuse()[param].uses if (u.site or "(model)") == site) / s.reuse()[param].numel
        assert label == (f"×{times:.3g}" if abs(times - 1) > 1e-9 else "")
    assert "×2" in msws.text
    # and the table's words count places as places, rates as times
    shared = next(r for r in s.reuse().values() if r.reused)
    assert shared.describe().startswith("the same weight applied 2 times at 1 place (")
    sh = summarize(create_model("sharesnet_wrn_digits")).reuse()["stages.2.1.conv2.weight"]
    assert sh.describe() == "the same weight applied at 2 places"


# ------------------------------------------------------------------ like-for-like kernel views
PAIRS = [
    ("scale-msws-vanilla", "scale-msws-unshared", "scale-msws-shared"),
    ("scale-sharesnet-unshared", "scale-sharesnet"),
    ("scale-sharesnet", "scale-sharesnet-unshared"),
    ("scale-msnet-1x1", "scale-wsms-1x1"),
    ("scale-shardnet-E", "scale-shardnet-S"),
    ("scale-repeatnet-dense", "scale-repeatnet-linear", "scale-repeatnet-s", "scale-repeatnet-f"),
    ("rot-cnn", "rot-repeat-linear-c8", "rot-repeat-swish-c8", "rot-repeat-bireal-c8"),
]


@pytest.mark.parametrize("group", PAIRS, ids=lambda g: "+".join(g))
def test_default_kernel_layers_of_twins_are_the_same_place(group):
    models = {n: shipped(n) for n in group}
    layers = {n: kernel_layers(m) for n, m in models.items()}
    chosen = default_layers(layers)
    assert len(set(chosen.values())) == 1, chosen
    place = next(iter(chosen.values()))
    if any(k.shared for ls in layers.values() for k in ls if min(k.kernel) >= 3):
        assert any(k.name == place and k.shared for ls in layers.values() for k in ls), "shared layer not preferred"
    for n, m in models.items():  # what is drawn is that place's kernels, whole
        layer = next(k for k in layers[n] if k.name == place)
        assert tuple(layer_weight(m, place).shape) == layer.shape


def test_shardnet_sl_default_is_the_same_iteration_of_the_shared_conv():
    models = {n: shipped(n) for n in ("scale-shardnet-S", "scale-shardnet-SL", "scale-shardnet-E")}
    layers = {n: kernel_layers(m) for n, m in models.items()}
    chosen = default_layers(layers)
    # SL inserts 1x1 blending layers, so module paths shift; the place is the last 3x3 application
    for n, ls in layers.items():
        three = [k.name for k in ls if k.kernel == (3, 3)]
        assert chosen[n] == three[-1]


def test_kernel_menu_marks_shared_layers_with_their_use_count():
    ls = {k.name: k for k in kernel_layers(shipped("scale-sharesnet"))}
    assert ls["stages.2.2.conv2"].menu_label().endswith("shared ×2")
    assert "shared" not in ls["stages.2.2.conv1"].menu_label()
    rep = {k.name: k for k in kernel_layers(shipped("scale-repeatnet-linear"))}
    assert "tiled ×4" in rep["trunk.stages.3.1.conv2"].menu_label()
    assert "applied once" not in rep["trunk.stages.3.1.conv2"].describe()


def test_shared_colour_scale_keeps_magnitudes_comparable():
    from wsviz.figures import top_kernels_figure

    big, small = np.full((4, 3, 3), 2.0), np.full((4, 3, 3), 0.5)
    fig = top_kernels_figure({"a": big, "b": small}, scale="shared")
    assert {(t.zmin, t.zmax) for t in fig.data} == {(-2.0, 2.0)}
    assert np.nanmax(fig.data[1].z) == 0.5 and fig.data[-1].showscale
    per = top_kernels_figure({"a": big, "b": small}, scale="per_kernel")
    assert np.nanmax(per.data[1].z) == 1.0


# ------------------------------------------------------------------ one resampling operator
class Recorder(nn.Module):
    """Passes to a model and keeps every batch it is fed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []
        self.wsviz_config = getattr(model, "wsviz_config", {})
        self.wsviz_name = getattr(model, "wsviz_name", "")

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def test_scale_sweep_feeds_exactly_the_protocol_images_and_scores_the_same():
    te = load_split("mnist5k", "test").spread(300)
    model = shipped("scale-resnet20")
    factors = (0.3, 0.55, 1.0)
    rec = Recorder(model)
    res = scale_sweep({"m": rec}, te.images, te.labels, factors, batch_size=1000)
    assert len(rec.seen) == len(factors)
    for i, f in enumerate(factors):
        # the scale protocol's own transform, given this factor for every digit
        made = scale_protocol(DigitSplit(te.images, te.labels), seed=0)
        assert torch.equal(made.images, rescale(te.images, made.scales))  # the protocol is this operator
        protocol = rescale(te.images, torch.full((len(te.labels),), f))
        assert torch.equal(rec.seen[i], protocol), f"the sweep at {f} fed other images than the protocol makes"
        _, acc, _ = evaluate(model, protocol, te.labels)
        assert res.accuracy["m"][i] == pytest.approx(acc, abs=1e-12)


def test_one_module_resamples():
    """Scaling and rotating go through wsviz.data.resample alone: nothing else warps images."""
    offenders = []
    for path in list((ROOT / "wsviz").rglob("*.py")) + list((ROOT / "pages").glob("*.py")):
        text = path.read_text()
        if path.name != "resample.py" and re.search(r"\b(affine_grid|grid_sample)\(", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_rescale_identity_and_exact_factor():
    x = torch.rand(4, 2, 7, 7)
    assert torch.equal(rescale(x, 1.0), x) and torch.equal(rotate(x, 0.0), x) and torch.equal(rotate(x, 360.0), x)
    blob = torch.zeros(1, 1, 41, 41)
    blob[..., 10:31, 10:31] = 1.0  # 21 px wide, centred
    half = rescale(blob, 0.5)
    assert half.shape == blob.shape
    assert half[0, 0, 20].sum().item() == pytest.approx(10.5, abs=0.51)  # 21 * 0.5, not a rounded size
    with pytest.raises(Exception, match="positive"):
        rescale(x, 0.0)


def test_layer_invariance_resamples_feature_maps_at_the_exact_factor(monkeypatch):
    import wsviz.analysis.sweeps as sweeps

    calls = []
    real = sweeps.rescale

    def spy(t, f):
        out = real(t, f)
        calls.append((tuple(t.shape[-2:]), float(f), tuple(out.shape[-2:])))
        return out

    monkeypatch.setattr(sweeps, "rescale", spy)
    te = load_split("mnist5k", "test").spread(20)
    inv = layer_scale_invariance(shipped("scale-resnet20"), te.images, 0.5)
    assert calls[0][0] == (28, 28)  # the input, then one feature map per tap
    maps = calls[1:]
    assert len(maps) == len(inv.taps) and [c[0] for c in maps] == [(28, 28), (14, 14), (7, 7)]
    assert all(f == 0.5 and before == after for before, f, after in maps)


# ------------------------------------------------------------------ Grad-CAM that explains the model
@pytest.mark.parametrize("name", SHIPPED)
def test_default_grad_cam_runs_for_every_shipped_variant(name):
    model = shipped(name)
    x = load_split("mnist5k", "test").images[:2]
    res = attribute(model, x, "grad_cam")
    assert res.layer == default_cam_layer(model)
    assert res.maps.shape[0] == 2 and torch.isfinite(res.maps).all()


@pytest.mark.parametrize("name,cfg", [
    ("sl_resnet34", {"width": 16}), ("shardnet_vgg", {"kind": "S", "width": 16}),
    ("shardnet_vgg", {"kind": "SL", "width": 16}), ("wsms_resnet_digits", {"integration": "none"}),
    ("msws_alexnet", {"num_classes": 10, "input_size": 96}),
])
def test_default_grad_cam_runs_for_every_family(name, cfg):
    model = create_model(name, **cfg)
    c, s = model.wsviz_config["in_channels"], model.wsviz_config["input_size"]
    res = attribute(model, torch.rand(1, c, s, s), "grad_cam")
    assert torch.isfinite(res.maps).all()


def test_default_grad_cam_of_the_e2cnn_tutorial(c8_tutorial):
    res = attribute(c8_tutorial, torch.rand(1, 1, 29, 29), "grad_cam")
    assert res.layer == default_cam_layer(c8_tutorial) and torch.isfinite(res.maps).all()


def test_wsms_grad_cam_depends_on_every_stage():
    model = shipped("scale-wsms-1x1")
    layer = default_cam_layer(model)
    x = load_split("mnist5k", "test").images[:4]
    base = attribute(model, x, "grad_cam").maps

    def activation(m):
        out = {}
        h = m.get_submodule(layer).register_forward_hook(lambda mod, a, o: out.setdefault("a", o.detach()))
        with torch.no_grad():
            m.eval()(x)
        h.remove()
        return out["a"]

    a0 = activation(model)
    for s in range(len(model.branches)):
        bent = copy.deepcopy(model)
        bn = next(mod for mod in bent.branches[s].modules() if isinstance(mod, nn.BatchNorm2d))
        with torch.no_grad():
            bn.bias.add_(1.0)  # BatchNorm is never shared: this changes stage s alone
        assert not torch.allclose(activation(bent), a0), f"the Grad-CAM layer does not see stage {s + 1}"
        assert not torch.allclose(attribute(bent, x, "grad_cam").maps, base), f"the map ignores stage {s + 1}"


def test_grad_cam_layer_choice_and_clear_error():
    model = shipped("scale-wsms-1x1")
    names = [n for n, _, _ in cam_candidates(model)]
    assert names[-1] == "integrated" and "stage_taps.2" in names
    res = attribute(model, torch.rand(1, 1, 28, 28), "grad_cam", layer="stage_taps.2")
    assert res.layer == "stage_taps.2"
    with pytest.raises(Exception, match="choose from: .*integrated"):
        attribute(model, torch.rand(1, 1, 28, 28), "grad_cam", layer="nope")


def test_cli_grad_cam_layer_option(tmp_path, capsys):
    from wsviz.cli import main

    ck = str(CKPT / "scale-wsms-1x1")
    if "scale-wsms-1x1" not in SHIPPED:
        pytest.skip("checkpoint not shipped")
    assert main(["attribution", "--checkpoint", ck, "--method", "grad_cam", "--layer", "stage_taps.1",
                 "--out", str(tmp_path)]) == 0
    assert "stage_taps.1" in (tmp_path / "attribution.csv").read_text()
    assert main(["attribution", "--checkpoint", ck, "--method", "grad_cam", "--layer", "nope",
                 "--out", str(tmp_path)]) != 0
    assert "integrated" in capsys.readouterr().err


# ------------------------------------------------------------------ fair comparison within a test set
def test_fair_comparison_groups_by_test_set_and_says_what_it_skipped():
    names = ["rot-cnn", "scale-msws-shared", "rot-steerable-c8"]
    for n in names:
        shipped(n)
    rows = fair_comparison([CKPT / n for n in names])
    groups, skipped = group_by_test_set(rows)
    assert sorted((g.dataset, g.rows) for g in groups) == [("mnist5k-rot", (0, 2)), ("mnist5k-scale", (1,))]
    assert {(s.i, s.j) for s in skipped} == {(0, 1), (1, 2)}
    assert all("different test sets" in s.reason for s in skipped)
    pairs = pairwise_significance(rows)
    assert [(p.i, p.j) for p in pairs] == [(0, 2)]

    from wsviz.figures import fair_figure

    table = [{"name": r.name, "dataset": r.dataset, "accuracy": r.accuracy, "params": r.float_params,
              "flops": r.flops} for r in rows]
    fig = fair_figure(table)
    assert len(fig.data) == 2 and {tuple(t.text) for t in fig.data} == {("rot-cnn", "rot-steerable-c8"),
                                                                        ("scale-msws-shared",)}
    assert fig.data[0].xaxis != fig.data[1].xaxis  # separate panels, separate accuracy axes
    # the title says marker area ∝ FLOPs: plotly's area mode, the FLOPs themselves as sizes, one sizeref
    assert "marker area ∝ FLOPs" in fig.layout.title.text
    by_name = {r["name"]: r["flops"] for r in table}
    for t in fig.data:
        assert t.marker.sizemode == "area" and list(t.marker.size) == [by_name[n] for n in t.text]
    assert len({t.marker.sizeref for t in fig.data}) == 1
    assert fig.data[0].marker.sizeref == 2 * max(by_name.values()) / 40 ** 2  # the largest: 40 px across


def test_test_sets_with_one_name_but_other_labels_are_not_paired():
    from wsviz.analysis.stats import FairRow

    def row(name, labels):
        return FairRow(name, name, "m", "folder:x", 0, 0.5, None, "folder:x", True, 1, 1, 1,
                       np.zeros(len(labels), dtype=int), np.asarray(labels))

    rows = [row("a", [0, 1, 1]), row("b", [0, 1, 1]), row("c", [1, 1, 0])]
    groups, skipped = group_by_test_set(rows)
    assert [g.rows for g in groups] == [(0, 1), (2,)]
    assert len(skipped) == 2 and all("labels differ" in s.reason for s in skipped)
