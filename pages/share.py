"""Share weights: where a trained model could share its convolutions, what each sharing would cost,
and a button that ties the chosen groups and fine-tunes the result as an ordinary training run."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages._access import current_actor
from pages._shared import (
    ROOT,
    _stamp,
    available_variants,
    background_result,
    chosen_variants,
    download_table,
    figure,
    get_variant,
    open_run_store,
    plain,
    run_in_background,
    show_error,
)
from wsviz.concurrency import heavy_slot
from wsviz.errors import WsvizError
from wsviz.training.cards import evaluation_transform

st.title("Share weights")
def _weights_said() -> str:
    """What the predicted cost is made of, read from the weights the library uses (so it stays true)."""
    from wsviz.analysis.opportunities import DEFAULT_WEIGHTS

    names = {"measured_drop": "the accuracy lost now", "measured_kl": "the KL divergence from the untied model's "
             "predictions now", "measured_loss": "the held-out loss rise now", "output_cka": "the output CKA",
             "weight_similarity": "the kernel similarity", "gradient_conflict": "the gradient conflict"}
    parts = [f"{names[k]} ×{w:g}" for k, w in DEFAULT_WEIGHTS.items() if w]
    return " and ".join(parts)


def _evidence_said() -> str:
    """How far the predicted cost is tested, read from bench_tie's published results (the source of
    checkpoints/REPORT.md's "Ranking" section), not restated by hand."""
    import json

    from wsviz.zoo import ranking_evidence

    try:
        ev = ranking_evidence(json.loads((ROOT / "checkpoints" / "tying.json").read_text()))
    except (OSError, ValueError, KeyError) as exc:
        return f"How well it predicts is not known here: checkpoints/tying.json cannot be read ({exc})."
    if not ev["current"]:
        return ("checkpoints/REPORT.md's \"Ranking\" tested other weights than these; how well these predict is "
                "not measured.")
    return (f"Those weights were chosen on one half of the test split (val) over the {ev['groups']} candidate groups "
            f"of {ev['model']} ({ev['seeds']} seeds), against the accuracy each group lost after a {ev['steps']}-step "
            f"fine-tune: Spearman ρ {ev['rho_val']:.2f} on val, {ev['rho_test']:.2f} on the other half (95% interval "
            f"[{ev['rho_test_ci'][0]:.2f}, {ev['rho_test_ci'][1]:.2f}]), where the KL alone reached {ev['kl_test']:.2f} (checkpoints/REPORT.md, \"Ranking\"); measured on that one model only.")


st.write("Where could this trained model share weights, and what would it cost? Every group of same-shape "
         "3x3-or-larger convolutions with the same role in consecutive blocks of a stage is scored, cheapest first. "
         "Tie the cheapest, then fine-tune: the result is a variant like any other.")
with st.expander("What the scores are, and how far the predicted cost is tested"):
    st.markdown(
        "- **Kernel similarity** (cosine, higher: more alike) and **output CKA** (linear CKA of the convolutions' "
        "own outputs, before BatchNorm; higher: more alike): how alike the members are.\n"
        "- **Gradient conflict** (higher: more conflict): how much the members' gradients pull apart.\n"
        "- **Measured now**: what tying the group costs on held-out images right away (least-squares kernel, "
        "BatchNorm re-estimated, no fine-tuning): accuracy lost, KL from the untied model's predictions, loss rise.\n"
        f"- **Predicted cost**: the weighted mean of the groups' ranks by {_weights_said()}, from 0 (cheapest) to 1 "
        "(costliest). The three similarity scores are shown, not counted.\n\n"
        + _evidence_said() + " 1x1 convolutions are left out.")
variants = chosen_variants(load=False)
if not variants:
    st.info("Choose a trained variant in the sidebar.")
    st.stop()
c1, c2, c3 = st.columns(3)
label = c1.selectbox("Model", variants, help="one of the variants chosen in the sidebar")
n_cal = c2.slider("Calibration images (training split)", 64, 1024, 256, 64,
                  help="the least-squares kernels, BatchNorm statistics, CKA and gradients are computed on them")
