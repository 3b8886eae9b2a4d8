"""Plotly figures for the analysis results, shared by the app's pages and the CLI.

Every function takes a result from :mod:`wsviz.analysis` and returns a
``plotly.graph_objects.Figure``; nothing here computes an analysis or imports streamlit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

DIVERGING = "RdBu_r"


NARROW_PLOT_PX = 340  # a figure's panels' width (colour bar and margins off) on an 800 px page with the sidebar
# open, the narrowest the app lays out: panel titles are fitted to it


def _fit_chars(panels: int, font_px: float) -> int:
    """How many characters of a ``font_px`` font fit over one of ``panels`` panels side by side on a narrow page
    (a character is about 0.55 of the font size wide)."""
    return max(6, int(NARROW_PLOT_PX / max(1, panels) / (0.55 * font_px)))


def _wrap_path(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces; a word longer than a line (a
    module path) is broken after its dots, slashes, underscores or hyphens (a longer part stays whole)."""
    pieces: list[str] = []
    for word in text.split():
        if len(word) <= width:
            pieces.append(word + " ")
        else:
            pieces += re.findall(r"[^./_\-]*[./_\-]|[^./_\-]+", word)
            pieces[-1] += " "
    lines: list[str] = []
    for piece in pieces:
        if lines and len((lines[-1] + piece).rstrip()) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return [line.strip() for line in lines if line.strip()]


def panel_title(head: str, small: Sequence[str] = (), panels: int = 1, font_px: float = 12) -> str:
    """A subplot title that fits over its panel when ``panels`` panels share a narrow page: ``head`` on its own
    line(s), each of ``small`` in small type below, every line wrapped at spaces or module-path dots."""
    lines = _wrap_path(head, _fit_chars(panels, font_px))
    tiny = [line for t in small if t for line in _wrap_path(t, _fit_chars(panels, 0.7 * font_px))]
    return "<br>".join(lines) + "".join(f"<br><sup>{t}</sup>" for t in tiny)


def title_parts(title: str) -> tuple[str, str]:
    """A subplot title's main text and its small type, each unwrapped to one line: the inverse of
    :func:`panel_title` (lines broken inside a module path join without a space), for reading titles back."""
    head: list[str] = []
    small: list[str] = []
    for line in title.split("<br>"):
        into = small if line.startswith("<sup>") else head
        text = re.sub(r"</?sup>", "", line)
        if into and not into[-1].endswith((".", "/", "_", "-")):
            text = " " + text
        into.append(text)
    return "".join(head), "".join(small)


def title_lines(title: str) -> int:
    """How many lines a subplot title made by :func:`panel_title` has."""
    return title.count("<br>") + 1


def _title_on_top(fig: go.Figure, title: str, panel_title_px: int, height: int) -> go.Figure:
    """Give ``fig`` the figure ``title`` pinned to the top, above its panels' titles (which grow upwards from
    their panels by ``panel_title_px``), with a top margin that holds both, and the figure ``height``."""
    title_px = _top_margin(title, 0) - 14
    fig.update_layout(title=dict(text=title, yref="container", y=1 - (6 + title_px / 2) / height,
                                 yanchor="middle"), height=height,
                      margin=dict(l=10, r=10, t=_top_margin(title, panel_title_px), b=10))
    return fig


def _top_margin(title: str, panel_title_px: int) -> int:
    """The top margin that holds a figure's ``title`` and, below it, its panels' titles."""
    return (28 if title else 0) + 14 * title.count("<br>") + panel_title_px + 14


KERNEL_SCALES = ("shared", "per_kernel")


