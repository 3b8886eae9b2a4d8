r"""``python -m wsviz ...``: every analysis headless, writing the tables (CSV/JSON) and the
figures (plotly HTML) the app shows.

    python -m wsviz models --summary
    python -m wsviz kernels  --checkpoint checkpoints/scale-msws-vanilla checkpoints/scale-msws-shared --out out/
    python -m wsviz scale    --checkpoint checkpoints/scale-* --dataset mnist5k --out out/
    python -m wsviz rotation --checkpoint checkpoints/rot-* --dataset mnist5k --out out/
    python -m wsviz compare  --checkpoint checkpoints/scale-* --out out/
    python -m wsviz attribution --checkpoint checkpoints/scale-resnet20 --image digit.png --out out/
    python -m wsviz embed    --checkpoint checkpoints/rot-cnn --dataset mnist5k-rot --method umap --out out/
    python -m wsviz cka      --checkpoint checkpoints/scale-msws-vanilla checkpoints/scale-msws-shared --out out/
    python -m wsviz opportunities --checkpoint checkpoints/scale-sharesnet-unshared --out out/
    python -m wsviz tie      --checkpoint checkpoints/scale-sharesnet-unshared --group stages.2.1.conv2,stages.2.2.conv2 \
                             --init lstsq --finetune-epochs 1 --out runs/tied
    python -m wsviz import   --model msws_resnet18 --set sharing=vanilla --weights resnet18.pth --out checkpoints/r18

Installed as a package, ``wsviz ...`` is the same command.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsviz.cli_errors import CliParser
from wsviz.errors import WsvizError


def _models(args: argparse.Namespace) -> int:
    from wsviz.analysis.zoo import zoo_table
    from wsviz.models import families, get_spec, list_models

    specs = [get_spec(n) for n in (args.name or list_models(args.pattern, family=args.family))]
    if args.family and args.family not in families():
        raise WsvizError(f"No family {args.family!r}: use one of {', '.join(families())}.")
    rows = zoo_table(specs, accounting=args.summary)
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        writer.writerows(rows)
        return 0
    for row in rows:
        extra = ""
        if args.summary:
            bits = f" + {row['mask_bits']:,} mask bits" if row.get("mask_bits") else ""
            extra = (f"  params {row['float_params']:>12,}{bits}  effective {row['effective_params']:>12,}"
                     f"  x{row['compression']:<6}  {row['gflops']:>9} GFLOPs")
        print(f"{row['name']:24s} {row['family']:12s} {row['input']:10s}{extra}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from wsviz.training.runstore import RunStore, default_root

    store = RunStore(args.runs_dir or default_root())  # a damaged database is moved aside and rebuilt here
    if store.recovery is not None:
        print(store.recovery.message())
    else:
        print(f"{store.db_path}: {store.rebuild().summary()}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from wsviz.models.convert import import_weights
    from wsviz.train import parse_set

    card = import_weights(args.model, args.weights, args.out, parse_set(args.set), dataset=args.dataset)
    size = (card.get("config") or {}).get("input_size")
    print(f"wrote {Path(args.out)}: {card['model']} ({card['imported_from']['layout']} layout, "
          f"{card['imported_from']['tensors']} tensors, {_params(card)}"
          + (f", {size}-px input" if size else "") + ")")
    print(NORMALISATION_NOTE)
    return 0


NORMALISATION_NOTE = (
    "note: every wsviz analysis feeds the model [0, 1] pixels with no mean/std normalisation; if these weights were "
    "trained on Normalize(mean, std) inputs, fold the normalisation into the model first (README: own models)")


def _params(card: dict) -> str:
    """A card's parameters as `models --summary` counts them: float parameters, plus sign-mask bits when any."""
    from wsviz.training.cards import card_float_params

    floats = card_float_params(card)
    bits = int(card.get("sign_mask_params") or 0)
    return (f"{floats:,} parameters" if floats is not None else "parameters unknown") + (
        f" + {bits:,} mask bits" if bits else "")


# ------------------------------------------------------------------------- helpers
def _check_folders(paths: Sequence[str]) -> None:
    """Refuse a --checkpoint that is a file (a state dict): the CLI reads checkpoint folders."""
    for p in paths:
        if Path(p).is_file():
            raise WsvizError(f"--checkpoint {p} is a file, not a checkpoint folder; the CLI reads folders holding "
                             "card.json + weights.safetensors. Turn a state dict into one with `python -m wsviz import "
                             f"--model NAME --weights {p} --out checkpoints/NAME` (python -m wsviz import --help).")


def model_names(paths: Sequence[str]) -> list[str]:
    """A name for each checkpoint folder: the shortest end of its path no other folder's path ends with
    (``m`` alone; ``a/m`` and ``b/m`` for two folders both called ``m``)."""
    parts = [Path(p).resolve().parts for p in paths]
    seen: dict[tuple, str] = {}
    for p, full in zip(paths, parts):
        if full in seen:
            raise WsvizError(f"--checkpoint names the same folder twice ({seen[full]} and {p}); give each once.")
        seen[full] = p
    names = []
    for i, full in enumerate(parts):
        k = 1
        while k < len(full) and any(other[-k:] == full[-k:] for j, other in enumerate(parts) if j != i):
            k += 1
        names.append("/".join(full[-k:]))
    return names


