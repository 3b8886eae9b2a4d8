"""Penultimate features of any wsviz model and their 2-D (or n-D) projections.

:func:`penultimate_features` reads the model's ``embedding`` :class:`~wsviz.models.sharing.Tap`
(the vector the classifier head reads; :func:`embedded_layer` says which layer that is and what head
follows it: for the Rot-MNIST models it is the pooled features before a 64-unit hidden layer, not the
network's last hidden layer); :func:`project` maps it to a few dimensions with PCA, t-SNE
or UMAP on a seeded subsample, returning the row indices used so the caller can colour the
points by class, rotation angle or scale.

The helpers :func:`eval_mode`, :func:`model_inputs` and :func:`capture_outputs` are shared by
the other analyses (attribution, similarity): one way to put a model in eval mode and back,
to fit images to it, and to read named module outputs with hooks that never outlive the call.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsviz.data.datasets import fit_to
from wsviz.device import model_device
from wsviz.errors import WsvizError
from wsviz.models.hooks import this_thread
from wsviz.models.modes import eval_mode
from wsviz.models.registry import input_shape
from wsviz.models.taps import list_taps

log = logging.getLogger(__name__)

PROJECTIONS = ("pca", "tsne", "umap")


# ------------------------------------------------------------------------------ shared helpers
def model_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W), uint8 or float in [0, 1], fitted to the model's input shape."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise WsvizError(f"Expected a batch of images shaped (N, C, H, W), got {shape}; "
                         "add a batch dimension with images.unsqueeze(0) for a single image.")
    if len(images) == 0:
        raise WsvizError("No images given; pass at least one image.")
    c, h, _ = input_shape(model)  # a wsviz model's config, or what wsviz.adopt recorded
    return fit_to(images, c, h).float()  # wsviz models run in float32 (float64 input would not)


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size that is not a positive int (it bounds memory, so it must be sane)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise WsvizError(f"batch_size must be a positive whole number, got {batch_size!r}.")


def _tensor_of(output: object, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    inner = getattr(output, "tensor", None)  # e2cnn GeometricTensor
    if isinstance(inner, torch.Tensor):
        return inner
    raise WsvizError(f"Module {name!r} outputs {type(output).__name__}, not a tensor; pick a Tap "
                     "(wsviz.models.list_taps) or another module that outputs one tensor.")


def _input_batches(model: nn.Module, images, batch_size: int, workers: int = 0) -> Iterator[torch.Tensor]:
    """Model-ready batches of a tensor (fitted at once, as before) or of a dataset (read and fitted
    batch by batch: :func:`wsviz.data.stream.batches`)."""
    if isinstance(images, torch.Tensor):
        x_all = model_inputs(model, images)
        for start in range(0, len(x_all), batch_size):
            yield x_all[start:start + batch_size]
        return
    from wsviz.data.stream import batches, num_samples

    if num_samples(images) == 0:
        raise WsvizError("No images given; pass at least one image.")
    for b in batches(images, batch_size=batch_size, workers=workers):
        yield model_inputs(model, b.images)


def capture_outputs(model: nn.Module, images, names: Sequence[str], batch_size: int = 128, *,
                    workers: int = 0) -> dict[str, np.ndarray]:
    """Outputs of the modules at dotted paths ``names``, flattened per image: {name: (N, features)}.

    ``images``: a tensor (N, C, H, W) or a dataset (:func:`wsviz.data.stream.eval_data`, a
    ``Dataset``, an in-order DataLoader) read in batches; only the outputs are kept. Eval mode,
    no gradients, batches of ``batch_size``; the forward hooks are removed in a ``finally`` so an
    error leaves the model as it was. A module that runs more than once per forward pass (its
    output would be ambiguous) raises :class:`WsvizError`.
    """
    check_batch_size(batch_size)
    names = list(dict.fromkeys(names))
    if not names:
        raise WsvizError("No layers given; pass module paths such as the names from wsviz.models.list_taps(model).")
    modules = {}
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            taps = ", ".join(t.name for t in list_taps(model)) or "(this model has no taps)"
            raise WsvizError(f"Model has no module {name!r}. Its taps are: {taps}.") from None
    device = model_device(model)
    seen: dict[str, list[torch.Tensor]] = {}
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def hook_for(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            seen.setdefault(name, []).append(_tensor_of(output, name).detach())
        return hook

    handles = [m.register_forward_hook(this_thread(hook_for(name))) for name, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for x in _input_batches(model, images, batch_size, workers):
                seen.clear()
                model(x.to(device))
                for name in names:
                    outs = seen.get(name, [])
                    if len(outs) != 1:
                        raise WsvizError(
                            f"Module {name!r} ran {len(outs)} times in one forward pass, so its output is "
                            "ambiguous; pick a module that runs exactly once (a Tap from list_taps).")
                    out = outs[0]
                    chunks[name].append(out.reshape(out.shape[0], -1).float().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
    return {name: np.concatenate(parts, axis=0) for name, parts in chunks.items()}


# ------------------------------------------------------------------------------- embeddings
def embedding_tap(model: nn.Module) -> str:
    """Module path of the model's single ``embedding`` tap."""
    taps = list_taps(model, "embedding")
    if len(taps) != 1:
        raise WsvizError(f"Expected exactly one tap of kind 'embedding' in the model, found {len(taps)} "
                         f"({', '.join(t.name for t in taps) or 'none'}); for a model of your own, name the module whose "
                         "output the classifier reads: wsviz.adopt(model, input_shape, taps={PATH: 'embedding'}).")
    return taps[0].name