def kernel_mosaic(kernels: np.ndarray, cols: int = 16, gap: int = 1, per_kernel: bool = True) -> np.ndarray:
    """Tile (k, h, w) kernels into one image separated by NaN gaps (drawn blank).

    ``per_kernel``: each kernel scaled to [-1, 1] by its own max |w| (its pattern only);
    otherwise the weights are kept as they are, so magnitudes compare across kernels.
    """
    k, h, w = kernels.shape
    cols = max(1, min(cols, k))
    rows = math.ceil(k / cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for i, ker in enumerate(kernels):
        r, c = divmod(i, cols)
        m = (np.abs(ker).max() or 1.0) if per_kernel else 1.0
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = ker / m
    return out


def top_kernels_figure(panels: dict[str, np.ndarray], cols: int | None = None, title: str = "",
                       width: int = 1100, scale: str = "shared") -> go.Figure:
    """Side-by-side mosaics of top-k kernels, one panel per model (Aich et al. Fig. 3/4).

    ``scale="shared"``: one diverging colour scale, centred at 0 and spanning the largest |w| of
    all panels, with a colour bar in weight units — magnitudes compare across kernels and
    models. ``scale="per_kernel"``: each kernel stretched to its own max |w| (patterns only).
    Mosaics are near-square (``cols`` defaults to ceil(sqrt(k))) and the figure's height follows
    their aspect ratio at a page ``width`` in pixels, so the kernels fill their panels. A panel
    named "variant · layer" is titled with the variant and, in small type below, the layer, both
    wrapped to fit over the panel on a narrow page.
    """
    if scale not in KERNEL_SCALES:
        raise ValueError(f"scale must be one of {KERNEL_SCALES}, got {scale!r}")
    per_kernel = scale == "per_kernel"
    names = list(panels)
    k, h, w = next(iter(panels.values())).shape
    cols = cols or math.ceil(math.sqrt(k))
    vmax = 1.0 if per_kernel else float(max(np.abs(p).max() for p in panels.values()) or 1.0)
    font = 13 if len(names) <= 2 else 11
    titles = [panel_title(n.partition(" · ")[0], [n.partition(" · ")[2]], len(names), font) for n in names]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles, horizontal_spacing=0.03)
    fig.update_annotations(font_size=font)
    aspect = 1.0
    bar = dict(title="w / max|w| of its kernel" if per_kernel else "weight", thickness=12)
    for j, name in enumerate(names, start=1):
        mosaic = kernel_mosaic(panels[name], cols, per_kernel=per_kernel)
        aspect = max(aspect if j > 1 else 0.0, mosaic.shape[0] / mosaic.shape[1])  # the tallest panel fits
        fig.add_trace(go.Heatmap(z=mosaic, colorscale=DIVERGING, zmin=-vmax, zmax=vmax, zmid=0,
                                 showscale=j == len(names), colorbar=bar,
                                 hovertemplate="%{z:.3g}<extra>" + name + "</extra>"), 1, j)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{j if j > 1 else ''}", constrain="domain",
                         showticklabels=False, showgrid=False, zeroline=False, row=1, col=j)
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain", row=1, col=j)
    panel = (width - 120) / len(names)
    top = 15 * max(title_lines(t) for t in titles)  # the panels' titles, wrapped
    fig.update_layout(plot_bgcolor="rgba(0,0,0,0)")
    _title_on_top(fig, title, top, int(min(900, max(220, panel * aspect + top + 60))))
    return fig


REUSE_COLOURS = {"direct": "#0072B2", "tiled": "#E69F00", "expanded": "#009E73", "derived": "#CC79A7"}


