"""What every page shares: the chosen variants, cached model loading, errors, downloads.

Pages stay thin: they ask ``wsviz.analysis`` for data and draw it with ``wsviz.figures``.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pandas as pd
import streamlit as st

from wsviz.errors import WsvizError

# Streamlit picks its legacy multipage mode for the first request of a fresh server when a
# folder called pages/ sits next to the entry script, and then runs a page URL such as /scale
# without app.py (no sidebar, no st.navigation). Hand control back to app.py's navigation.
try:
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()
except ImportError:  # pragma: no cover - a Streamlit without this internal
    pass

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = Path(os.environ.get("WSVIZ_CHECKPOINTS", ROOT / "checkpoints"))
RUNS = Path(os.environ.get("WSVIZ_RUNS", ROOT / "runs"))


@st.cache_data(ttl=5, show_spinner=False)
def scan_checkpoints() -> tuple[dict[str, str], dict[str, str], str | None]:
    """({label: checkpoint folder}, {label: why it cannot be used}, what is wrong with the run store or None)
    for shipped checkpoints and finished runs.

    Reads only cards and the weights' headers (no torch): a folder without its two files, an
    unreadable card, a pickle under the weights' name or a truncated file is refused here, with
    the reason, never silently left out. A damaged run store is moved aside and rebuilt; one that
    cannot be opened leaves the finished runs listed from their folders.
    """
    from wsviz.training.cards import check_weights, read_card
    from wsviz.training.runstore import finished_runs

    candidates: dict[str, Path] = {}
    refused: dict[str, str] = {}
    if CHECKPOINTS.is_dir():
        for d in sorted(CHECKPOINTS.iterdir()):
            if d.is_dir() and not d.name.startswith((".", "_")) and not d.name.endswith(".tensorboard"):
                candidates[d.name] = d
    view = finished_runs(RUNS)
    for name, run_id, folder in view.done:
        # A cancelled run's finished epochs are a usable variant (its card says how many).
        suffix = ", cancelled" if run_id in view.cancelled else ""
        candidates[f"run:{name} ({run_id[-6:]}{suffix})"] = folder
    found: dict[str, str] = {}
    for label, d in candidates.items():
        try:
            read_card(d)
            check_weights(d)
        except WsvizError as exc:
            refused[label] = str(exc)
        else:
            found[label] = str(d)
    return found, refused, view.problem


# Checkpoints that could not be loaded: {folder: (files' stamp, reason)}. Kept for the process
# (like load_variant's cache), so a bad checkpoint is reported once and then listed as refused;
# a checkpoint that is fixed (its files change) is tried again.
_LOAD_FAILURES: dict[str, tuple[tuple, str]] = {}


def _stamp(path: str) -> tuple | None:
    from wsviz.training.cards import CARD, WEIGHTS

    try:
        c, w = (Path(path) / CARD).stat(), (Path(path) / WEIGHTS).stat()
    except OSError:
        return None
    return c.st_mtime_ns, c.st_size, w.st_mtime_ns, w.st_size


def _failed(path: str) -> str | None:
    record = _LOAD_FAILURES.get(path)
    return record[1] if record is not None and record[0] == _stamp(path) else None


def available_variants() -> dict[str, str]:
    """{label: checkpoint folder} of the checkpoints that can be used."""
    return {label: path for label, path in scan_checkpoints()[0].items() if _failed(path) is None}


available_variants.clear = scan_checkpoints.clear  # the Train page refreshes the list when a run ends


def refused_checkpoints() -> dict[str, str]:
    """{label: reason} of the checkpoints found that cannot be used."""
    found, refused, _ = scan_checkpoints()
    failed = {label: _failed(path) for label, path in found.items()}
    return {**refused, **{label: why for label, why in failed.items() if why is not None}}


def run_store_notice() -> None:
    """One message in the sidebar when the run store is damaged or cannot be written, with what to do,
    and a button that rebuilds the run list from the run folders."""
    problem = scan_checkpoints()[2]
    if problem is None:
        return
    st.warning(plain(problem), icon=":material/database:")
    if st.button("Rebuild the run list from the run folders", key="rebuild-runs"):
        from wsviz.training.runstore import RunStore

        try:
            report = RunStore(RUNS).rebuild()
        except WsvizError as exc:
            st.error(plain(exc))
        else:
            scan_checkpoints.clear()
            st.success(plain(report.summary()))


def open_run_store():
    """The run store for the Train page, or stop the page (the sidebar says why; checkpoints still work)."""
    from wsviz.training.runstore import RunStore

    try:
        return RunStore(RUNS)
    except WsvizError:
        st.error("Training is unavailable until the run store can be used: see the message in the sidebar.")
        st.stop()


@st.cache_resource(show_spinner="Loading model…", max_entries=32)
def load_variant(path: str, stamp: tuple):
    """(model, card) for a checkpoint folder; cached per folder and its files' modification times and sizes."""
    from wsviz.training.checkpoint import load_checkpoint

    return load_checkpoint(path)


