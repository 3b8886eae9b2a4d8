"""Analyses read datasets in batches: the streamed path gives what the in-memory path gives, the
prediction cache reuses what is known, shards count every sample once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from wsviz.analysis.cache import PredictionCache, model_hash
from wsviz.analysis.embeddings import penultimate_features
from wsviz.analysis.similarity import cka_matrix
from wsviz.analysis.stats import fair_comparison, pairwise_significance
from wsviz.analysis.sweeps import layer_scale_invariance, rotation_sweep, scale_sweep
from wsviz.data.datasets import load_split
from wsviz.data.loaders import ShardSampler
from wsviz.data.stream import batches, eval_data, gather, sample_indices, take
from wsviz.errors import WsvizError
from wsviz.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CK = ROOT / "checkpoints"
SCALE_ZOO = [CK / "scale-resnet20", CK / "scale-msws-shared", CK / "scale-sharesnet"]


def shipped(*names: str) -> dict:
    return {n: load_checkpoint(CK / n)[0] for n in names}


class Counting(torch.nn.Module):
    """A model that counts the images it is fed (and is otherwise the wrapped model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.images = model, 0
        self.wsviz_config = model.wsviz_config
        self.wsviz_name = model.wsviz_name

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


# --------------------------------------------------------------- streamed == in memory
def test_streamed_and_in_memory_sweeps_are_identical_on_the_shipped_digits():
    models = shipped("scale-resnet20", "scale-msws-shared")
    data = eval_data("mnist5k-scale", limit=300)
    te = load_split("mnist5k-scale", "test").spread(300)
    assert torch.equal(data.tensors()[0], te.images)  # the same 300 images as the app's spread
    scales = (0.4, 0.7, 1.0, 1.3)
    memory = scale_sweep(models, te.images, te.labels, scales, batch_size=64)
    streamed = scale_sweep(models, data, scales=scales, batch_size=64, loader="stream")
    for m in models:
        assert np.array_equal(memory.predictions[m], streamed.predictions[m])
        assert np.array_equal(memory.accuracy[m], streamed.accuracy[m])
        assert np.array_equal(memory.agreement[m], streamed.agreement[m])
    assert streamed.samples == memory.samples == 300 and streamed.shares == [300]
    rot_m = rotation_sweep(models, te.images, te.labels, (0, 45, 90), batch_size=128)
    rot_s = rotation_sweep(models, data, angles=(0, 45, 90), batch_size=128, loader="stream")
    assert all(np.array_equal(rot_m.predictions[m], rot_s.predictions[m]) for m in models)


def test_streamed_and_in_memory_comparison_and_significance_are_identical():
    memory = fair_comparison(SCALE_ZOO, loader="memory")
    streamed = fair_comparison(SCALE_ZOO, loader="stream", batch_size=200)
    for a, b in zip(memory, streamed, strict=True):
        assert a.accuracy == b.accuracy == pytest.approx(a.card_accuracy, abs=1e-9)
        assert np.array_equal(a.predictions, b.predictions) and np.array_equal(a.labels, b.labels)
    pm, ps = pairwise_significance(memory), pairwise_significance(streamed)
    assert len(pm) == len(ps) == 3
    for a, b in zip(pm, ps, strict=True):
        assert (a.i, a.j, a.p_holm, a.comparison.summary) == (b.i, b.j, b.p_holm, b.comparison.summary)
        assert a.comparison.mcnemar == b.comparison.mcnemar and a.comparison.diff_ci == b.comparison.diff_ci


def test_features_cka_invariance_and_attribution_read_a_dataset_like_its_tensor():
    from wsviz.analysis.attribution import attribute

    model = shipped("scale-resnet20")["scale-resnet20"]
    data = eval_data("mnist5k", limit=40)
    x, y = take(data)
    assert torch.equal(y, data.labels)
    assert np.array_equal(penultimate_features(model, data, batch_size=16), penultimate_features(model, x, 16))
    assert np.array_equal(layer_scale_invariance(model, data, 0.5, batch_size=40).error,
                          layer_scale_invariance(model, x, 0.5, batch_size=40).error)
    assert torch.equal(attribute(model, data.subset([3, 7]), "saliency").maps,
                       attribute(model, x[[3, 7]], "saliency").maps)
    # CKA on a dataset: a fixed, seeded subset, said so in the result
    full = eval_data("mnist5k")
    res = cka_matrix(model, model, full, max_images=60)
    assert res.images == 60 and res.subset.startswith("60 of 1,000 images") and "seed 0" in res.subset
    same = cka_matrix(model, model, take(full, sample_indices(1000, 60))[0])
    assert np.array_equal(res.matrix, same.matrix, equal_nan=True) and same.subset == ""


def test_any_dataset_or_in_order_loader_is_read_and_a_shuffled_one_refused():
    from PIL import Image

    class Pil(Dataset):  # a torchvision dataset without a transform: PIL images and int labels
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return Image.fromarray(np.full((28, 28), 40 * i, np.uint8)), i % 2

    got = list(batches(Pil(), batch_size=2))
    assert [b.index.tolist() for b in got] == [[0, 1], [2, 3], [4]]
    assert got[1].images.shape == (2, 1, 28, 28) and got[1].images.dtype == torch.uint8
    assert got[2].images[0, 0, 0, 0] == 160 and got[2].labels.tolist() == [0]
    x = torch.rand(7, 1, 28, 28)
    ordered = list(batches(DataLoader(list(zip(x, range(7))), batch_size=3)))
    assert torch.equal(torch.cat([b.index for b in ordered]), torch.arange(7))
    with pytest.raises(WsvizError, match="in order"):
        list(batches(DataLoader(list(zip(x, range(7))), batch_size=3, shuffle=True)))
    with pytest.raises(WsvizError, match="memory"):
        list(batches(Pil(), loader="memory"))


# --------------------------------------------------------------- shards: every sample once
@pytest.mark.parametrize("n,world", [(10, 3), (2, 3), (1000, 7), (9, 1)])
def test_shards_hold_every_sample_exactly_once_without_padding(n, world):
    shares = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == list(map(len, shares))


def test_gather_refuses_a_repeated_or_missing_sample():
    full, shares = gather(4, torch.tensor([2, 0, 3, 1]), {"p": np.array([20, 0, 30, 10])})
    assert full["p"].tolist() == [0, 10, 20, 30] and shares == [4]
    with pytest.raises(WsvizError, match=r"sample \[0, 2\] counted \[2, 0\] times"):
        gather(4, torch.tensor([0, 0, 3, 1]), {"p": np.zeros(4)})
    with pytest.raises(WsvizError, match="3 results for 4 samples"):
        gather(4, torch.tensor([0, 3, 1]), {"p": np.zeros(3)})


# --------------------------------------------------------------- the prediction cache
def test_cache_reuses_known_predictions_and_computes_only_what_is_new(tmp_path):
    cache = PredictionCache(tmp_path / "cache")
    base = shipped("scale-resnet20", "scale-msws-shared")
    models = {k: Counting(m) for k, m in base.items()}
    data = eval_data("mnist5k-scale", limit=200)
    first = scale_sweep(models, data, scales=(0.5, 1.0), cache=cache)
    assert [m.images for m in models.values()] == [400, 400] and first.cached == 0
    again = scale_sweep(models, data, scales=(0.5, 1.0), cache=cache)  # re-plotting: nothing evaluated
    assert [m.images for m in models.values()] == [400, 400] and again.cached == 4
    assert all(np.array_equal(first.predictions[m], again.predictions[m]) for m in models)
    assert all(np.array_equal(first.accuracy[m], again.accuracy[m]) for m in models)
    more = scale_sweep(models, data, scales=(0.5, 0.8, 1.0), cache=cache)  # one more scale: only it runs
    assert [m.images for m in models.values()] == [600, 600]
    assert all(np.array_equal(more.predictions[m][[0, 2]], first.predictions[m]) for m in models)
    # the entries are keyed by the weights: a changed model misses, the unchanged one hits
    with torch.no_grad():
        next(base["scale-msws-shared"].parameters()).add_(1e-3)
    scale_sweep(models, data, scales=(0.5, 1.0), cache=cache)
    assert [m.images for m in models.values()] == [600, 1000]
    # safe to delete, or to damage: it is recomputed, with the same result
    next(iter(cache.entries()))[0].write_bytes(b"not a numpy file")
    import shutil

    shutil.rmtree(tmp_path / "cache" / next(iter(sorted(p.name for p in (tmp_path / "cache").iterdir()))))
    after = scale_sweep(models, data, scales=(0.5, 1.0), cache=cache)
    assert np.array_equal(after.predictions["scale-resnet20"], first.predictions["scale-resnet20"])


def test_comparison_reuses_the_sweeps_unscaled_predictions(tmp_path):
    cache = PredictionCache(tmp_path / "cache")
    models = {p.name: load_checkpoint(p)[0] for p in SCALE_ZOO[:2]}
    scale_sweep(models, eval_data("mnist5k-scale"), scales=(1.0,), cache=cache)
    hits = cache.hits
    rows = fair_comparison(SCALE_ZOO[:2], cache=cache)
    assert cache.hits == hits + 2  # both models' test predictions were known: nothing evaluated
    assert [r.accuracy for r in rows] == [r.card_accuracy for r in rows]


def test_cache_stays_within_its_size_and_a_tensor_is_keyed_by_its_bytes(tmp_path):
    one = np.arange(1000)
    cache = PredictionCache(tmp_path / "c", max_bytes=3 * 4200)  # room for 3 entries of 1,000 int32
    for k in range(6):
        cache.put(cache.key("model", k), one)
    assert cache.size() <= 3 * 4200 and len(cache.entries()) == 3
    assert cache.get(cache.key("model", 5)) is not None and cache.get(cache.key("model", 0)) is None
    model = shipped("scale-resnet20")["scale-resnet20"]
    assert model_hash(model) == model_hash(shipped("scale-resnet20")["scale-resnet20"])
    x = torch.rand(20, 1, 28, 28)
    counting = Counting(model)
    scale_sweep({"m": counting}, x, None, (1.0,), cache=cache)
    scale_sweep({"m": counting}, x.clone(), None, (1.0,), cache=cache)
    assert counting.images == 20
    x[0, 0, 0, 0] += 0.5
    scale_sweep({"m": counting}, x, None, (1.0,), cache=cache)
    assert counting.images == 40


def test_cli_sweep_shows_progress_and_writes_the_sample_counts(tmp_path, capsys):
    import json

    from wsviz.cli import main

    out = tmp_path / "out"
    assert main(["scale", "--checkpoint", str(SCALE_ZOO[0]), "--dataset", "mnist5k-scale", "--limit", "50",
                 "--values", "0.5", "1.0", "--batch-size", "16", "--cache-dir", str(tmp_path / "c"),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "scale sweep: 100%" in err and "100/100" in err  # tqdm, over 50 images x 2 values, with its ETA field
    info = json.loads((out / "scale_sweep.json").read_text())
    assert (info["samples"], info["samples_per_rank"], info["results_from_cache"]) == (50, [50], 0)
    saved = np.load(out / "scale_predictions.npz")
    assert saved["model:scale-resnet20"].shape == (2, 50)


def test_trimming_leaves_another_writers_unfinished_file_alone_and_clears_abandoned_ones(tmp_path):
    import os
    import time

    one = np.arange(1000)
    cache = PredictionCache(tmp_path / "c", max_bytes=3 * 4200)
    cache.put(cache.key("model", 0), one)
    folder = next(p.parent for p, _ in cache.entries())
    writing = folder / ".tmp-another-writer.npy"  # another process's np.save under way
    writing.write_bytes(b"\0" * 40_000)  # alone over the budget
    abandoned = folder / ".tmp-crashed.npy"
    abandoned.write_bytes(b"\0" * 4_000)
    old = time.time() - 2 * 3600
    os.utime(abandoned, (old, old))
    for k in range(1, 4):
        cache.put(cache.key("model", k), one)
    assert writing.exists()  # not an entry: never counted, never removed mid-write
    assert not abandoned.exists()  # a writer that died hours ago left it: cleared
    assert len(cache.entries()) == 3 and all(not p.name.startswith(".tmp-") for p, _ in cache.entries())


def test_an_in_memory_set_is_evaluated_with_the_recipes_evaluation_transform_as_training_evaluated_it():
    """A model trained with --augment imagenet on in-memory images was tested (by the training loop) on
    Resize(8/7 x size) + CenterCrop(size); the analyses must see the same, not the image zero-padded."""
    from wsviz.data.stream import eval_data, take
    from wsviz.training.loop import TrainConfig, _eval_batches

    data = eval_data("mnist5k", "test", size=64, augment="imagenet", limit=8)
    x, y = take(data)
    te = load_split("mnist5k", "test")
    idx = np.linspace(0, len(te.labels) - 1, 8).round().astype(np.int64)
    loader, _ = _eval_batches((te.images[idx], te.labels[idx]), TrainConfig(augment="imagenet", batch_size=8), 64,
                              torch.device("cpu"))
    want = torch.cat([b[0] for b in loader])
    assert x.shape == want.shape == (8, 1, 64, 64) and torch.allclose(x, want)
    assert data.transform != eval_data("mnist5k", "test", size=64, limit=8).transform  # a cache key apart
    plain, _ = take(eval_data("mnist5k", "test", size=64, limit=8))  # no preset: the tensors as they are
    assert torch.equal(plain, te.images[idx])


def test_two_copies_of_a_dataset_under_different_roots_are_cached_apart(tmp_path, monkeypatch):
    import wsviz.data.datasets as datasets
    from wsviz.data.stream import eval_data

    monkeypatch.setattr(datasets, "load_split", lambda name, split, **k: load_split("mnist5k", split))
    a = eval_data("mnist5k", "test", data_root=tmp_path / "a", limit=10)
    b = eval_data("mnist5k", "test", data_root=tmp_path / "b", limit=10)
    assert a.ident != b.ident
    assert eval_data("mnist5k", "test", limit=10).ident == eval_data("mnist5k", "test", limit=10).ident