def sharing_map_figure(summary, max_params: int = 80) -> go.Figure:
    """Which layers apply which stored weight: one row per reused parameter, one column per
    place in forward order, a marker at every use (colour = kind of reuse, label = how many
    times each stored element is applied there). A row with several markers is a weight
    shared between layers; one marker labelled ×k is a weight tiled or expanded k-fold."""
    everything = [r for r in summary.reuse().values() if r.reused]
    reuse = everything[:max_params]
    shown = set(u.site or "(model)" for r in reuse for u in r.uses if u.applied)
    # columns in the order the network applies them (the trace's order), not parameter by parameter
    order = [x for x in getattr(summary, "sites", []) if x in shown]
    sites = order + sorted(shown - set(order))
    fig = go.Figure()
    for kind, colour in REUSE_COLOURS.items():
        xs, ys, texts, hover = [], [], [], []
        for r in reuse:
            at: dict[str, list] = {}  # one marker per place: a weight applied there several times (msws's
            for u in r.uses:          # rates) is one marker labelled with the total, not stacked markers
                if u.kind == kind and u.applied:
                    at.setdefault(u.site or "(model)", []).append(u)
            for site, us in at.items():
                xs.append(site)
                ys.append(r.param)
                f = sum(u.applied for u in us) / max(r.numel, 1)
                texts.append(f"×{f:.3g}" if abs(f - 1) > 1e-9 else "")
                hover.append(f"{r.param} ({'x'.join(map(str, r.shape))})<br>at {site}"
                             + "".join(f"<br>{u.op} {u.detail}, applied as {'x'.join(map(str, u.applied_shape))}"
                                       for u in us) + f"<br>{kind}" + (f", {len(us)} times here" if len(us) > 1
                                                                      else ""))
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", name=kind, text=texts,
                                     textposition="middle right", textfont=dict(size=10),
                                     marker=dict(size=11, color=colour, symbol="square"),
                                     hovertext=hover, hoverinfo="text"))
    rows = max(1, len(reuse))
    fig.update_layout(
        title="Sharing map: stored weights (rows) applied at layers (columns)"
              + (f" — the first {len(reuse)} of {len(everything)}, all in the table" if len(everything) > len(reuse)
                 else ""),
        height=int(min(1400, 190 + 22 * rows)), margin=dict(l=10, r=10, t=95, b=10), showlegend=True,
        # the legend on its own line between the title and the plot, left: at the right it ran into a
        # long title on a narrow page
        legend=dict(title="reuse", orientation="h", y=1.0, yanchor="bottom", x=0, xanchor="left"))
    fig.update_xaxes(categoryorder="array", categoryarray=sites, tickangle=-60, tickfont=dict(size=9),
                     title="layer (forward order)")
    fig.update_yaxes(categoryorder="array", categoryarray=[r.param for r in reuse][::-1], tickfont=dict(size=9),
                     title="stored weight")
    return fig


def blending_figure(marks: Sequence[np.ndarray], titles: Sequence[str] | None = None,
                    weights: Sequence[np.ndarray] | None = None, n: int | None = None) -> go.Figure:
    """ShaRDNet Fig. 4: per layer, inputs on x, outputs on y; the ``n`` lowest |w| of each row blue,
    the ``n`` highest red. A legend (colour bar) says which is which; hovering shows the weight."""
    count = len(marks)
    titles = list(titles or [f"blending layer {i + 1}" for i in range(count)])
    fig = make_subplots(rows=1, cols=count, subplot_titles=titles, horizontal_spacing=0.05)
    scale = [[0, "#2166ac"], [0.33, "#2166ac"], [0.33, "#f7f7f7"], [0.67, "#f7f7f7"], [0.67, "#b2182b"],
             [1, "#b2182b"]]
    k = f"{n} " if n else ""
    bar = dict(tickvals=[-0.67, 0, 0.67], ticktext=[f"lowest {k}|w|", "other", f"highest {k}|w|"], thickness=12,
               title="per output row")
    for j, m in enumerate(marks, start=1):
        w = None if weights is None else weights[j - 1]
        fig.add_trace(go.Heatmap(z=m, customdata=w, colorscale=scale, zmin=-1, zmax=1, showscale=j == count,
                                 colorbar=bar,
                                 hovertemplate="in %{x}, out %{y}" + (": w = %{customdata:.3g}" if w is not None
                                                                      else "") + "<extra></extra>"), 1, j)
        fig.update_yaxes(autorange="reversed", title_text="output channel" if j == 1 else None, nticks=5,
                         row=1, col=j)
        fig.update_xaxes(title_text="input channel", nticks=5, tickangle=0, row=1, col=j)
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def pruning_figure(fractions: np.ndarray, accuracy: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Scatter(x=100 * np.asarray(fractions), y=100 * np.asarray(accuracy), mode="lines+markers"))
    fig.update_layout(xaxis_title="blending weights pruned by magnitude (%)", yaxis_title="test accuracy (%)",
                      title="Accuracy vs pruned blending weights (no retraining)", height=360)
    return fig


