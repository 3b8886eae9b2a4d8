"""Train: launch a training in the background, watch it live, cancel it, resume it."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch
from plotly.subplots import make_subplots

from pages._access import current_actor
from pages._shared import available_variants, open_run_store, percent_style, show_error
from pages._usage import usage_panel
from wsviz.data.datasets import dataset_names
from wsviz.data.loaders import AUGMENTS
from wsviz.errors import WsvizError
from wsviz.models import list_models
from wsviz.training.jobs import DEFAULT_MAX_RUNNING, cancel, gpu_slots, launch, list_runs, resumable, resume
from wsviz.training.loop import OPTIMIZERS, SCHEDULES, TrainConfig
from wsviz.training.runstore import DIVERGED, DIVERGED_MARK, LIVE_LOSS, LIVE_LOSS_IN_EPOCH
from wsviz.training.watch import loss_figure, overlay_figure, progress, tensorboard_hint

st.title("Train")
store = open_run_store()
backend = os.environ.get("WSVIZ_BACKEND", "process")  # launch refuses an unknown one, saying so
if backend == "slurm":
    where = "Jobs run on the SLURM cluster's nodes (WSVIZ_SLURM), with CUDA and mixed precision where a GPU is " \
            "given; the cluster's scheduler decides how many run at once."
else:
    gpu = torch.cuda.is_available()
    slots = gpu_slots() if gpu and backend == "process" else []
    limit = f"one job per GPU ({len(slots)} visible, each pinned to its own); the rest queue" if slots else \
        f"at most {DEFAULT_MAX_RUNNING} job(s) at once; the rest queue" if backend == "process" else \
        "submitit's local executor runs every job at once"
    where = (f"Device: **{'GPU — ' + torch.cuda.get_device_name(0) if gpu else 'CPU'}** (jobs use CUDA with mixed "
             f"precision when a GPU is visible): {limit}.")
st.caption(f"{where} Jobs are separate processes: they keep running if you reload the page or restart the app. A "
           f"failed or cancelled run can be resumed from its last finished epoch. {tensorboard_hint(store.root, backend)}")
actor = current_actor()  # launch, cancel and resume refuse a viewer, and check this user's quotas
usage_panel(store, actor)

with st.form("launch"):
    names = list_models()
    c1, c2, c3 = st.columns(3)
    model = c1.selectbox("Model", names, index=names.index("msws_resnet_digits"))
    dataset = c2.selectbox("Dataset", dataset_names(), index=dataset_names().index("mnist5k-scale"))
    run_name = c3.text_input("Run name (optional)", "")
    c1, c2, c3, c4 = st.columns(4)
    epochs = c1.number_input("Epochs", 1, 1000, 5)
    batch = c2.number_input("Batch size", 1, 4096, 128)
    lr = c3.number_input("Learning rate", 1e-6, 10.0, 0.1, format="%.5f")
    optimizer = c4.selectbox("Optimizer", OPTIMIZERS)
    c1, c2, c3, c4 = st.columns(4)
    schedule = c1.selectbox("Schedule", SCHEDULES, index=SCHEDULES.index("cosine"))
    wd = c2.number_input("Weight decay", 0.0, 1.0, 1e-4, format="%.5f")
    max_batches = c3.number_input("Max batches per epoch (0 = all)", 0, 100000, 0)
    augment = c4.selectbox("Augmentation", AUGMENTS, help="cifar: crop-4 + flip; imagenet: random-resized crop + flip")
    overrides = st.text_input("Model options as JSON", "{}", help='e.g. {"sharing": "shared", "n_rates": 2}')
    go_ = st.form_submit_button("Launch", type="primary")
if go_:
    try:
        opts = json.loads(overrides or "{}")
        if not isinstance(opts, dict):
            raise WsvizError('Model options must be a JSON object, e.g. {"sharing": "shared"}.')
        cfg = TrainConfig(epochs=int(epochs), batch_size=int(batch), lr=float(lr), optimizer=optimizer,
                          schedule=schedule, weight_decay=float(wd), max_batches=int(max_batches) or None,
                          augment=augment)
        from wsviz.training.run import check_trainable

        check_trainable(model, dataset, opts)  # refuse bad options or an absurd size here, not in the background
        run = launch(store, model, dataset, cfg, overrides=opts, name=run_name or None, actor=actor)
        st.success(f"Launched run {run.name} ({run.id}).")
        st.session_state["watch"] = run.id
        st.session_state["watch-select"] = run.id  # the newest launch is the one watched
    except json.JSONDecodeError as exc:
        st.error(f"Model options are not valid JSON ({exc}).")
    except WsvizError as exc:
        st.error(str(exc))
    except Exception as exc:  # noqa: BLE001
        show_error(exc)


@st.fragment(run_every=2)
def runs_panel() -> None:
    try:
        runs = list_runs(store)
    except WsvizError as exc:  # damaged while the page is open: reloading moves it aside and rebuilds it
        st.error(str(exc))
        return
    if not runs:
        st.info("No runs yet.")
        return
    def accuracy(r) -> float | None:
        """The card's test accuracy, else (a cancelled or running run) its last finished epoch's."""
        if r.test_accuracy is not None:
            return r.test_accuracy
        last = store.metrics(r.id).get("test_acc")
        return last[-1][2] if last else None

    df = pd.DataFrame([{"name": r.name, "status": "done, diverged" if r.diverged else r.status, "model": r.model,
                        "dataset": r.dataset,
                        "test accuracy": accuracy(r), "device": r.device, "id": r.id, "reason": r.reason or ""}
                       for r in runs])
    st.dataframe(percent_style(df, ["test accuracy"]), hide_index=True)
    by_id = {r.id: r for r in runs}
    ids = [r.id for r in runs]  # newest first: the newest run is watched unless another is chosen
    if st.session_state.get("watch-select") not in by_id:
        st.session_state.pop("watch-select", None)
    # No status in the option's label: the browser keeps showing the label the selected option had when it was
    # chosen (a run picked while queued read "queued" while it ran); the line below says its status now.
    watch = st.selectbox("Watch run", ids, key="watch-select", format_func=lambda i: f"{by_id[i].name} · {i[-6:]}")
    run = store.get(watch)
    m = store.metrics(watch)
    shown = progress(run, store.metric_times(watch, "test_acc"), time.time())
    if shown is not None:
        st.caption(shown.caption())
    c1, c2, c3 = st.columns(3)
    if m.get(LIVE_LOSS) or m.get(LIVE_LOSS_IN_EPOCH):
        c1.plotly_chart(loss_figure(m), key=f"loss-{watch}")
    if m.get("test_acc"):
        fig = go.Figure()
        for key in ("train_acc", "test_acc"):
            fig.add_trace(go.Scatter(x=[e for e, _, _ in m.get(key, [])], y=[100 * v for _, _, v in m.get(key, [])],
                                     mode="lines+markers", name=key.replace("_acc", "")))
        fig.update_layout(height=280, title="Accuracy per epoch", xaxis_title="epoch", yaxis_title="accuracy (%)",
                          margin=dict(t=40, b=10))
        c2.plotly_chart(fig, key=f"acc-{watch}")
    if m.get("lr") or m.get("images_per_s"):
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        fig.add_trace(go.Scatter(x=[e for e, _, _ in m.get("lr", [])], y=[v for _, _, v in m.get("lr", [])],
                                 mode="lines+markers", name="learning rate"), secondary_y=False)
        fig.add_trace(go.Scatter(x=[e for e, _, _ in m.get("images_per_s", [])],
                                 y=[v for _, _, v in m.get("images_per_s", [])], mode="lines+markers",
                                 name="images/s"), secondary_y=True)
        fig.update_layout(height=280, title="Learning rate and throughput", xaxis_title="epoch",
                          margin=dict(t=40, b=10))
        fig.update_yaxes(title_text="learning rate", secondary_y=False)
        fig.update_yaxes(title_text="images/s", secondary_y=True)
        c3.plotly_chart(fig, key=f"lr-{watch}")
    overlay = st.multiselect("Overlay the test accuracy of several runs", ids, default=[],
                             format_func=lambda i: f"{by_id[i].name} · {i[-6:]}", key="overlay-runs")
    if overlay:  # one panel per dataset: accuracies on different test sets never share an axis
        fig = overlay_figure([by_id[rid] for rid in overlay],
                             {rid: store.metrics(rid).get("test_acc", []) for rid in overlay})
        st.plotly_chart(fig, key="overlay")
    if run.diverged:  # trained all its epochs, but its weights are not a trained model's
        st.warning(f"**{run.name}** — done, but its training diverged: {run.reason.removeprefix(DIVERGED)}. Its "
                   f"checkpoint is kept and listed among the variants as `{run.name}{DIVERGED_MARK}`; its weights are "
                   "not worth comparing.")
    else:
        st.write(f"**{run.name}** — {run.status}" + (f": {run.reason}" if run.reason else ""))
    if run.active and st.button("Cancel this run", key=f"cancel-{watch}"):
        try:
            cancel(store, watch, actor=actor)
        except WsvizError as exc:
            st.error(str(exc))
        else:
            st.toast(f"Cancelling {run.name}…")
    if resumable(run) and st.button("Resume this run", key=f"resume-{watch}",
                                    help="continue from the last finished epoch, with the same options"):
        try:
            resume(store, watch, actor=actor)
            st.toast(f"Resuming {run.name}…")
        except WsvizError as exc:
            st.error(str(exc))
    if run.status in ("done", "cancelled"):
        available_variants.clear()
        st.caption("Finished runs, and cancelled runs with a finished epoch, appear in the sidebar's variant list.")


runs_panel()