def get_variant(label: str):
    """(model, card) of a listed variant; a checkpoint that cannot be loaded raises a WsvizError and is listed
    as refused from then on (until its files change)."""
    path = available_variants()[label]
    stamp = _stamp(path)
    if stamp is None:
        raise WsvizError(f"The checkpoint {path} of {label!r} has gone (its card or weights were removed).")
    try:
        return load_variant(path, stamp)
    except WsvizError as exc:  # the checkpoint is at fault (other errors may pass: they are not remembered)
        _LOAD_FAILURES[path] = (stamp, str(exc))
        raise


@st.cache_resource(show_spinner=False, max_entries=32)
def _variant_kernels(path: str, stamp: tuple) -> tuple[list, dict]:
    """(kernel layers, {layer: its kernels}) of a checkpoint, kept with the loaded model: listing the
    layers and collecting a layer's applied kernels each trace the model (seconds for a ResNet-152),
    so a page rerun (a slider moved) should not repeat them."""
    from wsviz.analysis.kernels import kernel_layers

    model, _ = load_variant(path, stamp)
    return kernel_layers(model), {}


def _kernels_of(label: str) -> tuple:
    """(model, (kernel layers, kernels memo)) of a listed variant; a gone or broken checkpoint is refused
    as :func:`get_variant` refuses it."""
    model, _ = get_variant(label)
    path = available_variants()[label]
    return model, _variant_kernels(path, _stamp(path))


def variant_kernel_layers(label: str) -> list:
    """The kernel layers (:func:`wsviz.analysis.kernels.kernel_layers`) of a listed variant, computed
    once per checkpoint file state."""
    return _kernels_of(label)[1][0]


def variant_layer_weight(label: str, name: str):
    """A kernel layer's (out, in, kh, kw) kernels of a listed variant
    (:func:`wsviz.analysis.kernels.layer_weight`), computed once per layer and checkpoint file state."""
    from wsviz.analysis.kernels import layer_weight

    model, (_, memo) = _kernels_of(label)
    if name not in memo:
        memo[name] = layer_weight(model, name)
    return memo[name]


def show_variant_error(label: str, exc: Exception) -> None:
    """A variant that cannot be used, and why (the page goes on with the others)."""
    reason = str(exc) if isinstance(exc, WsvizError) else f"{type(exc).__name__}: {exc}"
    st.error(f"Variant {plain(label)} cannot be used: {plain(reason)}")


