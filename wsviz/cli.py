"""``python -m wsviz ...``: every analysis headless, writing the tables (CSV/JSON) and the
figures (plotly HTML) the app shows.

    python -m wsviz models --summary
    python -m wsviz kernels  --checkpoint checkpoints/scale-msws-vanilla checkpoints/scale-msws-shared --out out/
    python -m wsviz scale    --checkpoint checkpoints/scale-* --dataset mnist5k --out out/
    python -m wsviz rotation --checkpoint checkpoints/rot-* --dataset mnist5k --out out/
    python -m wsviz compare  --checkpoint checkpoints/scale-* --out out/
    python -m wsviz attribution --checkpoint checkpoints/scale-resnet20 --image digit.png --out out/
    python -m wsviz embed    --checkpoint checkpoints/rot-cnn --dataset mnist5k-rot --method umap --out out/
    python -m wsviz cka      --checkpoint checkpoints/scale-msws-vanilla checkpoints/scale-msws-shared --out out/
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
    print(f"wrote {Path(args.out)}: {card['model']} ({card['imported_from']['layout']} layout, "
          f"{card['imported_from']['tensors']} tensors, {card['unique_params']:,} parameters)")
    return 0


# ------------------------------------------------------------------------- helpers
def _load(paths: Sequence[str]) -> dict[str, object]:
    from wsviz.training.checkpoint import load_checkpoint

    if not paths:
        raise WsvizError("Give at least one --checkpoint folder (see checkpoints/README.md).")
    models = {}
    for p in paths:
        model, _ = load_checkpoint(p)
        models[Path(p).name] = model
    return models


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


def _test_data(dataset: str, limit: int | None, seed: int = 0):
    from wsviz.data.datasets import load_split

    te = load_split(dataset, "test", seed=seed).spread(limit)
    return te.images, te.labels


# ------------------------------------------------------------------------ analyses
def _kernels(args: argparse.Namespace) -> int:
    from wsviz.analysis.kernels import (
        default_layers,
        kernel_layers,
        kernel_set_similarity,
        layer_weight,
        random_kernel_similarity,
        top_k_kernels,
    )
    from wsviz.figures import top_kernels_figure

    models = _load(args.checkpoint)
    out = _out(args)
    layers = {name: kernel_layers(m) for name, m in models.items()}
    defaults = default_layers(layers)  # the same place in every model, preferring a shared layer
    panels, rows = {}, []
    for name, m in models.items():
        layer = args.layer or defaults[name]
        top = top_k_kernels(layer_weight(m, layer), args.k)
        panels[f"{name} · {layer}"] = top.kernels
        rows += [{"model": name, "layer": layer, "rank": i + 1, "out": int(o), "in": int(c), "magnitude": float(g)}
                 for i, (o, c, g) in enumerate(zip(top.out_index, top.in_index, top.magnitude))]
    _write_csv(out / "top_kernels.csv", rows)
    names = list(panels)
    sims = [{"a": a, "b": b, "similarity": kernel_set_similarity(panels[a], panels[b]),
             "two_random_sets": random_kernel_similarity(*panels[a].shape)}
            for i, a in enumerate(names) for b in names[i + 1:]
            if panels[a].shape[1:] == panels[b].shape[1:] and len(panels[a]) == len(panels[b])]
    if sims:
        _write_csv(out / "kernel_similarity.csv", sims)
    _write_fig(out / "top_kernels.html", top_kernels_figure(panels, title=f"Top-{args.k} kernels by magnitude",
                                                            scale=args.scale))
    return 0


def _sweep(args: argparse.Namespace, kind: str) -> int:
    from wsviz.analysis.sweeps import rotation_sweep, scale_sweep
    from wsviz.figures import sweep_figure

    models = _load(args.checkpoint)
    x, y = _test_data(args.dataset, args.limit)
    fn = scale_sweep if kind == "scale" else rotation_sweep
    res = fn(models, x, y, args.values) if args.values else fn(models, x, y)
    out = _out(args)
    _write_csv(out / f"{kind}_sweep.csv", res.rows())
    _write_fig(out / f"{kind}_accuracy.html", sweep_figure(res, "accuracy"))
    _write_fig(out / f"{kind}_agreement.html", sweep_figure(res, "agreement"))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from wsviz.analysis.stats import fair_comparison, group_by_test_set, pairwise_significance
    from wsviz.figures import fair_figure

    rows = fair_comparison(args.checkpoint, dataset=args.dataset)
    out = _out(args)
    groups, skipped = group_by_test_set(rows)
    test_set = {k: g.label for g in groups for k in g.rows}
    table = [{"name": r.name, "model": r.model, "dataset": r.dataset, "test_set": test_set[k], "accuracy": r.accuracy,
              "card_accuracy": r.card_accuracy, "params": r.float_params, "unique_params": r.unique_params,
              "effective_params": r.effective_params, "flops": r.flops} for k, r in enumerate(rows)]
    _write_csv(out / "fair_comparison.csv", table)
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
    from wsviz.analysis.attribution import attribute
    from wsviz.data.uploads import load_upload
    from wsviz.figures import attribution_figure
    from wsviz.models import input_shape

    models = _load(args.checkpoint)
    out = _out(args)
    data = Path(args.image).read_bytes() if args.image else None
    maps, rows, image = {}, [], None
    for name, m in models.items():
        c, s, _ = input_shape(m)
        x = (load_upload(data, Path(args.image).name, c, s) if data is not None else _test_data("mnist5k", 1)[0][0])
        image = x.mean(0).numpy() if image is None else image
        res = attribute(m, x.unsqueeze(0), args.method, layer=args.layer)
        maps[f"{name} → {int(res.targets[0])}" + (f" @ {res.layer}" if res.layer else "")] = res.maps[0].numpy()
        rows.append({"model": name, "method": args.method, "target": int(res.targets[0]), "layer": res.layer or ""})
        np.save(out / f"attribution_{name}.npy", res.maps[0].numpy())
    _write_csv(out / "attribution.csv", rows)
    _write_fig(out / "attribution.html", attribution_figure(image, maps, f"{args.method}",
                                                           signed=args.method == "integrated_gradients"))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from wsviz.analysis.embeddings import penultimate_features, project
    from wsviz.data.datasets import load_split
    from wsviz.figures import embedding_figure

    models = _load(args.checkpoint)
    te = load_split(args.dataset, "test")
    out = _out(args)
    for name, m in models.items():
        feats = penultimate_features(m, te.images)
        proj = project(feats, args.method, max_points=args.limit)
        color = te.labels.numpy()[proj.index]
        color_name = "class"
        if args.color_by == "angle" and te.angles is not None:
            color, color_name = te.angles.numpy()[proj.index], "angle"
        elif args.color_by == "scale" and te.scales is not None:
            color, color_name = te.scales.numpy()[proj.index], "scale"
        _write_csv(out / f"embedding_{name}.csv", [{"index": int(i), "x": float(a), "y": float(b), color_name: float(c)}
                                                    for i, (a, b), c in zip(proj.index, proj.coords, color)])
        _write_fig(out / f"embedding_{name}.html",
                   embedding_figure(proj.coords, color, color_name, f"{name}: {args.method.upper()} of penultimate features"))
    return 0


def _cka(args: argparse.Namespace) -> int:
    from wsviz.analysis.similarity import cka_matrix
    from wsviz.figures import cka_figure

    models = _load(args.checkpoint)
    if len(models) != 2:
        raise WsvizError("cka compares exactly two --checkpoint folders.")
    (na, a), (nb, b) = models.items()
    x, _ = _test_data(args.dataset, args.limit)
    res = cka_matrix(a, b, x)
    out = _out(args)
    _write_csv(out / "cka.csv", [{"a": ta, "b": tb, "cka": float(res.matrix[i, j])}
                                 for i, ta in enumerate(res.taps_a) for j, tb in enumerate(res.taps_b)])
    _write_fig(out / "cka.html", cka_figure(res.matrix, res.taps_a, res.taps_b, na, nb))
    (out / "cka.json").write_text(json.dumps({"a": na, "b": nb, "taps_a": res.taps_a, "taps_b": res.taps_b,
                                              "matrix": res.matrix.tolist()}))
    return 0


def _opportunities(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from wsviz.analysis.opportunities import score_groups
    from wsviz.data.datasets import load_split

    models = _load(args.checkpoint)
    if len(models) != 1:
        raise WsvizError("opportunities scores one --checkpoint folder at a time.")
    (name, model), = models.items()
    calibration = load_split(args.dataset, "train").spread(args.calibration)
    held = _test_data(args.dataset, args.limit)
    groups = [g.split(",") for g in args.group] if args.group else None
    bar = tqdm(unit="group", desc=name)

    def progress(i: int, n: int, group: str) -> None:
        bar.total, bar.n = n, i
        bar.set_postfix_str(group[:60])

    rows = score_groups(model, calibration.images, calibration.labels, groups=groups, held_out=held,
                        progress=progress)
    bar.n = bar.total or 0
    bar.close()
    out = _out(args)
    _write_csv(out / "opportunities.csv", [{"group": " + ".join(r.group), "params_saved": r.params_saved,
                                            "weight_similarity": r.weight_similarity, "output_cka": r.output_cka,
                                            "gradient_conflict": r.gradient_conflict,
                                            "measured_drop_pts": r.measured_drop} for r in rows])
    for r in rows[:10]:
        print(f"{r.measured_drop:+6.2f} pts  saves {r.params_saved:>9,}  {' + '.join(r.group)}")
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
                                   "folder (weights.safetensors + card.json) the app lists.")
    p.add_argument("--model", required=True, help="a registered model (python -m wsviz models)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. sharing=vanilla or shared=false (repeatable)")
    p.add_argument("--weights", required=True, help="the state dict: a .pt / .pth or .safetensors file")
    p.add_argument("--out", required=True, help="the checkpoint folder to write (e.g. checkpoints/NAME)")
    p.add_argument("--dataset", default=None, help="what the weights were trained on (a wsviz dataset name), so "
                                                   "the app can evaluate them")
    p.set_defaults(func=_import)
    p = sub.add_parser("runs", help="the run store: `runs rebuild` brings back runs from their folders")
    p.add_argument("action", choices=["rebuild"],
                   help="rebuild: move a damaged store aside and restore every run from its folder")
    p.add_argument("--runs-dir", default=None, help="runs folder (default: $WSVIZ_RUNS or ./runs)")
    p.set_defaults(func=_runs)

    def analysis(name: str, help: str, func, dataset: str | None = "mnist5k", limit: int | None = 1000):
        q = sub.add_parser(name, help=help)
        q.add_argument("--checkpoint", nargs="+", default=[], help="checkpoint folders")
        q.add_argument("--out", required=True, help="folder for CSV/JSON and HTML figures")
        if dataset is not None:
            q.add_argument("--dataset", default=dataset)
        q.add_argument("--limit", type=int, default=limit, help="images used (spread over the test split)")
        q.set_defaults(func=func)
        return q

    q = analysis("kernels", "top-k kernels by magnitude, side by side, with similarity scores", _kernels, None)
    q.add_argument("--layer", default=None,
                   help="kernel layer, a module path (default: the same place in every model, preferring the "
                        "deepest shared 3x3 layer)")
    q.add_argument("--k", type=int, default=256)
    q.add_argument("--scale", default="shared", choices=["shared", "per_kernel"],
                   help="one colour scale in weight units for all panels, or each kernel to its own max")
    q = analysis("scale", "accuracy and agreement vs input scale", lambda a: _sweep(a, "scale"))
    q.add_argument("--values", type=float, nargs="*", default=None, help="scale factors")
    q = analysis("rotation", "accuracy and agreement vs rotation angle", lambda a: _sweep(a, "rotation"))
    q.add_argument("--values", type=float, nargs="*", default=None, help="angles in degrees")
    q = analysis("compare", "accuracy vs params vs FLOPs, with McNemar tests and bootstrap CIs", _compare, None)
    q.add_argument("--dataset", default=None, help="evaluate all on this dataset (default: each card's)")
    q = analysis("attribution", "Integrated Gradients / Saliency / Grad-CAM for one image", _attribution, None)
    q.add_argument("--image", default=None, help="an image file (default: a test digit)")
    q.add_argument("--method", default="integrated_gradients",
                   choices=["integrated_gradients", "saliency", "grad_cam"])
    q.add_argument("--layer", default=None,
                   help="Grad-CAM layer, a module path (default: the deepest spatial map the classifier reads; "
                        "an unknown path lists the choices)")
    q = analysis("embed", "PCA / t-SNE / UMAP of penultimate features", _embed, "mnist5k-rot", 2000)
    q.add_argument("--method", default="pca", choices=["pca", "tsne", "umap"])
    q.add_argument("--color-by", default="class", choices=["class", "angle", "scale"])
    analysis("cka", "linear CKA between the layers of two models", _cka, "mnist5k", 500)
    q = analysis("opportunities", "where sharing costs least: candidate conv groups scored by weight similarity, "
                 "output CKA, gradient conflict and the accuracy lost by tying them now", _opportunities,
                 "mnist5k-scale", 500)
    q.add_argument("--calibration", type=int, default=512, help="training images for calibration and BatchNorm")
    q.add_argument("--group", action="append", default=[],
                   help="a group to score, as comma-separated conv paths (repeatable; default: every candidate)")
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