def _file_name(name: str) -> str:
    """A model name (``a/m``) as part of a file name (``a__m``)."""
    return name.replace("/", "__")


def _load(paths: Sequence[str], device=None, cards: dict | None = None) -> dict[str, object]:
    from wsviz.training.checkpoint import load_checkpoint

    if not paths:
        raise WsvizError("Give at least one --checkpoint folder (see checkpoints/README.md).")
    _check_folders(paths)
    models = {}
    for p, name in zip(paths, model_names(paths)):
        model, card = load_checkpoint(p, device=device or "cpu")
        models[name] = model
        if cards is not None:
            cards[name] = card
    return models


def _fresh_out(out: str, source: str | None = None) -> None:
    """Refuse an --out that would overwrite a checkpoint (the source's above all)."""
    from wsviz.training.cards import CARD, WEIGHTS

    folder = Path(out)
    if source is not None and folder.resolve() == Path(source).resolve():
        raise WsvizError(f"--out {out} is the source checkpoint itself; give a new folder for the result "
                         "(e.g. --out checkpoints/NAME-tied).")
    stopped = _stopped_run(folder)
    if stopped is not None:
        raise WsvizError(f"--out {out} holds a fine-tune that stopped after epoch {stopped.get('epochs_done')} of "
                         f"{stopped.get('epochs')} (killed or cancelled; its training state is kept beside it): "
                         f"continue it with its card's command and --resume: `{stopped['command']} --resume`; "
                         "or give a new folder for a new tie.")
    for f in (CARD, WEIGHTS):
        if (folder / f).exists():
            raise WsvizError(f"--out {out} already holds a checkpoint ({f}); give a new folder, or remove that one "
                             "first.")


def _stopped_run(folder: Path) -> dict | None:
    """The card of an unfinished training in ``folder`` that its training state can continue (a tie's
    fine-tune that was killed), or None."""
    from wsviz.training.cards import read_card
    from wsviz.training.state import state_path

    if not state_path(folder).is_file():
        return None
    try:
        card = read_card(folder)
    except WsvizError:
        return None
    command = card.get("command")
    return card if not card.get("complete") and isinstance(command, str) and "wsviz.train" in command else None