def percent_style(rows, columns):
    """``rows`` (a DataFrame or records) for ``st.dataframe`` with ``columns`` (fractions) shown as
    percentages to one decimal in every row: Streamlit's "percent" preset drops a trailing zero, so
    84.0% read "84%" beside "85.2%", as if less precise. The values stay fractions (CSV, tests)."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return df.style.format({c: "{:.1%}" for c in columns if c in df.columns}, na_rep="")


def no_variants_note() -> str:
    """What a page says when no variant is chosen: where to choose them, or, with none at all, where they
    come from."""
    if available_variants():
        return "Choose variants in the sidebar."
    return ("No trained variants found: checkpoints/ is empty (or WSVIZ_CHECKPOINTS points at an empty folder). "
            "Retrain the zoo with `python -m wsviz.zoo retrain`, or train one on the Train page; finished runs "
            "appear in the sidebar.")


def chosen_variants(default_prefix: str | None = None, key: str = "variants", load: bool = True) -> list[str]:
    """The variants chosen in the sidebar (set in app.py), optionally narrowed by prefix.

    Each is loaded here (cached), so a page only ever gets variants it can use: one that cannot be
    loaded is shown as an error, with the reason, and left out. ``load=False`` only lists them
    (a page that loads them later, on request, and handles the error itself).
    """
    usable = available_variants()
    chosen = [v for v in st.session_state.get(key, []) if v in usable]
    if default_prefix and not chosen:
        chosen = [v for v in usable if v.startswith(default_prefix)]
    if not load:
        return chosen
    ok = []
    for label in chosen:
        try:
            get_variant(label)
        except Exception as exc:  # noqa: BLE001 - shown; the page goes on with the others
            show_variant_error(label, exc)
        else:
            ok.append(label)
    return ok


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:])")


def plain(text: object) -> str:
    """``text`` escaped for st.markdown/st.error: names and messages from files on disk show as written
    (no links, images or HTML made out of them)."""
    return _MARKDOWN.sub(r"\\\1", str(text))


def show_error(exc: Exception) -> None:
    st.error(str(exc) if isinstance(exc, WsvizError) else f"Something went wrong: {type(exc).__name__}: {exc}")


def figure_html(fig) -> bytes:
    """A figure as a self-contained HTML file: plotly.js embedded, so it opens offline."""
    return fig.to_html(include_plotlyjs=True, full_html=True).encode()


def download_figure(fig, name: str) -> None:
    # The file (with plotly.js, ~4 MB) is made only when clicked, and the click does not rerun the
    # page, so nothing on it is lost or recomputed.
    st.download_button("Download figure (HTML)", lambda: figure_html(fig), f"{name}.html", "text/html",
                       key=f"dl-html-{name}", on_click="ignore", icon=":material/download:")


def download_table(rows, name: str) -> None:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    st.download_button("Download table (CSV)", buf.getvalue().encode(), f"{name}.csv", "text/csv",
                       key=f"dl-csv-{name}", on_click="ignore", icon=":material/download:")


def figure(fig, name: str) -> None:
    st.plotly_chart(fig, key=f"fig-{name}")
    download_figure(fig, name)


@st.cache_data(show_spinner=False)
def sample_images() -> dict[str, bytes]:
    """Shipped samples as image files: ten test digits (one per class) and scikit-learn's two photos."""
    import numpy as np
    from PIL import Image

    from wsviz.data.datasets import load_split

    out: dict[str, bytes] = {}
    te = load_split("mnist5k", "test")
    for c in range(10):
        i = int((te.labels == c).nonzero()[0, 0])
        buf = io.BytesIO()
        Image.fromarray((te.images[i, 0].numpy() * 255).astype(np.uint8)).save(buf, "PNG")
        out[f"digit {c} (mnist5k test #{i})"] = buf.getvalue()
    try:
        import sklearn.datasets

        img_dir = Path(sklearn.datasets.__file__).parent / "images"
        for f in sorted(img_dir.glob("*.jpg")):
            out[f"photo: {f.stem}"] = f.read_bytes()
    except Exception:  # noqa: BLE001 - samples are a convenience
        pass
    return out


def pick_images(key: str, multiple: bool = True) -> list[tuple[str, bytes]]:
    """Uploaded images, or shipped samples: [(name, file bytes)]."""
    from wsviz.data.uploads import MAX_UPLOAD_BYTES

    up = st.file_uploader("Upload images (PNG, JPEG, WebP, GIF, BMP, TIFF)", accept_multiple_files=multiple,
                          type=["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"], key=f"up-{key}",
                          help=f"Up to {MAX_UPLOAD_BYTES // 2**20} MB each.")
    files = [up] if (up is not None and not multiple) else list(up or [])
    if files:
        return _distinct_names([(f.name, f.getvalue()) for f in files])
    samples = sample_images()
    names = list(samples)
    pick = st.multiselect("…or pick samples", names, default=names[:1], key=f"sample-{key}") if multiple else \
        [st.selectbox("…or pick a sample", names, key=f"sample-{key}")]
    return [(n, samples[n]) for n in pick]