@dataclass(frozen=True)
class EmbeddedLayer:
    """What :func:`penultimate_features` reads: the ``embedding`` tap and the linear layers after it."""

    name: str  # module path of the tap
    label: str  # the tap's own label
    features: int  # values per image
    head: tuple[int, ...]  # output widths of the linear layers that run after the tap, in order (64, 10)

    def describe(self) -> str:
        """One sentence naming the layer exactly: for a head with a hidden layer (the Rot-MNIST CNN and the
        steerable models: pooled features -> 64 -> classes), it says the hidden layer is not what is embedded."""
        widths = "→".join(str(w) for w in (self.features, *self.head))
        where = f"the {self.features} values per image at the `{self.name}` tap"
        if len(self.head) > 1:
            hidden = " and ".join(f"{w}-unit" for w in self.head[:-1])
            return (f"Embedded: {where}, the input of the classifier head ({widths}): read before its "
                    f"{hidden} hidden layer, not that layer's output.")
        if self.head:
            return f"Embedded: {where}, the input of the final linear layer ({widths})."
        return f"Embedded: {where}."


@torch.no_grad()
def embedded_layer(model: nn.Module) -> EmbeddedLayer:
    """The layer :func:`penultimate_features` reads, traced on one blank image: the tap, its width and the
    widths of the linear layers that run after it (the classifier head)."""
    name = embedding_tap(model)
    label = next((t.label for t in list_taps(model, "embedding") if t.name == name), name)
    events: list[tuple[str, int]] = []
    tap = model.get_submodule(name)

    def on_tap(module: nn.Module, args: object, output: object) -> None:
        out = _tensor_of(output, name)
        events.append(("tap", int(out.reshape(out.shape[0], -1).shape[1])))

    def on_linear(module: nn.Module, args: object, output: object) -> None:
        events.append(("linear", int(module.out_features)))

    handles = [tap.register_forward_hook(this_thread(on_tap))]
    handles += [m.register_forward_hook(this_thread(on_linear)) for m in model.modules() if isinstance(m, nn.Linear)]
    c, s, _ = input_shape(model)
    try:
        with eval_mode(model):
            model(torch.zeros(1, c, s, s, device=model_device(model)))
    finally:
        for h in handles:
            h.remove()
    at = next((i for i, (kind, _) in enumerate(events) if kind == "tap"), None)
    if at is None:
        raise WsvizError(f"The embedding tap {name!r} did not run in a forward pass.")
    return EmbeddedLayer(name, label, events[at][1], tuple(w for kind, w in events[at + 1:] if kind == "linear"))


def penultimate_features(model: nn.Module, images, batch_size: int = 256, *, workers: int = 0) -> np.ndarray:
    """The feature vectors the classifier sees, (N, D) float32, read from the ``embedding`` tap.

    ``images``: a tensor or a dataset, read in batches (for a large dataset, embed a stated
    subset: ``eval_data(...).subset(sample_indices(len(data), k))``; the features are N x D).
    """
    name = embedding_tap(model)
    return capture_outputs(model, images, [name], batch_size, workers=workers)[name]


@dataclass
class Projection:
    """Low-dimensional coordinates of (a subsample of) the feature rows.

    ``index`` holds the feature rows that ``coords`` describe (sorted), so labels, angles or
    scales of those rows can be looked up as ``labels[index]``.
    """

    coords: np.ndarray  # (M, n_components)
    index: np.ndarray  # (M,) int64 row indices into the features
    method: str
    explained_variance: np.ndarray | None  # PCA: ratio of variance per component, descending