n_held = c3.slider("Held-out images (test split)", 100, 1000, 300, 100,
                   help="the accuracy lost by tying each group now is measured on them. They are test images, so "
                        "groups chosen by these costs make the fine-tuned variant's test accuracy a little optimistic; "
                        "benchmarks/bench_tie.py chooses on one half of the test split and reports the other")


def score(progress, model, dataset: str, n_cal: int, n_held: int, data_seed: int, augment: str = "none"):
    """The opportunities, the per-stage similarity matrices, what the costs were measured against
    (the untied baseline), the (calibration, held-out) images they were measured on (a budget suggestion
    measures on the same) and the training split's size (the fine-tune's steps per epoch), in a worker
    thread."""
    from wsviz.analysis.opportunities import find_opportunities
    from wsviz.data.stream import model_sample

    # only the chosen images are decoded; a folder at the model's size, as its training evaluated it
    x, y, n_train = model_sample(dataset, "train", model, n_cal, seed=data_seed, augment=augment)
    hx, hy, _ = model_sample(dataset, "test", model, n_held, seed=data_seed, augment=augment)
    with heavy_slot(lambda s: progress(0.0, f"waiting for another session's analysis ({s:.0f} s)")):
        found = find_opportunities(model, x, y, held_out=(hx, hy),
                                   progress=lambda i, n, g: progress(i / max(n, 1), g))
    return found.rows, found.stages, found.baseline, (x, (hx, hy)), n_train


try:
    model, card = get_variant(label)
except Exception as exc:  # noqa: BLE001 - said plainly; the page stops here
    show_error(exc)
    st.stop()
dataset = card.get("dataset")
if not dataset:
    st.warning(f"The card of {plain(label)} does not say what it was trained on, so there is no calibration data.")
    st.stop()
path = available_variants()[label]
# The checkpoint's file stamp too: a checkpoint rewritten in place (a retrain into the same folder) is
# another model, whose table (and groups to tie) must not be the old one's.
key = (label, path, _stamp(path), n_cal, n_held)
if st.button("Score candidate groups", type="primary"):
    run_in_background("share-work", key, score, model, dataset, n_cal, n_held, int(card.get("data_seed", 0)),
                      evaluation_transform(card))
result = background_result("share-work", key, "scoring")
if result is None:
    st.stop()
rows, sims, baseline, (cal_x, held_out), n_train = result

from wsviz.figures import opportunities_figure, stage_similarity_figure  # noqa: E402

kind = st.radio("Similarity", ["output_cka", "weight_similarity"], horizontal=True,
                format_func=lambda k: {"output_cka": "conv outputs (linear CKA)",
                                       "weight_similarity": "kernels (cosine)"}[k])
figure(stage_similarity_figure(sims, kind), f"share-similarity-{kind}")
table = [{"group": " + ".join(r.group), "params saved": r.params_saved, "predicted cost": r.predicted_cost,
          "drop now (pts)": r.measured_drop, "loss rise now": r.measured_loss, "KL now": r.measured_kl,
          "weight similarity": r.weight_similarity, "output CKA": r.output_cka,
          "gradient conflict": r.gradient_conflict} for r in rows]
figure(opportunities_figure([{"group": t["group"], "params_saved": t["params saved"],
                              "predicted_cost": t["predicted cost"], "measured_drop": t["drop now (pts)"]}
                             for t in table]), "share-cost")
st.subheader("Candidate groups, cheapest first")


def _baseline_said(b) -> str:
    """What the costs now were measured against, in numbers."""
    one = 100 / b.n_held_out
    return (f"Costs now are measured against the untied model with its BatchNorm re-estimated on the same "
            f"calibration images as each tied model's (so a cost is the tying's alone): untied, BN re-estimated on "
            f"{b.n_calibration:,} images: {100 * b.accuracy:.1f}% on the {b.n_held_out:,} held-out images (as "
            f"trained: {100 * b.as_trained:.1f}%); one image = {one:.2g} point{'' if one == 1 else 's'}.")