def sweep_figure(result, metric: str = "accuracy", title: str | None = None) -> go.Figure:
    """Accuracy (or agreement) vs scale/angle, one line per model."""
    data = getattr(result, metric)
    fig = go.Figure()
    n = int(getattr(result, "samples", 0) or 0)
    for name, ys in data.items():
        ys = np.asarray(ys, dtype=float)
        bars = None
        if metric == "accuracy" and n > 0 and np.isfinite(ys).all():
            lo, hi = wilson_bounds(ys, n)  # each point's 95% interval over the n images (the same at every value)
            bars = dict(type="data", symmetric=False, array=100 * (hi - ys), arrayminus=100 * (ys - lo), thickness=1)
        fig.add_trace(go.Scatter(x=result.values, y=100 * ys, mode="lines+markers", name=name, error_y=bars))
    unit = " (degrees)" if result.parameter == "angle" else " (factor)"
    fig.update_layout(xaxis_title=result.parameter + unit, yaxis_title=f"{metric} (%)", height=400,
                      title=title or f"{metric.capitalize()} vs {result.parameter}", legend_title="model")
    return fig


def wilson_bounds(accuracy, n: int, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of each accuracy's Wilson score interval over ``n`` images (:func:`wsviz.analysis.stats.wilson_ci`)."""
    from wsviz.analysis.stats import wilson_ci

    cis = [wilson_ci(np.arange(n) < round(a * n), alpha) for a in np.asarray(accuracy, dtype=float)]
    return np.array([c[1] for c in cis]), np.array([c[2] for c in cis])


def invariance_figure(per_model: dict[str, object]) -> go.Figure:
    """Per-layer scale-invariance error, one bar group per model."""
    fig = go.Figure()
    for name, inv in per_model.items():
        fig.add_trace(go.Bar(x=inv.labels, y=inv.error, name=name))
    fig.update_layout(barmode="group", yaxis_title="||g(Tx) - T g(x)|| / ||T g(x)||, g = f - f(blank)", height=380,
                      title="How far each layer is from commuting with rescaling (0 = commutes: equivariant to scale)")
    return fig


def stability_figure(st) -> go.Figure:
    """One image under rotation/scaling: confidence of the predicted class, coloured by class."""
    fig = go.Figure(go.Scatter(x=st.values, y=st.confidence, mode="markers+lines+text", text=[str(p) for p in st.predicted],
                               textposition="top center", marker=dict(color=st.predicted, colorscale="Turbo", size=10)))
    fig.update_layout(xaxis_title=st.parameter, yaxis_title="confidence of predicted class", yaxis_range=[0, 1.08],
                      height=340, title="Predicted class (labels) and its probability")
    return fig


def feature_map_range(*map_lists) -> tuple[float, float]:
    """(min, max) of the channel-mean maps over every list of taps given: pass it to each
    ``feature_maps_figure`` that is to be compared, so one colour means one value in all of them."""
    means = [f.mean_activation() for maps in map_lists for f in maps]
    return (float(min((float(m.min()) for m in means), default=0.0)),
            float(max((float(m.max()) for m in means), default=1.0)))


def _tap_title(label: str, name: str | None, panels: int = 1, font_px: float = 11) -> str:
    """A tap's panel title: its label's head ("rate 1") on the first line, where it is taken ("(conv,
    pre-BN)") and its module path in small type below, wrapped to fit over one of ``panels`` panels
    side by side on a narrow page."""
    head, sep, where = label.partition(" (")
    return panel_title(head, [f"({where}" if sep else "", name or ""], panels, font_px)


def feature_maps_figure(maps, cols: int = 6, title: str = "", layer_names: bool = True,
                        zrange: tuple[float, float] | None = None) -> go.Figure:
    """Channel-mean activation of each tap, one small heatmap per tap, titled by its layer (module
    path) and label, on one colour scale for all panels with a colour bar, so panels compare.

    ``zrange``: the (min, max) the scale spans, ``feature_map_range`` of several figures so they
    compare with each other too; default this figure's own. When the minimum is below 0 (signed
    maps) the scale is diverging (RdBu_r), symmetric about 0 so zero is white; else Viridis.
    """
    n = len(maps)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols) if n else 1
    means = [f.mean_activation().numpy() for f in maps]
    lo, hi = zrange if zrange is not None else feature_map_range(maps)
    signed = lo < 0
    if signed:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    colours = dict(colorscale=DIVERGING, zmid=0) if signed else dict(colorscale="Viridis")
    # what every panel has in common is said once, under the figure's title: where the taps are taken
    # ("conv, pre-BN)") and the start of their module paths, so the panels' titles stay short
    wheres = {f.label.partition(" (")[2] for f in maps}
    where = next(iter(wheres)) if n > 1 and len(wheres) == 1 else ""
    paths = [f.name.split(".") for f in maps] if layer_names else []
    common = 0
    while (n > 1 and paths and all(len(p) > common + 1 for p in paths)
           and len({p[common] for p in paths}) == 1):
        common += 1
    prefix = ".".join(paths[0][:common]) + "." if common else ""
    said = ([f"every panel ({where}"] if where else []) + ([f"module paths under {prefix[:-1]}"] if prefix else [])
    if said:
        title = (title + "<br>" if title else "") + f"<sup>{'; '.join(said)}</sup>"
    titles = [_tap_title(f.label.partition(" (")[0] if where else f.label,
                         f.name[len(prefix):] if layer_names else None, cols) for f in maps]
    title_px = 8 + 12 * max((title_lines(t) for t in titles), default=1)  # a row's titles, wrapped
    height = max(280, (170 + title_px) * rows + 60)
    plot_px = height - _top_margin(title, title_px) - 10
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.02,
                        vertical_spacing=min(0.3, title_px / plot_px) if rows > 1 else 0.1)
    for i, (f, z) in enumerate(zip(maps, means)):
        r, c = divmod(i, cols)
        fig.add_trace(go.Heatmap(z=z, **colours, zmin=lo, zmax=hi, showscale=i == 0,
                                 colorbar=dict(title="mean activation", thickness=12),
                                 hovertemplate="%{z:.3g}<extra>" + f.name + "</extra>"), r + 1, c + 1)
        fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=f"x{i + 1 if i else ''}",
                         row=r + 1, col=c + 1)
        fig.update_xaxes(showticklabels=False, row=r + 1, col=c + 1)
    fig.update_annotations(font_size=11)
    _title_on_top(fig, title, title_px, height)
    return fig