def _out(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["empty"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def _write_fig(path: Path, fig) -> None:
    fig.write_html(path, include_plotlyjs="directory")  # plotly.min.js once beside the pages: works offline
    print(f"wrote {path}")


class _Run:
    """One analysis process: its device, and under torchrun its rank (the process group is set up on
    entry, gloo on CPUs, nccl with one GPU per process, and torn down on exit)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import os

        from wsviz.device import pick_device

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local = 0, int(os.environ.get("LOCAL_RANK", "0"))
        wanted = getattr(args, "device", None)
        self.device = pick_device(wanted)
        self.owns_group = False
        if self.world > 1:
            import torch
            import torch.distributed as dist

            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.owns_group = True
            self.rank = dist.get_rank()

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if exc[0] is None:  # all ranks reach teardown before any closes its connections (gloo aborts
                dist.barrier()  # when a peer goes while it still talks to it); after an error, no waiting
            dist.destroy_process_group()

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs (rank 0; the only process without torchrun)."""
        return self.rank == 0

    def bar(self, desc: str, unit: str = "img"):
        """A progress callback ``(done, total, text)`` drawing a tqdm bar with ETA on rank 0, and the bar."""
        from tqdm import tqdm

        bar = tqdm(desc=desc, unit=unit, disable=not self.main, dynamic_ncols=True)

        def progress(done: int, total: int, text: str) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.update(done - bar.n)
        return progress, bar


def _cache(args: argparse.Namespace):
    from wsviz.analysis.cache import PredictionCache, default_cache

    if getattr(args, "no_cache", False):
        return None
    if getattr(args, "cache_dir", None):
        base = default_cache()
        return PredictionCache(args.cache_dir, base.max_bytes if base is not None else 512 * 2**20)
    return default_cache()


def _eval_transform(args: argparse.Namespace, cards: dict) -> str:
    """The evaluation transform of folder data: --eval-transform, else the checkpoints' recipe preset."""
    if args.eval_transform != "auto":
        return args.eval_transform
    presets = {str((c.get("train_config") or {}).get("augment", "none")) for c in cards.values()}
    return presets.pop() if len(presets) == 1 else "none"


def _data(args: argparse.Namespace, models: dict, cards: dict, limit: int | None):
    """The test split named by --dataset, at most ``limit`` images spread over it, read in batches."""
    from wsviz.data.stream import eval_data
    from wsviz.models import input_shape
    from wsviz.training.cards import evaluation_seed

    size = max(input_shape(m)[1] for m in models.values())
    return eval_data(args.dataset, "test", size=size, augment=_eval_transform(args, cards), limit=limit or None,
                     seed=evaluation_seed(cards, args.dataset))


def _save_predictions(path: Path, res) -> None:
    import numpy as np

    np.savez_compressed(path, values=res.values, **{f"model:{m}": p for m, p in res.predictions.items()})
    print(f"wrote {path}")


# ------------------------------------------------------------------------ analyses
def _kernels(args: argparse.Namespace) -> int:
    from wsviz.analysis.kernels import (
        default_layers,
        kernel_layers,
        kernel_set_comparisons,
        layer_weight,
        skeleton_groups,
        top_k_kernels,
    )
    from wsviz.figures import top_kernels_figure

    models = _load(args.checkpoint)
    out = _out(args)
    layers = {name: kernel_layers(m) for name, m in models.items()}
    defaults = default_layers(layers)  # twins: the same place; other skeletons: each its deepest layer
    groups = skeleton_groups(layers)
    if len(groups) > 1 and not args.layer:
        print("note: these models are built on different skeletons (" + " | ".join(", ".join(g) for g in groups)
              + "): a layer of one is not the same place as any layer of another. Each shows its deepest layer "
              "(most convolutions from the input) among its shared layers of 3x3 or more: "
              + "; ".join(f"{n}: {defaults[n]}" for n in layers if n in defaults) + ".", file=sys.stderr)
    panels, rows = {}, []
    for name, m in models.items():
        layer = args.layer or defaults[name]
        place = next((k for k in layers[name] if k.name == layer), None)  # None: a 4-D parameter named directly
        top = top_k_kernels(layer_weight(m, layer), args.k, distinct=args.distinct,
                            applied=place.applications() if place is not None else None)
        panels[f"{name} · {layer}"] = top.kernels
        rows += [{"model": name, "layer": layer, "rank": i + 1, "out": int(o), "in": int(c), "magnitude": float(g),
                  "positions": int(n)}
                 for i, (o, c, g, n) in enumerate(zip(top.out_index, top.in_index, top.magnitude, top.copies))]
    _write_csv(out / "top_kernels.csv", rows)
    sims = kernel_set_comparisons(panels)
    if sims:
        _write_csv(out / "kernel_similarity.csv", sims)
    what = "different kernels" if args.distinct else "kernels"
    title = f"Top-{args.k} {what} by magnitude"
    if any(len(p) < args.k for p in panels.values()):  # a layer with fewer shows all it has: say how many each
        title = f"Top {what} by magnitude, k = {args.k}: " + ", ".join(
            f"{n.split(' · ')[0]} {len(p)}" + (" (all it has)" if len(p) < args.k else "") for n, p in panels.items())
    _write_fig(out / "top_kernels.html", top_kernels_figure(panels, title=title, scale=args.scale))
    return 0


def _sweep(args: argparse.Namespace, kind: str) -> int:
    from dataclasses import replace

    from wsviz.analysis.sweeps import model_label_mismatch, rotation_sweep, scale_sweep
    from wsviz.figures import sweep_figure

    with _Run(args) as run:
        cards: dict = {}
        models = _load(args.checkpoint, run.device, cards)
        # an accuracy against labels a model never learned means nothing: those models get agreement only
        blind = {n: why for n, m in models.items() if (why := model_label_mismatch(m, cards.get(n), args.dataset))}
        data = _data(args, models, cards, args.limit)
        fn = scale_sweep if kind == "scale" else rotation_sweep
        progress, bar = run.bar(f"{kind} sweep", "img×value")
        values = {"scales" if kind == "scale" else "angles": args.values} if args.values else {}
        res = fn(models, data, batch_size=args.batch_size, workers=args.workers, loader=args.loader,
                 cache=_cache(args), progress=progress, **values)
        bar.close()
        if not run.main:
            return 0
        for name, why in blind.items():
            res.accuracy[name] = np.full(len(res.values), np.nan)
            print(f"note: {name}: no accuracy on {args.dataset} (agreement only): {why}", file=sys.stderr)
        out = _out(args)
        _write_csv(out / f"{kind}_sweep.csv", res.rows())
        _save_predictions(out / f"{kind}_predictions.npz", res)
        info = {"dataset": args.dataset, "data": data.description, "transform": data.transform,
                "samples": res.samples, "samples_per_rank": res.shares, "ranks": run.world,
                "results_from_cache": res.cached, "values": res.values.tolist(),
                "agreement_only": blind}
        (out / f"{kind}_sweep.json").write_text(json.dumps(info, indent=1))
        print(f"{res.samples:,} images ({' + '.join(map(str, res.shares)) or 'all from the cache'} over "
              f"{run.world} process{'es' if run.world > 1 else ''}); {res.cached} results from the cache")
        scored = {m: a for m, a in res.accuracy.items() if m not in blind}
        if scored:
            _write_fig(out / f"{kind}_accuracy.html", sweep_figure(replace(res, accuracy=scored), "accuracy"))
        _write_fig(out / f"{kind}_agreement.html", sweep_figure(res, "agreement"))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from wsviz.analysis.stats import fair_comparison, group_by_test_set, pairwise_significance
    from wsviz.figures import fair_figure

    _check_folders(args.checkpoint)
    if args.dataset is None:  # said here in the CLI's words (fair_comparison says it in Python's)
        from wsviz.training.cards import CARD, read_card

        for p in args.checkpoint:
            if (Path(p) / CARD).is_file() and not read_card(p).get("dataset"):
                raise WsvizError(f"The card in {p} names no dataset; pass --dataset NAME to say where to evaluate it.")
    with _Run(args) as run:
        progress, bar = run.bar("evaluating")
        rows = fair_comparison(args.checkpoint, dataset=args.dataset, device=str(run.device),
                               batch_size=args.batch_size, workers=args.workers, loader=args.loader,
                               cache=_cache(args), progress=progress, limit=args.limit)
        bar.close()
        if not run.main:
            return 0
        out = _out(args)
        groups, skipped = group_by_test_set(rows)
        test_set = {k: g.label for g in groups for k in g.rows}
        table = [{"name": r.name, "model": r.model, "dataset": r.dataset, "test_set": test_set[k],
                  "accuracy": r.accuracy, "images": len(r.labels), "split_images": r.split_images,
                  "card_accuracy": r.card_accuracy, "params": r.float_params,
                  "unique_params": r.unique_params,
                  "effective_params": r.effective_params, "flops": r.flops} for k, r in enumerate(rows)]
        _write_csv(out / "fair_comparison.csv", table)
        for r in rows:
            on = f" on {len(r.labels):,} of {r.split_images:,} test images (the card's is of all)" \
                if r.split_images and len(r.labels) < r.split_images else ""
            print(f"{r.name}: {r.accuracy:.4f} on {r.dataset}{on}")
        if skipped:
            _write_csv(out / "skipped_pairs.csv", [{"a": rows[s.i].name, "b": rows[s.j].name, "reason": s.reason}
                                                   for s in skipped])
            for s in skipped:
                print(f"not compared: {rows[s.i].name} vs {rows[s.j].name}: {s.reason}")
        pairs = pairwise_significance(rows)
        _write_csv(out / "significance.csv", [{"a": rows[p.i].name, "b": rows[p.j].name, "dataset": p.dataset,
                                                "p_value": p.comparison.mcnemar.p_value, "p_holm": p.p_holm,
                                                "diff": p.comparison.diff_ci.diff, "lo": p.comparison.diff_ci.lo,
                                                "hi": p.comparison.diff_ci.hi, "summary": p.comparison.summary}
                                               for p in pairs])
        for p in pairs:
            print(p.comparison.summary)
        _write_fig(out / "accuracy_vs_params.html", fair_figure(table, "params"))
        _write_fig(out / "accuracy_vs_flops.html", fair_figure(table, "flops"))
    return 0


def _attribution(args: argparse.Namespace) -> int:
    from wsviz.analysis import attribution
    from wsviz.analysis.embeddings import model_inputs
    from wsviz.data import stream
    from wsviz.data.uploads import load_upload
    from wsviz.figures import attribution_figure
    from wsviz.models import input_shape
    from wsviz.training.cards import upload_layout

    cards: dict = {}
    models = _load(args.checkpoint, cards=cards)
    out = _out(args)
    data = Path(args.image).read_bytes() if args.image else None
    if data is None:  # a gallery of --limit test images spread over the split, only those decoded (once, for all)
        gallery = _data(args, models, cards, args.limit or 1)
        images, labels = stream.take(gallery, batch_size=args.batch_size, workers=args.workers)
        ids = [int(i) for i in (gallery.indices if gallery.indices is not None else range(len(gallery)))]
        shown = f"test image {ids[0]} of {args.dataset}" + (f" (label {int(labels[0])})" if labels is not None
                                                            else "")
        if len(ids) > 1:
            shown += f", the first of {len(ids)} explained (all in attribution.csv and the .npy files)"
    else:
        ids, labels, shown = [Path(args.image).name], None, Path(args.image).name
    maps, inputs, notes, rows, warnings = {}, {}, {}, [], []
    for name, m in models.items():
        if data is not None:  # each model's own input: its size, and its training set's layout of the file
            c, s, _ = input_shape(m)
            x = load_upload(data, Path(args.image).name, c, s, dataset=(cards.get(name) or {}).get("dataset"),
                            layout=upload_layout(c, cards.get(name) or {})).unsqueeze(0)
        else:
            x = model_inputs(m, images)
        res = attribution.attribute(m, x, args.method, layer=args.layer, batch_size=args.batch_size)
        grid = f"{res.grid[0]}x{res.grid[1]}" if res.grid else ""
        panel = f"{name} → {int(res.targets[0])}" + (f" @ {res.layer}" if res.layer else "") + (
            f" ({grid})" if grid else "")
        maps[panel], inputs[panel] = res.maps[0].numpy(), x[0].mean(0).numpy()
        rel = res.relative_delta
        if rel is not None:
            notes[panel] = res.completeness_note(0)
            if res.capped is not None and res.capped.any():
                warnings.append(f"{name}: Integrated Gradients of {int(res.capped.sum())} image(s) still off by more "
                                f"than {attribution.IG_TOLERANCE:.0%} at {attribution.IG_MAX_STEPS} steps (see "
                                "relative_delta in attribution.csv)")
        if res.grid and min(res.grid) <= attribution.COARSE_CAM:
            warnings.append(f"{name}: Grad-CAM at {res.layer} is a {grid} map: a few numbers upsampled, each cell "
                            "responding to nearly the whole input; --layer an earlier one for a finer map")
        rows += [{"model": name, "image": ids[i], "label": "" if labels is None else int(labels[i]),
                  "method": args.method, "target": int(t), "layer": res.layer or "", "grid": grid,
                  "ig_steps": "" if res.ig_steps is None else int(res.ig_steps[i]),
                  "relative_delta": "" if rel is None else float(rel[i])}
                 for i, t in enumerate(res.targets)]
        np.save(out / f"attribution_{_file_name(name)}.npy", res.maps.numpy() if len(res.maps) > 1 else res.maps[0].numpy())
    for w in warnings:
        print(f"note: {w}", file=sys.stderr)
    _write_csv(out / "attribution.csv", rows)
    _write_fig(out / "attribution.html", attribution_figure(inputs, maps, f"{args.method.replace('_', ' ')} of {shown}",
                                                           signed=args.method == "integrated_gradients", notes=notes))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from wsviz.analysis.embeddings import penultimate_features, project
    from wsviz.data.stream import sample_indices
    from wsviz.figures import embedding_figure

    cards: dict = {}
    models = _load(args.checkpoint, cards=cards)
    full = _data(args, models, cards, None)
    # a stated, seeded subset of the split: only its images are read, only its features kept
    data = full.subset(sample_indices(len(full), args.limit)) if args.limit and args.limit < len(full) else full
    if data is not full:
        print(f"embedding {data.description} (seeded random subset)")
    out = _out(args)
    labels = data.labels.numpy()
    for name, m in models.items():
        feats = penultimate_features(m, data, workers=args.workers)
        proj = project(feats, args.method, max_points=max(3, len(feats)))
        color = labels[proj.index]
        color_name = "class"
        if args.color_by == "angle" and data.angles is not None:
            color, color_name = data.angles.numpy()[proj.index], "angle"
        elif args.color_by == "scale" and data.scales is not None:
            color, color_name = data.scales.numpy()[proj.index], "scale"
        rows_index = data.indices[proj.index] if data.indices is not None else proj.index
        _write_csv(out / f"embedding_{_file_name(name)}.csv", [{"index": int(i), "x": float(a), "y": float(b), color_name: float(c)}
                                                    for i, (a, b), c in zip(rows_index, proj.coords, color)])
        _write_fig(out / f"embedding_{_file_name(name)}.html",
                   embedding_figure(proj.coords, color, color_name, f"{name}: {args.method.upper()} of penultimate features"))
    return 0


def _cka(args: argparse.Namespace) -> int:
    from wsviz.analysis.similarity import cka_matrix
    from wsviz.figures import cka_figure

    cards: dict = {}
    models = _load(args.checkpoint, cards=cards)
    if len(models) != 2:
        raise WsvizError("cka compares exactly two --checkpoint folders.")
    (na, a), (nb, b) = models.items()
    data = _data(args, models, cards, None)
    res = cka_matrix(a, b, data, max_images=args.limit or len(data), workers=args.workers)
    if res.subset:
        print(f"CKA on {res.subset}")
    out = _out(args)
    _write_csv(out / "cka.csv", [{"a": ta, "b": tb, "cka": float(res.matrix[i, j])}
                                 for i, ta in enumerate(res.taps_a) for j, tb in enumerate(res.taps_b)])
    _write_fig(out / "cka.html", cka_figure(res.matrix, res.taps_a, res.taps_b, na, nb))
    (out / "cka.json").write_text(json.dumps({"a": na, "b": nb, "taps_a": res.taps_a, "taps_b": res.taps_b,
                                              "matrix": res.matrix.tolist(), "images": res.images,
                                              "subset": res.subset or f"all {res.images:,} images of {data.description}"}))
    return 0


def _opportunities(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from wsviz.analysis.opportunities import choose_groups, find_opportunities
    from wsviz.data.datasets import fit_to
    from wsviz.data.stream import eval_data, take
    from wsviz.models import input_shape

    cards: dict = {}
    models = _load(args.checkpoint, cards=cards)
    if len(models) != 1:
        raise WsvizError("opportunities scores one --checkpoint folder at a time.")
    (name, model), = models.items()
    args.dataset = args.dataset or cards[name].get("dataset") or "mnist5k-scale"
    # bounded batches of a dataset of any size: only the chosen images are decoded
    c, size, _ = input_shape(model)
    from wsviz.training.cards import evaluation_seed

    cal_x, cal_y = take(eval_data(args.dataset, "train", size=size, augment=_eval_transform(args, cards),
                                  limit=args.calibration, seed=evaluation_seed(cards, args.dataset)))
    calibration = (fit_to(cal_x.float().div(255) if cal_x.dtype == torch.uint8 else cal_x, c, size), cal_y)
    held = take(_data(args, models, cards, args.limit))
    groups = [g.split(",") for g in args.group] if args.group else None
    bar = tqdm(unit="group", desc=name)

    def progress(i: int, n: int, group: str) -> None:
        bar.total, bar.n = n, i
        bar.set_postfix_str(group[:60])

    if args.budget is not None and args.budget <= 0:
        raise WsvizError(f"--budget must be a positive number of parameters to save, got {args.budget}.")
    found = find_opportunities(model, calibration[0], calibration[1], groups=groups, held_out=held,
                               progress=progress)
    rows = found.rows
    bar.n = bar.total or 0
    bar.close()
    out = _out(args)
    (out / "stage_similarity.json").write_text(json.dumps([
        {"stage": s.stage, "role": s.role, "layers": list(s.layers), "weight_similarity": s.weight_similarity.tolist(),
         "output_cka": s.output_cka.tolist()} for s in found.stages]))
    _write_csv(out / "opportunities.csv", [{"group": " + ".join(r.group), "params_saved": r.params_saved,
                                            "predicted_cost": r.predicted_cost,
                                            "weight_similarity": r.weight_similarity, "output_cka": r.output_cka,
                                            "gradient_conflict": r.gradient_conflict,
                                            "measured_drop_pts": r.measured_drop,
                                            "measured_loss_rise": r.measured_loss,
                                            "measured_kl": r.measured_kl} for r in rows])
    for r in rows[:10]:
        print(f"cost {r.predicted_cost:.2f}  {r.measured_drop:+6.2f} pts now  saves {r.params_saved:>9,}  "
              f"{' + '.join(r.group)}")
    if args.budget is not None:
        choices = choose_groups(model, rows, args.budget, calibration[0], held, verify=args.verify)
        _write_csv(out / "choices.csv", [{"groups": " | ".join(" + ".join(g) for g in c.groups),
                                          "params_saved": c.params_saved, "predicted_kl": c.predicted,
                                          "measured_kl": c.measured_kl, "measured_drop_pts": c.measured_drop,
                                          "measured_loss_rise": c.measured_loss} for c in choices])
        best = choices[0]
        measured = (f"KL {best.measured_kl:.4f}, {best.measured_drop:+.2f} pts measured with all tied now"
                    if best.measured is not None else f"KL {best.predicted:.4f} predicted")
        print(f"to save {args.budget:,} parameters: tie {' | '.join(' + '.join(g) for g in best.groups)} "
              f"(saves {best.params_saved:,}; {measured}); pass these as --group to `python -m wsviz tie`")
        if not best.complete:
            print("the search for disjoint sets was cut short (too many candidates): a cheaper set than these may "
                  "exist; pass fewer candidate groups (--group) to search them all", file=sys.stderr)
    return 0


def _tie(args: argparse.Namespace) -> int:
    import shlex

    from wsviz.training.checkpoint import load_checkpoint, save_checkpoint
    from wsviz.training.loop import evaluate
    from wsviz.training.tying import TieSpec, finetune_config, parse_groups, tie_checkpoint, tied_card

    if len(args.checkpoint) != 1:
        raise WsvizError("tie takes one --checkpoint folder (the trained model to tie).")
    source = args.checkpoint[0]
    if args.finetune_epochs and args.limit:
        raise WsvizError("--limit applies only without --finetune-epochs: a fine-tune is tested on the whole test "
                         "split, as any training run; drop --limit (or --finetune-epochs, to measure the tie alone on N images).")
    _check_folders([source])
    _fresh_out(args.out, source)  # before anything runs: a tied model never replaces a checkpoint
    spec = TieSpec(parse_groups(args.group), args.init, args.calibration)
    if args.finetune_epochs:
        from wsviz.train import tensorboard_dir
        from wsviz.training.cards import read_card
        from wsviz.training.run import run_training

        card0 = read_card(source)
        cfg = finetune_config(args.finetune_epochs, args.lr, batch_size=args.batch_size, max_batches=args.max_batches,
                              seed=args.seed, distill=not args.labels_only)
        card = run_training(card0["model"], args.dataset or card0.get("dataset"), args.out, cfg, init_from=source,
                            tie=spec, data_seed=card0.get("data_seed", 0), tensorboard=tensorboard_dir(args.out))
        print(f"wrote {args.out}: {len(spec.groups)} group(s) tied ({spec.init}), {_params(card)};"
              f" test accuracy {card['tied']['source_test_accuracy']} untied, "
              f"{card['tied']['accuracy_after_tying']:.4f} right after tying, {card['test_accuracy']:.4f} after "
              f"{args.finetune_epochs} fine-tuning epoch(s)")
        return 0
    model0, card0 = load_checkpoint(source)
    tied, card0 = tie_checkpoint(source, spec, dataset=args.dataset, loaded=(model0, card0))
    dataset = args.dataset or card0["dataset"]
    from wsviz.data.stream import model_sample
    from wsviz.training.cards import evaluation_transform

    images, labels, total = model_sample(dataset, "test", tied, args.limit, seed=card0.get("data_seed", 0),
                                         augment=evaluation_transform(card0, dataset))
    limited = len(labels) < total
    acc = evaluate(tied, images, labels)[1]
    if limited:  # the untied model on the very same images: the card's accuracy is of the whole split
        untied = f"{evaluate(model0, images, labels)[1]:.4f} untied"
        on = f" on {len(labels):,} of {total:,} test images"
    else:
        untied, on = f"{card0.get('test_accuracy')} untied", ""
    command = "python -m wsviz " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["tie"] else ""
    card = tied_card(tied, card0, acc, command, test_limit=len(labels) if limited else None)
    save_checkpoint(args.out, tied, card)
    print(f"wrote {args.out}: {len(spec.groups)} group(s) tied ({spec.init}), {_params(card)} "
          f"(was {_params(card0)}); test accuracy{on} {untied}, {acc:.4f} tied "
          "(BatchNorm re-estimated, no fine-tuning)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m wsviz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list registered models (with --summary: params and FLOPs)")
    p.add_argument("pattern", nargs="?", default=None, help="only names matching this wildcard, e.g. 'msws_*'")
    p.add_argument("--family", help="only this family")
    p.add_argument("--name", nargs="*", help="only these model names")
    p.add_argument("--summary", action="store_true", help="build each model and count params/FLOPs")
    p.add_argument("--csv", action="store_true", help="write CSV to stdout")
    p.set_defaults(func=_models)
    p = sub.add_parser("import", help="turn a PyTorch state dict (.pt/.pth/.safetensors) into a wsviz checkpoint",
                       description="Read a state dict with torch.load(weights_only=True) (.pt/.pth; no code runs) or "
                                   "safetensors, map torchvision's ResNet keys onto wsviz's, and write a checkpoint "
                                   "folder (weights.safetensors + card.json) the app lists. Refuses an --out that already holds "
                                   "a checkpoint. wsviz feeds [0, 1] pixels with no mean/std normalisation: weights "
                                   "trained on Normalize(mean, std) inputs need it folded into the model first.")
    p.add_argument("--model", required=True, help="a registered model (python -m wsviz models)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. sharing=vanilla or shared=false (repeatable); --set input_size=N: the "
                        "input size the weights were trained at (default: --dataset's image size when given, else "
                        "the model's)")
    p.add_argument("--weights", required=True, help="the state dict: a .pt / .pth or .safetensors file")
    p.add_argument("--out", required=True, help="the checkpoint folder to write (e.g. checkpoints/NAME)")
    p.add_argument("--dataset", default=None, help="what the weights were trained on (a wsviz dataset name), so "
                                                   "the app can evaluate them; the model takes its image size "
                                                   "unless --set input_size=N says otherwise")
    p.set_defaults(func=_import)
    p = sub.add_parser("runs", help="the run store: `runs rebuild` brings back runs from their folders")
    p.add_argument("action", choices=["rebuild"],
                   help="rebuild: move a damaged store aside and restore every run from its folder")
    p.add_argument("--runs-dir", default=None, help="runs folder (default: $WSVIZ_RUNS or ./runs)")
    p.set_defaults(func=_runs)

    def analysis(name: str, help: str, func, dataset: str | None = "mnist5k", limit: int | None = 1000,
                 streamed: bool = True, transform: bool = True,
                 out_help: str = "folder for CSV/JSON and HTML figures"):
        q = sub.add_parser(name, help=help)
        q.add_argument("--checkpoint", nargs="+", default=[], help="checkpoint folders")
        q.add_argument("--out", required=True, help=out_help)
        if dataset is not None:
            q.add_argument("--dataset", default=dataset,
                           help="test data: a dataset name (mnist5k, cifar10, ...) or folder:PATH (ImageNet's "
                                "train/ + val/ layout, or one folder per class), under WSVIZ_DATA_ROOTS")
        q.add_argument("--limit", type=int, default=limit,
                       help="images used (spread over the test split; 0: all)")
        if streamed:
            q.add_argument("--batch-size", type=int, default=256, help="images per batch")
            q.add_argument("--workers", type=int, default=0, help="DataLoader worker processes reading the images")
        if streamed and transform:
            q.add_argument("--eval-transform", default="auto", choices=["auto", "none", "cifar", "imagenet"],
                           help="how folder images are brought to the model's input size: the recipe preset's "
                                "evaluation transform (imagenet: resize to 8/7 and centre crop; none: letterbox); "
                                "auto: the checkpoints' own preset")
        q.set_defaults(func=func)
        return q

    def evaluation(q):
        q.add_argument("--loader", default="auto", choices=["auto", "memory", "stream"],
                       help="in-memory sets: slice tensors (memory) or read them through a DataLoader (stream); "
                            "folders always stream")
        q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: a GPU when visible; under "
                                                      "torchrun the process's own GPU)")
        q.add_argument("--no-cache", action="store_true",
                       help="do not read or write the prediction cache (WSVIZ_CACHE_DIR, default "
                            "~/.cache/wsviz/predictions)")
        q.add_argument("--cache-dir", default=None, help="the prediction cache's folder (default: WSVIZ_CACHE_DIR)")
        return q

    q = analysis("kernels", "top-k kernels by magnitude, side by side, with similarity scores", _kernels, None,
                 streamed=False)
    q.add_argument("--layer", default=None,
                   help="kernel layer, a module path (default: the same place in every model, preferring the "
                        "deepest shared 3x3 layer)")
    q.add_argument("--k", type=int, default=256)
    q.add_argument("--distinct", action=argparse.BooleanOptionalAction, default=True,
                   help="each different kernel once, with the number of (out, in) positions applying it (a tiled "
                        "RepeatNet layer repeats its stored kernels); --no-distinct: the k strongest positions")
    q.add_argument("--scale", default="shared", choices=["shared", "per_kernel"],
                   help="one colour scale in weight units for all panels, or each kernel to its own max")
    q = evaluation(analysis("scale", "accuracy and agreement vs input scale (torchrun: split over processes)",
                            lambda a: _sweep(a, "scale")))
    q.add_argument("--values", type=float, nargs="*", default=None, help="scale factors")
    q = evaluation(analysis("rotation", "accuracy and agreement vs rotation angle (torchrun: split over processes)",
                            lambda a: _sweep(a, "rotation")))
    q.add_argument("--values", type=float, nargs="*", default=None, help="angles in degrees")
    q = evaluation(analysis("compare", "accuracy vs params vs FLOPs, with McNemar tests and Newcombe paired intervals",
                            _compare, None, None, transform=False))
    q.add_argument("--dataset", default=None, help="evaluate all on this dataset (default: each card's)")
    q = analysis("attribution", "Integrated Gradients / Saliency / Grad-CAM for one image or a gallery of test "
                 "images", _attribution, "mnist5k", 1)
    q.add_argument("--image", default=None, help="an image file (default: --limit images of --dataset's test split)")
    q.add_argument("--method", default="integrated_gradients",
                   choices=["integrated_gradients", "saliency", "grad_cam"])
    q.add_argument("--layer", default=None,
                   help="Grad-CAM layer, a module path (default: the deepest spatial map the classifier reads; "
                        "an unknown path lists the choices)")
    q.set_defaults(batch_size=16)  # images attributed at once (each with its gradients), not 256
    q = analysis("embed", "PCA / t-SNE / UMAP of penultimate features (of a seeded subset of --limit images)",
                 _embed, "mnist5k-rot", 2000)
    q.add_argument("--method", default="pca", choices=["pca", "tsne", "umap"])
    q.add_argument("--color-by", default="class", choices=["class", "angle", "scale"])
    analysis("cka", "linear CKA between the layers of two models (on a seeded subset of --limit images)", _cka,
             "mnist5k", 500)
    q = analysis("opportunities", "where sharing costs least: candidate conv groups scored by weight similarity, "
                 "output CKA, gradient conflict and the accuracy lost by tying them now", _opportunities,
                 None, 500)
    q.add_argument("--dataset", default=None,
                   help="calibration and test data (default: the checkpoint card's dataset, else mnist5k-scale)")
    q.add_argument("--calibration", type=int, default=512, help="training images for calibration and BatchNorm")
    q.add_argument("--group", action="append", default=[],
                   help="a group to score, as comma-separated conv paths (repeatable; default: every candidate)")
    q.add_argument("--budget", type=int, default=None,
                   help="also choose disjoint groups that save at least this many parameters at the least measured "
                        "cost (KL from the untied predictions; written to choices.csv)")
    q.add_argument("--verify", type=int, default=8,
                   help="with --budget: how many of the best-predicted sets to tie together and measure (default 8)")
    q = analysis("tie", "make groups of a trained model's convolutions share one weight; optionally fine-tune",
                 _tie, None, None, streamed=False,
                 out_help="the new checkpoint folder to write (card.json + weights.safetensors); refused when it "
                          "already holds a checkpoint or is the source")
    q.add_argument("--dataset", default=None, help="calibration and test data (default: the checkpoint's)")
    q.add_argument("--group", action="append", default=[], required=True,
                   help="conv layers that will share one weight, comma-separated (repeatable)")
    q.add_argument("--init", default="lstsq", choices=["mean", "medoid", "lstsq", "lstsq-bn"],
                   help="the shared weight's start: the members' mean, medoid, the least-squares kernel that best "
                        "reproduces their outputs on calibration images (lstsq, default), or lstsq-bn: that kernel with "
                        "each member's input channels rescaled by its own preceding BatchNorm (better right after tying)")
    q.add_argument("--calibration", type=int, default=512, help="training images for lstsq and BatchNorm")
    q.add_argument("--finetune-epochs", type=int, default=0,
                   help="then fine-tune for this many epochs, an ordinary training run writing --out (card, "
                        "TensorBoard beside it); 0: save the tied model as it is")
    q.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (a cosine annealed every step)")
    q.add_argument("--labels-only", action="store_true",
                   help="fine-tune from the labels alone; by default the tied model learns half from the untied one's "
                        "predictions (distillation, T = 4) and half from the labels, its tied blocks' outputs are "
                        "pulled to the untied model's (feature distillation, weight 3), and it ends with its last 15 "
                        "steps' weights averaged, the recipe checkpoints/REPORT.md measures")
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--max-batches", type=int, default=None, help="cap the fine-tuning steps per epoch")
    q.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WsvizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)


def entry() -> None:
    """The ``wsviz`` console command (installed with the package): ``python -m wsviz`` by another name."""
    from wsviz.cli_errors import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
