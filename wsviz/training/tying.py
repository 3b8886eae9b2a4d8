"""A trained checkpoint tied into a shared model, ready to evaluate, save or fine-tune.

:func:`wsviz.models.tie.tie` is the mechanism; this is the step a run or the CLI takes with it:
load the source checkpoint, take calibration images from its training split, tie the groups,
re-estimate BatchNorm, and record in the model (``wsviz_tie``, written into every card it is
saved with) what was tied, how and from what. Fine-tuning is then an ordinary training run
started from this model (:func:`wsviz.training.run.run_training` with ``init_from`` and ``tie``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsviz.errors import WsvizError

DEFAULT_CALIBRATION = 512


@dataclass(frozen=True)
class TieSpec:
    """Which conv groups to tie and how: ``init`` (mean / medoid / lstsq) and the number of training
    images used for the least-squares kernel and the BatchNorm statistics."""

    groups: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    init: str = "lstsq"
    calibration: int = DEFAULT_CALIBRATION

    def __post_init__(self) -> None:
        from wsviz.models.tie import INITS

        object.__setattr__(self, "groups", tuple(tuple(g) for g in self.groups))
        if self.init not in INITS:
            raise WsvizError(f"Unknown init {self.init!r}; choose one of {', '.join(INITS)}.")
        if not isinstance(self.calibration, int) or not 1 <= self.calibration <= 100_000:
            raise WsvizError(f"calibration must be a whole number of images from 1 to 100000, got {self.calibration!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups], "init": self.init, "calibration": self.calibration}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TieSpec:
        return cls(tuple(tuple(g) for g in d["groups"]), d.get("init", "lstsq"),
                   int(d.get("calibration", DEFAULT_CALIBRATION)))


DISTILL_TEMPERATURE = 4.0
DISTILL_WEIGHT = 0.5  # half the loss from the untied model's predictions, half from the labels
FEATURE_DISTILL = 3.0
AVERAGE_LAST = 15


def feature_distillation(student: nn.Module, teacher: nn.Module, groups, weight: float):
    """Feature distillation (FitNets, Romero et al. 2015) for a tied model: forward hooks on the block
    (the parent module) of every member of ``groups``, in ``student`` and in ``teacher`` (the untied
    model, with the same layer paths). Returns (term, remove): ``term()`` is ``weight`` times the mean
    over the blocks of ||student output - teacher output||^2 / ||teacher output||^2 (relative, so that
    blocks of every width count alike), from each model's last forward pass; the teacher's output is
    taken as fixed. ``remove()`` takes the hooks off."""
    blocks = list(dict.fromkeys(path.rsplit(".", 1)[0] if "." in path else path for g in groups for path in g))
    seen: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
    hooks = []
    for who, model in (("student", student), ("teacher", teacher)):
        for b in blocks:
            def hook(mod, inputs, out, who=who, b=b):
                seen[who][b] = out
            hooks.append(model.get_submodule(b).register_forward_hook(hook))

    def term() -> torch.Tensor:
        errors = []
        for b in blocks:
            s, t = seen["student"][b].float(), seen["teacher"][b].detach().float()
            errors.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
        return weight * torch.stack(errors).mean()

    def remove() -> None:
        for h in hooks:
            h.remove()
    return term, remove


def finetune_config(epochs: int, lr: float, *, max_batches: int | None = None, distill: bool = True,
                    train_images: int | None = None, **kw: Any):
    """wsviz's recipe for fine-tuning a tied model (the one ``checkpoints/REPORT.md`` measures), as a
    :class:`~wsviz.training.loop.TrainConfig`: a cosine annealed every step (a fine-tune of one epoch
    would otherwise run at a constant rate), and with ``distill``: half the loss from the untied
    model's predictions (temperature 4) and half from the labels, feature distillation of the tied
    blocks' outputs (weight 3, :func:`feature_distillation`), and the last 15 steps' weights averaged
    (fewer when an epoch is shorter: capped by ``max_batches``, or, given ``train_images``, the
    training split's size, a set of fewer than 15 batches). ``benchmarks/bench_tie_recipe.py`` chose
    the recipe (plans and results: ``benchmarks/results/tie-recipe-*``). ``kw``: any other TrainConfig
    field (batch_size, seed, augment...), which overrides the recipe's."""
    from wsviz.training.loop import TrainConfig

    cfg = TrainConfig(epochs=epochs, lr=lr, max_batches=max_batches, step_schedule=True, **kw)
    if not distill:
        return cfg
    epoch = [AVERAGE_LAST, max_batches or AVERAGE_LAST]
    if train_images is not None:  # the loop's steps per epoch (one process): whole batches, at least one
        epoch.append(max(1, train_images // cfg.batch_size))
    recipe = {"distill": DISTILL_TEMPERATURE, "distill_weight": DISTILL_WEIGHT, "feature_distill": FEATURE_DISTILL,
              "average_last": min(epoch)}
    return replace(cfg, **{**recipe, **{k: v for k, v in kw.items() if k in recipe}})


def parse_groups(items: list[str]) -> tuple[tuple[str, ...], ...]:
    """``--tie a,b --tie c,d`` (or the app's lines) as groups of layer paths."""
    groups = tuple(tuple(p.strip() for p in item.split(",") if p.strip()) for item in items if item.strip())
    return groups


def calibration_images(dataset: str, n: int, model: nn.Module, *, data_root: str | None = None,
                       data_seed: int = 0, augment: str = "none") -> torch.Tensor:
    """``n`` training images of ``dataset`` spread over its classes, at the model's input shape (an image
    folder decoded at that size with the ``augment`` preset's evaluation transform; only those read)."""
    from wsviz.data.stream import model_sample

    return model_sample(dataset, "train", model, n, seed=data_seed, augment=augment, data_root=data_root)[0]


def tie_checkpoint(source: str | Path, spec: TieSpec, *, dataset: str | None = None, data_root: str | None = None,
                   data_seed: int | None = None,
                   loaded: tuple[nn.Module, dict[str, Any]] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(tied model with fresh BatchNorm statistics, the source's card). The model's ``wsviz_tie``
    records every tied group, the init, the source folder and accuracy, and the calibration.
    ``loaded``: ``load_checkpoint(source)`` when the caller already has it (it is left untouched)."""
    from wsviz.models.tie import reestimate_batchnorm, tie
    from wsviz.training.checkpoint import load_checkpoint

    if not spec.groups:
        raise WsvizError("No groups to tie: give lists of two or more conv layer paths with the same weight shape "
                         "(`python -m wsviz opportunities` ranks the candidates).")
    model, card = loaded if loaded is not None else load_checkpoint(source)
    dataset = dataset or card.get("dataset")
    if not dataset:
        raise WsvizError(f"The checkpoint {source} does not say what it was trained on; give the dataset its "
                         "calibration images come from (--dataset).")
    seed = card.get("data_seed", 0) if data_seed is None else data_seed
    from wsviz.training.cards import evaluation_transform

    images = calibration_images(dataset, spec.calibration, model, data_root=data_root, data_seed=seed,
                                augment=evaluation_transform(card, dataset))
    tied = reestimate_batchnorm(tie(model, spec.groups, spec.init, images), images)
    tied.wsviz_tie.update(source=str(source), source_model=card["model"],
                          source_test_accuracy=card.get("test_accuracy"), calibration_images=len(images),
                          calibration_split=f"{dataset} train")
    return tied, card


def tied_card(tied: nn.Module, source_card: dict[str, Any], test_accuracy: float | None, command: str,
              test_limit: int | None = None) -> dict[str, Any]:
    """The card of a tied model saved without fine-tuning: the source's model, options and data, the
    tied model's own counts, and its test accuracy right after tying.

    ``test_limit``: the accuracy was measured on only this many test images (``tie --limit``). It is
    then kept, with that number, in the ``tied`` record, and the card states no ``test_accuracy``:
    a subset's accuracy would read as the whole test split's."""
    import datetime as _dt

    import wsviz
    from wsviz.models import summarize

    s = summarize(tied)
    keep = ("model", "config", "family", "paper", "dataset", "train_split", "test_split", "data_seed")
    card = {k: source_card[k] for k in keep if k in source_card}
    tie_record = dict(tied.wsviz_tie)
    tie_record["accuracy_after_tying"] = test_accuracy
    if test_limit is not None:
        tie_record["test_limit"] = int(test_limit)
    return {**card, "epochs": 0, "epochs_done": 0, "complete": True, "metrics": [],
            "test_accuracy": test_accuracy if test_limit is None else None,
            **({"test_limit": int(test_limit)} if test_limit is not None else {}),
            "unique_params": s.unique_params, "effective_params": s.effective_params, "flops": s.flops,
            "sign_mask_params": s.mask_params, "tied": tie_record, "wsviz_version": wsviz.__version__,
            "torch_version": torch.__version__, "command": command,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
