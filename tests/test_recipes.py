"""Recipes: the papers' protocols, overridable; augmentation in training only; streamed image folders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from wsviz import WsvizError
from wsviz.data.datasets import fit_to
from wsviz.data.loaders import folder_dataset, transforms_for
from wsviz.train import _config, apply_recipe, build_parser, main
from wsviz.training.checkpoint import build_on_meta
from wsviz.training.loop import TrainConfig, make_schedule, train
from wsviz.training.recipes import get_recipe, list_recipes
from wsviz.training.run import build_for_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", list_recipes(), ids=lambda r: r.name)
def test_every_recipe_cites_its_source_and_builds(recipe):
    assert "§" in recipe.source or "Appendix" in recipe.source, recipe.source
    TrainConfig(**recipe.train).validate()
    assert build_on_meta(recipe.model, dict(recipe.overrides)) is not None  # the model and its options exist


def test_papers_protocols_as_written():
    aich = get_recipe("aich-imagenet").train  # Aich et al. §4.2
    assert (aich["lr"], aich["momentum"], aich["weight_decay"], aich["step_size"], aich["gamma"]) == (0.1, 0.9, 1e-4, 30, 0.1)
    # WSMS-Net §4.2: lr 0.01 in epoch 1, 0.1 from the 2nd, 0.01 from the 82nd, 0.001 from the 123rd.
    cfg = TrainConfig(**get_recipe("wsms-cifar").train)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, lrs = make_schedule(opt, cfg), []
    for _ in range(cfg.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [round(lrs[e - 1], 6) for e in (1, 2, 81, 82, 122, 123, 164)] == [0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert get_recipe("shardnet-cifar").train["weight_decay"] == 5e-4  # ShaRDNet A.4


def test_explicit_options_override_the_recipe():
    args = apply_recipe(build_parser().parse_args(
        ["--recipe", "wsms-cifar", "--dataset", "mnist5k", "--model", "resnet_digits", "--epochs", "2",
         "--lr", "0.05", "--out", "x"]))
    cfg = _config(args)
    assert (args.model, args.dataset, cfg.epochs, cfg.lr) == ("resnet_digits", "mnist5k", 2, 0.05)  # given
    assert (cfg.weight_decay, cfg.milestones, cfg.augment, cfg.warmup_epochs) == (1e-4, (81, 122), "cifar", 1)
    plain = _config(apply_recipe(build_parser().parse_args(
        ["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "1", "--out", "x"])))
    assert (plain.schedule, plain.augment, plain.lr) == ("cosine", "none", 0.1)  # no recipe: the old defaults
    with pytest.raises(WsvizError, match="--dataset"):
        apply_recipe(build_parser().parse_args(["--model", "resnet_digits", "--epochs", "1", "--out", "x"]))
    with pytest.raises(WsvizError, match="wsms-cifar"):
        apply_recipe(build_parser().parse_args(["--recipe", "wsms-cifr", "--out", "x"]))


def test_list_recipes(capsys):
    assert main(["--list-recipes"]) == 0
    text = capsys.readouterr().out
    for r in list_recipes():
        assert r.name in text and r.source in text


def test_recipe_augmentation_is_applied_in_training_and_not_in_evaluation():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 28, 28)
    labels = torch.arange(64) % 10
    model = build_for_dataset("resnet_digits", "mnist5k", {"base_width": 4, "depth": 8})
    seen = {True: [], False: []}
    model.register_forward_pre_hook(lambda m, inp: seen[m.training].append(inp[0].detach().clone()))
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.01, augment="cifar")
    train(model, (images, labels), (images, labels), cfg)
    trained, evaluated = torch.cat(seen[True]), torch.cat(seen[False])
    raw = fit_to(images, 1, 28)
    assert len(trained) == 64 and torch.equal(evaluated, raw)  # evaluation: the images as they are
    exact = [any(torch.equal(x, r) for r in raw) for x in trained]
    assert sum(exact) < 16, "training images were not augmented"  # crop offset 0 and no flip: ~1 in 162
    # ...and the same run without the recipe trains on the images as they are.
    seen[True].clear()
    train(model, (images, labels), (images, labels), TrainConfig(epochs=1, batch_size=16, lr=0.01))
    assert all(any(torch.equal(x, r) for r in raw) for x in torch.cat(seen[True]))


def _folder(root: Path, n_per_class: int, side: int, fmt: str = "JPEG") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = np.stack([xx, yy, (xx + yy) / 2], -1) if c else np.stack([yy, xx, 1 - xx], -1)
            img = (base * 200 + rng.integers(0, 50, (1, 1, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.{fmt.lower()}", fmt)
    return root


def test_imagenet_preset_evaluates_deterministically_and_augments_training_images(tmp_path):
    root = _folder(tmp_path / "imgs", 5, 120)
    tr = folder_dataset(root, "train", 0, transforms_for("imagenet", 56, train=True, from_pil=True))
    te = folder_dataset(root, "test", 0, transforms_for("imagenet", 56, train=False, from_pil=True))
    assert len(tr) == 8 and len(te) == 2
    assert tr[0][0].shape == te[0][0].shape == (3, 56, 56) and tr[0][0].dtype == torch.uint8
    assert torch.equal(te[0][0], te[0][0])  # resize 64 + centre crop 56: the same every time
    torch.manual_seed(0)
    assert not all(torch.equal(tr[0][0], tr[0][0]) for _ in range(3))  # random-resized crop + flip


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, psutil, torch
    from wsviz.training.loop import TrainConfig
    from wsviz.training.run import run_training
    torch.set_num_threads(1)
    def go(folder, out):
        run_training("resnet_digits", "folder:" + folder, out, TrainConfig(epochs=1, batch_size=8, lr=0.01, max_batches=2),
                     overrides={"base_width": 4, "depth": 8, "in_channels": 3, "input_size": 32})
    go(sys.argv[3], sys.argv[2] + "-warm")  # everything imported and built once, on a small folder
    # ru_maxrss is the process's lifetime peak: the baseline is the larger of the warm run's peak and the
    # memory held now, so only what the big folder adds on top of a warm process counts.
    before = max(psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    go(sys.argv[1], sys.argv[2])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(before, peak)
""")


def test_an_image_folder_is_streamed_never_loaded_whole(tmp_path):
    # 2 x 150 photos of 512x512: 236 MB decoded (as uint8), more than this test lets the process grow.
    root, small = _folder(tmp_path / "big", 150, 512), _folder(tmp_path / "small", 10, 512)
    decoded = 300 * 512 * 512 * 3
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(root), str(tmp_path / "ck"), str(small)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, peak = map(int, proc.stdout.split()[-2:])
    assert peak - before < decoded / 5, (peak - before, decoded)
    assert (tmp_path / "ck" / "card.json").is_file()