def _distinct_names(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``files`` with every name told apart: a second "image.png" becomes "image (2).png" (two phone photos
    are often both image.jpg; the page picks an image and keys its results by name)."""
    seen: dict[str, int] = {}
    taken = {n for n, _ in files}
    out = []
    for name, data in files:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
            k = seen[name]
            while (renamed := f"{stem} ({k}){dot}{ext}") in taken:
                k += 1
            taken.add(renamed)
            name = renamed
        out.append((name, data))
    return out


def prepared(name: str, data: bytes, model, quiet: bool = False, card: dict | None = None):
    """The image as this model's input (laid out as its ``card``'s training read its data:
    :func:`wsviz.training.cards.upload_layout`), or None after showing why it cannot be used (unless
    ``quiet``: the page has said so already)."""
    from wsviz.data.uploads import load_upload
    from wsviz.models import input_shape
    from wsviz.training.cards import upload_layout

    c, s, _ = input_shape(model)
    try:
        return load_upload(data, name, c, s, dataset=(card or {}).get("dataset"), layout=upload_layout(c, card or {}))
    except WsvizError as exc:
        if not quiet:
            st.error(str(exc))
        return None


def model_inputs_for(name: str, data: bytes, variants: list[str], transform=None,
                     quiet: bool = False) -> dict[str, object]:
    """{variant: its (1, C, H, W) input or None}: the image decoded and transformed once per input
    shape, and an error about it (or a note that it is far from the training data) said once —
    not at all with ``quiet``, for a page that has shown the same image's predictions already."""
    from wsviz.data.inputs import input_note
    from wsviz.models import input_shape
    from wsviz.training.cards import upload_layout

    inputs, by_shape, noted = {}, {}, set()
    for label in variants:
        try:
            model, card = get_variant(label)
        except Exception as exc:  # noqa: BLE001 - e.g. a variant chosen on the page itself, not in the sidebar
            if not quiet:
                show_variant_error(label, exc)
            continue
        c, size, _ = input_shape(model)
        shape = (c, size, upload_layout(c, card))  # a digit model, a Fashion one, an imagenet-preset one differ
        if shape not in by_shape:
            x = prepared(name, data, model, quiet, card)
            by_shape[shape] = None if x is None else (x.unsqueeze(0) if transform is None
                                                      else transform(x.unsqueeze(0)))
        note = input_note(data, c, size, card.get("dataset")) if by_shape[shape] is not None else None
        if note and note not in noted and not quiet:
            noted.add(note)
            st.warning(note, icon=":material/info:")
        inputs[label] = by_shape[shape]
    return inputs


BLANK_INPUT = "blank input (one colour)"


def show_predictions(name: str, data: bytes, variants: list[str], transform=None, top: int = 3) -> list[dict]:
    """One column per variant with its predicted class (by name) and the next ``top - 1`` classes with
    their probabilities, then the model input(s).

    ``transform(batch) -> batch`` is applied to the prepared (1, C, H, W) input (rescale, rotate).
    Each distinct input is shown once (variants trained on the same data see the same input).
    Returns the rows shown; a row whose input is one colour (nothing found in the image) has "input":
    BLANK_INPUT, and its column says the prediction is about nothing.
    """
    from wsviz.analysis.sweeps import predict
    from wsviz.data.classes import class_names

    inputs = model_inputs_for(name, data, variants, transform)
    rows, users = [], {}
    for label, xb in inputs.items():
        if xb is None:
            continue
        model, card = get_variant(label)
        pred, prob = predict(model, xb)
        names = class_names(card.get("dataset"), prob.shape[1])
        order = prob[0].argsort(descending=True)[:top].tolist()
        p = int(pred[0])
        rows.append({"image": name, "variant": label, "predicted": p, "class": names[p],
                     "confidence": float(prob[0, p]),
                     "next": ", ".join(f"{names[k]} {100 * float(prob[0, k]):.1f}%" for k in order[1:])})
        if float(xb.max() - xb.min()) == 0:  # one colour (no digit found, a transparent or black image)
            rows[-1]["input"] = BLANK_INPUT
        users.setdefault(tuple(xb.shape[1:3]), (xb, []))[1].append(label)
    per_row = 3 if len(rows) > 3 else max(len(rows), 1)  # wraps instead of truncating on narrow pages
    for start in range(0, len(rows), per_row):
        for col, row in zip(st.columns(per_row), rows[start:start + per_row]):
            col.metric(row["variant"], row["class"], f"{100 * row['confidence']:.1f}%", delta_color="off",
                       delta_arrow="off", help=f"class index {row['predicted']}")
            if row.get("input") == BLANK_INPUT:
                col.caption(f"on a {BLANK_INPUT}: what the model says about nothing, not about this image")
            elif row["next"]:
                col.caption("then " + row["next"])
    # Drawn last, so a redrawn input means every prediction above it is already up to date.
    for col, (shape, (xb, labels)) in zip(st.columns(max(len(users), 6)), users.items()):
        col.image(xb[0].permute(1, 2, 0).numpy() if xb.shape[1] == 3 else xb[0, 0].numpy(), clamp=True, width=120,
                  caption=f"model input {shape[0]}×{xb.shape[-1]}×{xb.shape[-1]}" + ("" if len(users) == 1 else
                                                                                  f" ({', '.join(labels)})"))
    return rows