if baseline is not None:
    st.caption(_baseline_said(baseline))
st.dataframe(pd.DataFrame(table), hide_index=True,
             column_config={"predicted cost": st.column_config.NumberColumn(
                                format="%.2f", help="0 cheapest, 1 costliest (the ranks of the measured costs)"),
                            "drop now (pts)": st.column_config.NumberColumn(
                                format="%+.1f", help="accuracy points lost on the held-out images, tied now, against "
                                                     "the untied model with BatchNorm re-estimated on the same "
                                                     "images (the caption above); negative: the tied model got a "
                                                     "few more of them right"),
                            "loss rise now": st.column_config.NumberColumn(help="held-out cross-entropy, tied now "
                                                                                "minus untied (higher: costlier)"),
                            "KL now": st.column_config.NumberColumn(help="mean KL from the untied model's held-out "
                                                                         "predictions (higher: costlier)"),
                            "weight similarity": st.column_config.NumberColumn(
                                help="mean pairwise cosine of the members' kernels (higher: more alike)"),
                            "output CKA": st.column_config.NumberColumn(
                                help="mean pairwise linear CKA of the member convolutions' own outputs, before "
                                     "BatchNorm (higher: more alike)"),
                            "gradient conflict": st.column_config.NumberColumn(
                                help="1 minus the mean pairwise cosine of the members' gradients (higher: more "
                                     "conflict)")})
download_table(table, "share-opportunities")
by_name = {t["group"]: r for t, r in zip(table, rows)}
pick_key = f"share-pick-{hash(key)}"


def suggest(progress, model, rows, images, held_out, budget: int):
    """The disjoint groups that save ``budget`` parameters at the least measured cost, in a worker thread,
    measured on the images the rows were scored on."""
    from wsviz.analysis.opportunities import choose_groups

    with heavy_slot(lambda s: progress(0.0, f"waiting for another session's analysis ({s:.0f} s)")):
        return choose_groups(model, rows, budget, images, held_out, verify=4,
                             progress=lambda i, n, g: progress(i / max(n, 1), g))


with st.expander("Suggest groups for a parameter budget"):
    from wsviz.analysis.opportunities import SEARCH_NODES, best_disjoint_saving, selection_saving

    st.caption("Disjoint groups that save at least this many parameters, ranked by what tying each costs now "
               "(the KL divergence from the untied model's held-out predictions: the measured cost that best "
               "predicted the accuracy lost after fine-tuning in checkpoints/REPORT.md), added up; the 4 best sets "
               "are then tied together, measured on the held-out images, and listed by that KL, lowest first.")
    b1, b2 = st.columns([2, 1])
    most, exact = best_disjoint_saving(rows)
    budget = b1.number_input("Parameters to save", 1, max(most, 1), min(r.params_saved for r in rows), step=1000,
                             help=f"at most {most:,}: " + ("the most any choice of groups that share no layer saves"
                                                          if exact else "an upper bound on what any choice of "
                                                          "groups that share no layer saves (the search was cut "
                                                          "short)"))
    if b2.button("Suggest groups"):
        run_in_background("share-suggest", (key, int(budget)), suggest, model, rows, cal_x, held_out, int(budget))
    suggestion = background_result("share-suggest", (key, int(budget)), "measuring of the best sets")
    if suggestion:
        best = suggestion[0]
        if not best.complete:
            st.warning(f"The search for disjoint groups was cut short after looking at {SEARCH_NODES:,} sets of "
                       "groups (too many ways to save this budget): these are the best sets it found, and a cheaper "
                       "one may exist.")
        names = [" + ".join(g) for g in best.groups]
        st.success(f"Tie {' | '.join(names)}: saves {best.params_saved:,} parameters; with all of them tied now "
                   f"KL {best.measured_kl:.4f} (the groups alone add up to {best.predicted:.4f}), "
                   f"{best.measured_drop:+.1f} accuracy points lost on the held-out images (before fine-tuning).")
        st.dataframe(pd.DataFrame([{"groups": " | ".join(" + ".join(g) for g in c.groups),
                                    "params saved": c.params_saved, "KL, groups alone added": c.predicted,
                                    "KL, tied together": c.measured_kl, "drop now (pts)": c.measured_drop}
                                   for c in suggestion]), hide_index=True)
        if st.button("Use these groups"):
            st.session_state[pick_key] = names