def project(features: np.ndarray, method: str = "pca", n_components: int = 2, max_points: int = 2000,
            seed: int = 0) -> Projection:
    """Project ``features`` (N, D) to ``n_components`` dimensions with PCA, t-SNE or UMAP.

    When N exceeds ``max_points`` a seeded random subsample is projected (t-SNE and UMAP are
    quadratic-ish and a plot of more points is unreadable anyway). Same seed, same result.
    """
    if method not in PROJECTIONS:
        raise WsvizError(f"Unknown projection {method!r}; choose one of {', '.join(PROJECTIONS)}.")
    x = np.asarray(features)
    if x.ndim != 2:
        raise WsvizError(f"Features must be a 2-D array (points, features), got shape {x.shape}.")
    if not isinstance(n_components, int) or n_components < 1:
        raise WsvizError(f"n_components must be a positive whole number, got {n_components!r}.")
    if not isinstance(max_points, int) or max_points < 3:
        raise WsvizError(f"max_points must be a whole number of at least 3, got {max_points!r}.")
    if not np.isfinite(x).all():
        raise WsvizError("The features contain NaN or infinite values (a diverged model?); cannot project them.")
    n = len(x)
    if n > max_points:
        index = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False)).astype(np.int64)
    else:
        index = np.arange(n, dtype=np.int64)
    m = len(index)
    if m < 3:
        raise WsvizError(f"Need at least 3 points to project, got {m}.")
    x = x[index].astype(np.float64)
    if method == "pca":
        if n_components > min(m, x.shape[1]):
            raise WsvizError(f"PCA can give at most min(points, features) = {min(m, x.shape[1])} components, "
                             f"asked for {n_components}.")
        from sklearn.decomposition import PCA

        pca = PCA(n_components=n_components, random_state=seed)
        coords = pca.fit_transform(x)
        return Projection(coords, index, method, pca.explained_variance_ratio_.copy())
    if n_components >= m:
        raise WsvizError(f"{method} needs fewer components ({n_components}) than points ({m}).")
    if method == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=n_components, perplexity=min(30.0, (m - 1) / 3), init="pca", random_state=seed,
                    method="barnes_hut" if n_components < 4 else "exact")
        coords = tsne.fit_transform(x)
    else:
        try:
            import umap
        except ImportError as exc:
            raise WsvizError("UMAP needs the package umap-learn: pip install 'wsviz[umap]' (or use method='pca' or "
                             "'tsne').") from exc

        reducer = umap.UMAP(n_components=n_components, n_neighbors=min(15, m - 1), random_state=seed)
        with warnings.catch_warnings():
            # "n_jobs value 1 overridden to 1 by setting random_state": expected, seeded runs are serial.
            warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
            coords = reducer.fit_transform(x)
    log.debug("projected %d of %d points with %s", m, n, method)
    return Projection(np.asarray(coords, dtype=np.float64), index, method, None)


@dataclass
class Alignment:
    """``other`` mapped onto ``reference`` by the best rotation/reflection and uniform scale."""

    coords: np.ndarray  # the aligned coordinates of ``other``
    disparity: float  # sum of squared differences after alignment, both sets standardised (0 = same shape)
    reflected: bool = False  # the best orthogonal map is a reflection (det -1), not a rotation

    def describe(self, reference: str) -> str:
        """What was done to draw ``other`` beside ``reference``, in a sentence for the page."""
        how = "Rotated, reflected and scaled" if self.reflected else "Rotated and scaled"
        return (f"{how} onto {reference}'s layout (orthogonal Procrustes); disparity {self.disparity:.3f} "
                "(0 = the same shape, 1 = unrelated).")


def align(reference: Projection, other: Projection) -> Alignment:
    """Orthogonal Procrustes alignment of two projections of the same points, so two variants'
    embeddings can be drawn side by side in one orientation (PCA axes and t-SNE/UMAP layouts are
    only defined up to rotation, reflection and scale). Both must describe the same rows."""
    from scipy.linalg import orthogonal_procrustes

    if not np.array_equal(reference.index, other.index):
        raise WsvizError("The two projections describe different points; project both with the same max_points "
                         "and seed so they can be aligned.")
    a = reference.coords - reference.coords.mean(0)
    b = other.coords - other.coords.mean(0)
    na, nb = np.linalg.norm(a) or 1.0, np.linalg.norm(b) or 1.0
    r, s = orthogonal_procrustes(b / nb, a / na)
    aligned = (b / nb) @ r * s
    disparity = float(((a / na - aligned) ** 2).sum())
    return Alignment(aligned * na + reference.coords.mean(0), disparity, bool(np.linalg.det(r) < 0))