SIGNED_METHODS = ("integrated_gradients",)


ATTRIBUTION_SCALES = ("per_panel", "shared")


def _panel_short(name: str) -> str:
    """A panel's model: the part of its name before " → " (the class explained), if any."""
    return name.split(" → ")[0]


def attribution_figure(image: np.ndarray | dict[str, np.ndarray], maps: dict[str, np.ndarray], title: str = "",
                       signed: bool = False, opacity: float = 0.0, scale: str = "per_panel",
                       notes: dict[str, str] | None = None) -> go.Figure:
    """Each map beside (and with ``opacity`` > 0, over) the input it explains, each titled with its maximum.

    ``image``: the (H, W) input every map explains, or {map name: its own input} when the models
    were given different inputs (their own size, or their training set's layout of one upload: a
    digit model and a Fashion-MNIST model read one upload differently). Each distinct input is
    drawn once, titled "input" (or "input of" the models reading it, a model being a map name's
    part before " → "), followed by the maps that explain it; a map is only ever drawn over its
    own input.

    ``scale="per_panel"`` (default): each map drawn on its own scale, from 0 to its own maximum
    (|max| for signed maps), with one colour bar in fractions of each panel's maximum and the
    value itself on hover. Saliency and Grad-CAM magnitudes follow each model's logit scale, so
    on one scale a model with small logits looks blank. ``scale="shared"``: one scale, in
    attribution units, for all maps. ``signed`` (Integrated Gradients): a diverging scale
    centred at zero, so zero is the same neutral colour in every panel. Otherwise (Saliency,
    Grad-CAM, never negative) a sequential scale from white at zero. ``opacity`` > 0 draws each
    map over its input (in grey) with that opacity, so it can be read against the digit or photo.
    ``notes``: {map name: a line added under its title} (Integrated Gradients' completeness error).
    """
    if scale not in ATTRIBUTION_SCALES:
        raise ValueError(f"scale must be one of {ATTRIBUTION_SCALES}, got {scale!r}")
    if isinstance(image, dict):
        missing = [n for n in maps if n not in image]
        if missing:
            raise ValueError(f"no input image for the map(s) {missing}")
        own = {n: np.asarray(image[n], dtype=float) for n in maps}
    else:
        own = {n: np.asarray(image, dtype=float) for n in maps}
    groups: list[tuple[np.ndarray, list[str]]] = []  # each distinct input, with the maps explaining it
    for n, img in own.items():
        g = next((g for g in groups if g[0].shape == img.shape and np.array_equal(g[0], img, equal_nan=True)), None)
        if g is None:
            groups.append((img, [n]))
        else:
            g[1].append(n)
    if not groups:  # no maps: the input alone
        groups.append((np.asarray(image, dtype=float) if not isinstance(image, dict) else np.zeros((1, 1)), []))
    per_panel = scale == "per_panel"
    peaks = {name: float(np.nanmax(np.abs(z) if signed else z)) if np.size(z) and not np.isnan(z).all() else 0.0
             for name, z in maps.items()}
    shared = max(peaks.values(), default=1.0) or 1.0
    mark = "max |a|" if signed else "max"
    panels: list[tuple[str | None, np.ndarray]] = []  # (map name, or None for an input panel; its input)
    titles = []
    for img, names in groups:
        panels.append((None, img))
        titles.append("input" if len(groups) == 1 else
                      ("input of " + ", ".join(dict.fromkeys(_panel_short(n) for n in names)), []))
        for n in names:
            panels.append((n, img))
            note = (notes or {}).get(n)
            titles.append((n, [f"{mark} {peaks[n]:.3g}", note or ""]))
    font = 10 if len(titles) > 3 else 13
    titles = [t if isinstance(t, str) else panel_title(t[0], t[1], len(titles), font) for t in titles]
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.02)
    colours = DIVERGING if signed else [[0, "rgba(255,255,255,0)"], [0.25, "#fde0c5"], [0.6, "#f07b52"],
                                        [1, "#7a0403"]]
    bar = dict(title="÷ its panel's max" if per_panel else "attribution", thickness=12)
    alpha = 1.0 if opacity <= 0 else float(opacity)
    last_map = max((j for j, (n, _) in enumerate(panels, start=1) if n is not None), default=0)
    for j, (name, img) in enumerate(panels, start=1):
        if name is None or opacity > 0:
            fig.add_trace(go.Heatmap(z=img, colorscale="gray", showscale=False, hoverinfo="skip"), 1, j)
        if name is not None:
            z = np.asarray(maps[name], dtype=float)
            vmax = (peaks[name] or 1.0) if per_panel else shared
            shown = z / vmax if per_panel else z
            top = 1.0 if per_panel else vmax
            fig.add_trace(go.Heatmap(z=shown, customdata=z, colorscale=colours, zmin=-top if signed else 0, zmax=top,
                                     zmid=0 if signed else None, opacity=alpha, showscale=j == last_map,
                                     colorbar=bar,
                                     hovertemplate="%{customdata:.3g}"
                                                   + (" (%{z:.0%} of this panel's max)" if per_panel else "")
                                                   + "<extra>" + name + "</extra>"), 1, j)
        fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=f"x{j if j > 1 else ''}",
                         row=1, col=j)
        fig.update_xaxes(showticklabels=False, row=1, col=j)
    # a narrow page (800 px with the sidebar open) gives four panels ~100 px each: smaller titles, wrapped to
    # fit, the scale note on a line of its own, so neighbours' names and notes do not run into each other
    fig.update_annotations(font_size=font)
    top = 6 + 12 * max(title_lines(t) for t in titles)
    _title_on_top(fig, title + ("<br><sup>each map on its own scale</sup>" if per_panel and len(maps) > 1 else ""),
                  top, 330 + top)
    return fig