def explain_inputs(name: str, data: bytes, variants: list[str]) -> None:
    """Say how the image became each distinct model input (as ``load_upload`` prepares it for the
    predictions beside it: digit models get the MNIST layout, other models the image fit in a square)."""
    from wsviz.data.uploads import explain_upload
    from wsviz.models import input_shape
    from wsviz.training.cards import upload_layout

    shapes: dict[tuple[int, int, str | None, str], list[str]] = {}
    for label in variants:
        try:
            model, card = get_variant(label)
            c, size, _ = input_shape(model)
        except Exception:  # noqa: BLE001 - show_predictions has said why this variant is unavailable
            continue
        shapes.setdefault((c, size, card.get("dataset"), upload_layout(c, card)), []).append(label)
    for (c, size, dataset, layout), labels in shapes.items():
        try:
            text = explain_upload(data, name, c, size, dataset=dataset, layout=layout)
        except WsvizError:  # said above, with the predictions
            continue
        st.caption(f"Input for {', '.join(labels)}: {text}" if len(shapes) > 1 else text)


# ------------------------------------------------------------------ long work off the script thread
class Cancelled(Exception):
    """Raised inside background work when its Cancel button was pressed."""


class Work:
    """One long analysis running in a worker thread for one session: its inputs (``key``), its
    progress and its result. Nothing here calls Streamlit: a fragment reads it and draws."""

    def __init__(self, key: tuple, fn, args: tuple) -> None:
        import threading
        import time

        self.key, self.started = key, time.monotonic()
        self.fraction, self.text = 0.0, "Starting…"
        self.cancel = threading.Event()
        self.future = _executor().submit(self._run, fn, args)

    def progress(self, fraction: float, text: str) -> None:
        """Called by the work itself; stops it if Cancel was pressed."""
        if self.cancel.is_set():
            raise Cancelled()
        self.fraction, self.text = max(0.0, min(1.0, fraction)), text

    def _run(self, fn, args):
        return fn(self.progress, *args)

    @property
    def done(self) -> bool:
        return self.future.done()


@st.cache_resource
def _executor():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="wsviz-work")


def run_in_background(slot: str, key: tuple, fn, *args) -> Work:
    """Start ``fn(progress, *args)`` in a worker thread for this session (replacing any earlier work in
    ``slot``, which is cancelled). The page stays live meanwhile: sliders and fragments answer."""
    old = st.session_state.get(slot)
    if isinstance(old, Work) and not old.done:
        old.cancel.set()
    work = Work(key, fn, args)
    st.session_state[slot] = work
    return work


def background_result(slot: str, key: tuple, what: str):
    """The finished result of the work in ``slot`` for these inputs, or None.

    While it runs, a fragment shows its progress with a Cancel button and reruns the page when it
    ends; a result for other inputs is not shown (the page says the settings changed); an error
    or a cancellation is said once, plainly.
    """
    work = st.session_state.get(slot)
    if not isinstance(work, Work):
        return None
    if work.key != key:
        st.caption(f"The settings changed since the last {what}: press the button to run it for these.")
        return None
    if not work.done:
        _progress_panel(slot, what)
        return None
    exc = work.future.exception()
    if isinstance(exc, Cancelled):
        st.info(f"The {what} was cancelled.")
        return None
    if exc is not None:
        show_error(exc)
        return None
    return work.future.result()


@st.fragment(run_every=0.5)
def _progress_panel(slot: str, what: str) -> None:
    import time

    work = st.session_state.get(slot)
    if not isinstance(work, Work):
        return
    if work.done:
        st.rerun()  # the whole page: it draws the result
    elapsed = time.monotonic() - work.started
    eta = ""
    if 0.02 < work.fraction < 1:
        eta = f", about {elapsed * (1 - work.fraction) / work.fraction:.0f} s left"
    st.progress(work.fraction, text=f"{what.capitalize()}: {work.text} ({elapsed:.0f} s{eta})")
    if st.button("Cancel", key=f"cancel-{slot}", icon=":material/stop_circle:"):
        work.cancel.set()
