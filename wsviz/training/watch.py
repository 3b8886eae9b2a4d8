"""What the Train page shows of runs: the live loss by optimiser step, the time a run has left, the
test accuracy of several runs side by side, and the folder TensorBoard reads their event files from.

Functions of the run store's records only (no Streamlit), so each is tested on its own.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from wsviz.training.runstore import LIVE_LOSS, LIVE_LOSS_IN_EPOCH, Run

Metrics = dict[str, list[tuple[int, int | None, float]]]  # RunStore.metrics: {key: [(epoch, step, value), ...]}


def loss_curve(metrics: Metrics) -> tuple[list[int], list[float]]:
    """(optimiser steps since the run's start, training losses) of a run's live loss, in step order.

    Runs recorded before the store kept that step hold the batch within each epoch instead: those
    points go after the epochs before theirs, taking an epoch's length as the most batches any of
    its epochs recorded (the loss is recorded at most once a second, so that is close, never over).
    """
    old = [(e, s, v) for e, s, v in metrics.get(LIVE_LOSS_IN_EPOCH, []) if s is not None]
    per_epoch = max((s for _, s, _ in old), default=0)
    points = [((e - 1) * per_epoch + s, v) for e, s, v in old]
    points += [(s, v) for _, s, v in metrics.get(LIVE_LOSS, []) if s is not None]
    points.sort(key=lambda p: p[0])
    return [s for s, _ in points], [v for _, v in points]


def loss_figure(metrics: Metrics) -> go.Figure:
    steps, losses = loss_curve(metrics)
    fig = go.Figure(go.Scatter(x=steps, y=losses, mode="lines", name="loss (live)"))
    fig.update_layout(height=280, title="Training loss", xaxis_title="optimiser step", yaxis_title="loss",
                      margin=dict(t=40, b=10))
    return fig


@dataclass(frozen=True)
class Progress:
    """How far a running run is: ``done`` of ``epochs`` epochs, ``since_start`` of them finished since
    this process started (``elapsed`` seconds ago; a resumed run kept the others), and about ``left``
    seconds to go (None until an epoch has finished since the start)."""

    done: int
    epochs: int
    since_start: int
    elapsed: float
    left: float | None

    def caption(self) -> str:
        text = f"Epoch {self.done} of {self.epochs} done"
        if self.since_start < self.done:
            text += f" ({self.since_start} since it was resumed {self.elapsed:.0f} s ago)"
        else:
            text += f" after {self.elapsed:.0f} s"
        if self.left is None:
            return text + "; the time left is known once an epoch finishes."
        if self.left <= 0 and self.done < self.epochs:
            return text + "; this epoch is taking longer than the ones before it."
        return text + f"; about {self.left:.0f} s left."


def progress(run: Run, epoch_times: Sequence[tuple[int, float]], now: float) -> Progress | None:
    """The progress of a running run from when its finished epochs were recorded
    (:meth:`RunStore.metric_times` of ``test_acc``), or None if it is not running or has no finished epoch.

    The rate is taken from the epochs finished since ``run.started`` only: resuming sets ``started``
    anew, while the epochs finished before are kept, and took none of that time.
    """
    if run.status != "running" or not run.started or not epoch_times:
        return None
    epochs = int((run.spec.get("train_config") or {}).get("epochs") or 0)
    done = len(epoch_times)
    recent = sorted(t for _, t in epoch_times if t >= run.started)
    elapsed = now - run.started
    if not recent:
        return Progress(done, epochs, 0, elapsed, None)
    per_epoch = (recent[-1] - run.started) / len(recent)
    left = per_epoch * max(epochs - done, 0) - (now - recent[-1])  # less the part of this epoch already run
    return Progress(done, epochs, len(recent), elapsed, max(left, 0.0))


def trace_name(run: Run) -> str:
    """A run's name in a legend: its model and id (unique) and its dataset."""
    return f"{run.model} · {run.id} ({run.dataset})"


def overlay_figure(runs: Sequence[Run], accuracy: dict[str, list[tuple[int, int | None, float]]]) -> go.Figure:
    """The test accuracy per epoch of ``runs`` (``accuracy``: {run id: its ``test_acc`` metric}), one
    panel per dataset: accuracies on different test sets are never drawn on one axis."""
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    rows = max(len(datasets), 1)
    fig = make_subplots(rows=rows, cols=1, subplot_titles=[f"test accuracy on {d}" for d in datasets],
                        vertical_spacing=min(0.12, 0.9 / (rows - 1)) if rows > 1 else 0.0)
    for r in runs:
        acc = accuracy.get(r.id, [])
        fig.add_trace(go.Scatter(x=[e for e, _, _ in acc], y=[100 * v for _, _, v in acc], mode="lines+markers",
                                 name=trace_name(r), legendgroup=r.dataset),
                      row=datasets.index(r.dataset) + 1, col=1)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="accuracy (%)")
    fig.update_layout(height=60 + 260 * rows, margin=dict(t=40, b=10))
    return fig


def tensorboard_hint(root: str | Path, backend: str) -> str:
    """Where TensorBoard finds the runs' event files: every run writes them to ``ROOT/<run id>/tensorboard``
    (``root`` is the run store's folder, WSVIZ_RUNS), wherever the job runs."""
    cmd = f"`tensorboard --logdir {shlex.quote(str(root))}`"
    if backend == "slurm":
        return (f"TensorBoard: {cmd}, on a machine that sees that folder (the SLURM jobs write their event files "
                "into it from the cluster's nodes).")
    return f"TensorBoard: {cmd}."