CLASS_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
                 "#999999", "#882255")  # Okabe-Ito's eight, then grey and wine: colour-blind safe for 10 classes
CLASS_SYMBOLS = ("circle", "square", "diamond", "cross", "x", "triangle-up", "triangle-down", "star", "pentagon",
                 "hexagon")  # with the ten colours: 100 classes (CIFAR-100) each drawn differently
CYCLIC = ("angle",)


def embedding_figure(coords: np.ndarray, color: Sequence, color_name: str = "class", title: str = "") -> go.Figure:
    """A 2-D embedding coloured by class (colour-blind-safe palette), angle (a cyclic scale: 0° and
    360° look the same) or scale (a sequential one)."""
    color = list(color)
    discrete = color_name == "class"
    if discrete:
        order = sorted({str(c) for c in color}, key=lambda v: (len(v), v))
        fig = px.scatter(x=coords[:, 0], y=coords[:, 1], color=[str(c) for c in color],
                         category_orders={"color": order}, color_discrete_sequence=list(CLASS_COLOURS),
                         labels={"x": "dim 1", "y": "dim 2", "color": color_name}, title=title)
        if len(order) > len(CLASS_COLOURS):  # colours alone would repeat: every class its own colour and shape
            for i, trace in enumerate(fig.data):  # one trace per class, in ``order``, coloured i mod 10
                trace.marker.symbol = CLASS_SYMBOLS[(i // len(CLASS_COLOURS)) % len(CLASS_SYMBOLS)]
            pairs = len(CLASS_COLOURS) * len(CLASS_SYMBOLS)
            fig.update_layout(title=f"{title} ({len(order)} classes: each a colour and a marker shape"
                                    + (f"; they repeat after {pairs})" if len(order) > pairs else ")"))
    else:
        cyclic = color_name in CYCLIC
        fig = px.scatter(x=coords[:, 0], y=coords[:, 1], color=color,
                         labels={"x": "dim 1", "y": "dim 2", "color": color_name + (" (°)" if cyclic else "")},
                         title=title, range_color=(0, 360) if cyclic else None,
                         color_continuous_scale=px.colors.cyclical.Twilight if cyclic else "Viridis")
    fig.update_traces(marker=dict(size=5, opacity=0.8))
    fig.update_layout(height=480)
    return fig


def cka_figure(matrix: np.ndarray, labels_a: Sequence[str], labels_b: Sequence[str], name_a: str = "A",
               name_b: str = "B") -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix, x=list(labels_b), y=list(labels_a), zmin=0, zmax=1, colorscale="Magma",
                               hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title=name_b, yaxis_title=name_a, title="Linear CKA between layers", height=420)
    return fig


FAIR_MARKER, MIN_MARKER = 40, 5  # px across: the model with the most FLOPs, and the least any is drawn


def fair_figure(rows: Sequence[dict], x: str = "params") -> go.Figure:
    """Accuracy vs parameters (or FLOPs), marker size ~ FLOPs; the fair-comparison picture.

    Rows evaluated on different test sets (their ``test_set`` key, else ``dataset``) go into
    separate panels, each with its own accuracy axis: accuracies on different test sets are
    not comparable and are never drawn on one axis.
    """
    groups = list(dict.fromkeys(r.get("test_set", r.get("dataset", "")) for r in rows)) or [""]
    fig = make_subplots(rows=1, cols=len(groups), subplot_titles=[f"test set: {g}" for g in groups] if len(groups) > 1
                        else None, horizontal_spacing=0.08)
    flops_all = np.array([r["flops"] or 0 for r in rows], dtype=float)
    fmax = flops_all.max() if len(rows) else 0
    # marker AREA proportional to FLOPs (plotly's area mode), the largest 40 px across, one sizeref for
    # every panel so areas compare across them; a model too small to see is drawn at MIN_MARKER px
    sizeref = 2.0 * fmax / FAIR_MARKER ** 2 if fmax > 0 else 1.0
    for c, g in enumerate(groups, start=1):
        sub = [r for r in rows if r.get("test_set", r.get("dataset", "")) == g]
        flops = np.array([r["flops"] or 0 for r in sub], dtype=float)
        marker = dict(size=flops, sizemode="area", sizeref=sizeref, sizemin=MIN_MARKER, opacity=0.7) if fmax > 0 \
            else dict(size=12, opacity=0.7)
        fig.add_trace(go.Scatter(
            x=[r[x] for r in sub], y=[100 * r["accuracy"] for r in sub], mode="markers+text", name=str(g),
            text=[r["name"] for r in sub], textposition="top center", marker=marker, customdata=flops,
            hovertemplate="%{text}<br>%{x:,}<br>acc %{y:.2f}%<br>%{customdata:,.0f} FLOPs<extra>" + str(g)
                          + "</extra>"), 1, c)
        fig.update_xaxes(title=x.replace("_", " "), type="log", row=1, col=c)
        fig.update_yaxes(title="test accuracy (%)" if c == 1 else None, row=1, col=c)
    title = "Accuracy vs " + x.replace("_", " ") + " (marker area ∝ FLOPs)"
    if len(groups) > 1:
        title += ": one panel per test set"
    fig.update_layout(title=title, height=460, showlegend=False)
    return fig


def stage_similarity_figure(sims, kind: str = "output_cka") -> go.Figure:
    """One heatmap per stage and conv role: ``kind`` ("output_cka" or "weight_similarity") between its
    same-shape convolutions, on one colour scale (0..1 for CKA, -1..1 for the kernels' cosine). The CKA
    is of the convolutions' own outputs (what their hooks see), before any BatchNorm."""
    cols = min(3, len(sims)) or 1
    rows = -(-len(sims) // cols) or 1
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{s.stage} · {s.role}" if s.role else s.stage
                                                              for s in sims],
                        horizontal_spacing=0.12, vertical_spacing=0.18)
    lo = 0.0 if kind == "output_cka" else -1.0
    for i, s in enumerate(sims):
        # the block index: the path's last number ("stages.2.1.conv2" -> "1"; a flat "features.16" -> "16")
        labels = [next((p for p in reversed(n.split(".")) if p.isdigit()), n) for n in s.layers]
        fig.add_trace(go.Heatmap(z=getattr(s, kind), x=labels, y=labels, zmin=lo, zmax=1, colorscale="Viridis",
                                 coloraxis="coloraxis", customdata=[[f"{a} vs {b}" for b in s.layers] for a in s.layers],
                                 hovertemplate="%{customdata}: %{z:.3f}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(type="category")  # block indices: "1", "2" would otherwise get ticks at 1.5, 2.5
    fig.update_yaxes(type="category")
    title = ("Linear CKA of the convolutions' outputs (before BatchNorm) between blocks" if kind == "output_cka"
             else "Kernel cosine similarity between blocks")
    flat = any(not s.role for s in sims)
    fig.update_layout(title=title + (" (axes: block index, or the layer's index in its container)" if flat
                                     else " (axes: block index)"), height=260 * rows + 80,
                      coloraxis=dict(colorscale="Viridis", cmin=lo, cmax=1, colorbar=dict(title=kind)))
    return fig


def opportunities_figure(rows: Sequence[dict]) -> go.Figure:
    """Parameters saved vs predicted cost, one point per candidate group (hover: the group and its scores)."""
    fig = go.Figure(go.Scatter(
        x=[r["params_saved"] for r in rows], y=[r["predicted_cost"] for r in rows], mode="markers",
        marker=dict(size=11, color=[r.get("measured_drop") or 0 for r in rows], colorscale="Reds",
                    colorbar=dict(title="drop now (pts)"), line=dict(width=1, color="black")),
        text=[r["group"] for r in rows],
        hovertemplate="%{text}<br>saves %{x:,} parameters<br>predicted cost %{y:.2f}<extra></extra>"))
    fig.update_layout(title="Parameters saved vs predicted cost (0 = cheapest-looking group, 1 = costliest)",
                      xaxis_title="parameters saved", yaxis_title="predicted cost (rank-combined)", height=420)
    return fig