picked = st.multiselect("Groups to tie", list(by_name), key=pick_key,
                        help="groups may not overlap: a layer shares one weight at most")
chosen = [by_name[g].group for g in picked]
saved, twice = selection_saving([by_name[g] for g in picked])
if twice:
    st.warning(f"These groups overlap ({', '.join(twice[:3])} in more than one): a layer shares one weight at most, "
               f"so they cannot be tied together. The groups that do not overlap save {saved:,} parameters.")
else:
    st.caption(f"{len(chosen)} group(s) chosen: {saved:,} parameters saved of {card.get('unique_params', 0):,}.")

st.subheader("Tie and fine-tune")
actor = current_actor()
if not actor.can_train:
    st.info(f"Signed in as {plain(actor.name)} ({actor.role}): only trainers can tie and fine-tune.")
    st.stop()
with st.form("share-launch"):
    c1, c2, c3 = st.columns(3)
    init = c1.selectbox("Init", ["lstsq", "lstsq-bn", "mean", "medoid"],
                        help="the shared kernel's start: least squares (reproduces every member's outputs best); "
                             "lstsq-bn, the same with each member's input channels rescaled by its own preceding "
                             "BatchNorm (more accuracy right after tying; after fine-tuning level with lstsq on the "
                             "Fashion twin, measured with the fine-tuning recipe before the current one and not "
                             "measured since); the members' mean; or their medoid")
    epochs = c2.number_input("Fine-tuning epochs", 1, 100, 1)
    lr = c3.number_input("Learning rate", 1e-5, 1.0, 0.01, format="%.4f")
    c4, c5 = st.columns(2)
    max_batches = c4.number_input("Max batches per epoch (0 = all)", 0, 100000, 0)
    name = c5.text_input("Run name (optional)", "")
    distill = st.checkbox("Learn from the untied model", True,
                          help="distillation: the tied model learns half from the untied model's predictions (T = 4) "
                               "and half from the labels, its tied blocks' outputs are pulled to the untied model's "
                               "(feature distillation, weight 3), and it ends with its last 15 steps' weights averaged (a set of fewer batches: its whole last "
                               "epoch), the recipe checkpoints/REPORT.md measures; off: from the labels alone. "
                               "Either way the rate is a cosine annealed every step.")
    go_ = st.form_submit_button("Tie the chosen groups and fine-tune", type="primary")
if go_:
    from wsviz.training.jobs import launch
    from wsviz.training.tying import TieSpec, finetune_config

    try:
        if not chosen:
            raise WsvizError("Tick the groups to tie in the table's first column.")
        from wsviz.models.tie import check_groups

        check_groups(model, chosen)  # overlapping or bad groups are refused here, not in the background
        cfg = finetune_config(int(epochs), float(lr), max_batches=int(max_batches) or None, distill=bool(distill),
                              train_images=n_train)  # a set of < 15 batches averages its whole epoch
        run = launch(open_run_store(), card["model"], dataset, cfg,
                     overrides={}, name=name or f"{label}-tied", data_seed=int(card.get("data_seed", 0)),
                     init_from=available_variants()[label], tie=TieSpec(tuple(chosen), init, n_cal), actor=actor)
    except WsvizError as exc:
        st.error(plain(exc))
    except Exception as exc:  # noqa: BLE001
        show_error(exc)
    else:
        st.session_state["watch"] = st.session_state["watch-select"] = run.id  # the Train page watches it
        st.success(f"Launched run {plain(run.name)} ({run.id}): watch it on the Train page; when it finishes it is "
                   "listed as a variant in the sidebar, tied, on every page.")
