"""The papers' training protocols as named recipes.

A recipe fixes what a paper says about training (augmentation, optimiser, schedule, epochs,
batch size, weight decay) and names the section it comes from. ``python -m wsviz.train
--recipe NAME`` starts from it; every option given explicitly on the command line overrides it.
Where a paper leaves something out, the recipe says what was chosen and why (``notes``).

Milestones count finished epochs: ``milestones=(30, 60)`` trains epochs 1-30 at the initial
rate, 31-60 at a tenth of it, and so on (torch's ``MultiStepLR`` stepped once per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wsviz.errors import WsvizError


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str  # the paper and section the protocol comes from
    model: str  # the registered model the paper trains with it
    dataset: str  # wsviz dataset name (folder:PATH where the set is not a torchvision one)
    train: dict[str, Any]  # TrainConfig fields
    notes: str = ""  # choices made where the paper is silent
    overrides: dict[str, Any] = field(default_factory=dict)  # model options

    def describe(self) -> str:
        t = self.train
        sched = t.get("schedule", "none")
        if sched == "multistep":
            sched += f" x{t.get('gamma', 0.1):g} after epochs {', '.join(map(str, t.get('milestones', ())))}"
        elif sched == "step":
            sched += f" x{t.get('gamma', 0.1):g} every {t.get('step_size')} epochs"
        elif sched == "plateau":
            sched += f" x{t.get('gamma', 0.1):g} when test accuracy stalls {t.get('plateau_patience', 10)} epochs"
        warm = f", first {t['warmup_epochs']} epoch(s) at lr/10" if t.get("warmup_epochs") else ""
        return (f"{self.model} on {self.dataset}: {t['optimizer']} lr {t['lr']:g}, momentum {t.get('momentum', 0):g}, "
                f"wd {t['weight_decay']:g}, {t['epochs']} epochs, batch {t['batch_size']}, {sched}{warm}, "
                f"augmentation {t.get('augment', 'none')}")


def _sgd(lr: float, wd: float, epochs: int, batch: int, augment: str, **kw: Any) -> dict[str, Any]:
    return {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": wd, "epochs": epochs,
            "batch_size": batch, "augment": augment, **kw}


_IMAGENET = "folder:/data/imagenet"  # an ImageNet-style folder: train/<wnid>/*.JPEG and val/... as test/
_TINY = "folder:/data/tiny-imagenet-200"

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("aich-imagenet", "Aich et al., Multi-Scale Weight Sharing Network, §4.2 (Implementation)",
           "msws_resnet50", _IMAGENET,
           _sgd(0.1, 1e-4, 100, 256, "imagenet", schedule="step", step_size=30, gamma=0.1),
           "batch 192 for the ResNet-152 variants (§4.2). Augmentation: the standard ImageNet one of the "
           "benchmarks §4.2 says it follows (random-resized crop + flip; 256/224 centre crop to evaluate).",
           {"sharing": "shared"}),
    Recipe("wsms-cifar", "Takahashi et al., WSMS-Net, §4.2 (WSMS-ResNet on CIFAR)", "wsms_resnet110", "cifar10",
           _sgd(0.1, 1e-4, 164, 128, "cifar", schedule="multistep", milestones=(81, 122), gamma=0.1,
                warmup_epochs=1),
           "§4.2: lr 0.01 for the first epoch, 0.1 from the 2nd, 0.01 from the 82nd, 0.001 from the 123rd; "
           "crop-4 + flip as in §4.1 (He et al.'s CIFAR protocol)."),
    Recipe("wsms-imagenet", "Takahashi et al., WSMS-Net, §4.3 (WSMS-ResNet on ImageNet)", "wsms_resnet50", _IMAGENET,
           _sgd(0.1, 1e-4, 90, 256, "imagenet", schedule="multistep", milestones=(30, 60), gamma=0.1),
           "fb.resnet.torch's augmentation, which §4.3 says it follows."),
    Recipe("repeatnet-cifar", "Chavan et al., RepeatNet, §4.1 (Rescaling Network Architectures)",
           "repeatnet_resnet18", "cifar10",
           _sgd(0.1, 1e-3, 160, 128, "cifar", schedule="multistep", milestones=(80, 120), gamma=0.1),
           "§4.1 gives no batch size or augmentation: batch 128 and crop-4 + flip, the CIFAR standard."),
    Recipe("repeatnet-tiny-imagenet", "Chavan et al., RepeatNet, §4.1", "repeatnet_resnet18", _TINY,
           _sgd(0.1, 1e-3, 90, 128, "imagenet", schedule="step", step_size=30, gamma=0.1),
           "§4.1 gives no batch size or augmentation: batch 128, random-resized crop + flip.",
           {"num_classes": 200, "input_size": 56}),
    Recipe("repeatnet-imagenet", "Chavan et al., RepeatNet, §4.1", "repeatnet_resnet18", _IMAGENET,
           _sgd(0.1, 1e-3, 90, 256, "imagenet", schedule="step", step_size=30, gamma=0.1),
           "§4.1 gives no batch size: 256, the ImageNet ResNet standard.",
           {"num_classes": 1000, "input_size": 224}),
    Recipe("repeatnet-rotmnist", "Chavan et al., RepeatNet, §4.3 (follows Weiler & Cesa's strategy) — as the "
           "wsviz rotation zoo trains it", "repeatnet_rotmnist_cnn", "mnist5k-rot",
           {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "epochs": 12,
            "batch_size": 128, "schedule": "cosine", "augment": "none"},
           "the rotation zoo's protocol (wsviz.zoo ROT_RECIPE): Rot-MNIST is its own augmentation "
           "(each digit rotated once, uniformly); use --dataset mnist-rot for the full set."),
    Recipe("mnist-scale-zoo", "Aich et al. §4.2's SGD recipe on the MNIST-scale protocol (Sosnovik et al.) — "
           "as the wsviz scale zoo trains it", "msws_resnet_digits", "mnist5k-scale",
           {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 12, "batch_size": 128,
            "schedule": "cosine", "augment": "none"},
           "the scale zoo's protocol (wsviz.zoo SCALE_RECIPE); use --dataset mnist-scale for the full set."),
    Recipe("shardnet-cifar", "ShaRDNet, Appendix A.4 (Training protocol), CIFAR", "shardnet_vgg", "cifar10",
           _sgd(0.05, 5e-4, 200, 128, "cifar", schedule="plateau", gamma=0.5, plateau_patience=10),
           "A.4 halves the rate 'when the error plateaus' (patience 10 epochs here, on test accuracy: the "
           "papers have no validation split) and gives no batch size (128 here). Inputs are not normalised: "
           "every wsviz model starts with BatchNorm-backed convolutions on [0, 1] pixels.",
           {"kind": "SL", "width": 256}),
    Recipe("shardnet-tiny-imagenet", "ShaRDNet, Appendix A.4 (Training protocol), Tiny ImageNet", "sl_resnet34",
           _TINY, _sgd(0.05, 5e-4, 100, 128, "imagenet", schedule="plateau", gamma=0.1, plateau_patience=10),
           "lr 0.05 is A.4's rate for the ResNet-like networks (0.01 for VGGNets). Evaluation: resize 64, "
           "centre crop 56 (A.4 averages ten crops; wsviz evaluates the centre one)."),
    Recipe("shardnet-imagenet", "ShaRDNet, Appendix A.4 (Training protocol), ImageNet", "sl_resnet50", _IMAGENET,
           _sgd(0.1, 5e-4, 100, 256, "imagenet", schedule="plateau", gamma=0.1, plateau_patience=10),
           "centre-crop evaluation instead of A.4's ten crops; batch 256 (not stated).",
           {"num_classes": 1000, "input_size": 224}),
    Recipe("sharesnet-imagenet", "Boulch, ShaResNet, abstract and §4: 'trained exactly in the same fashion as "
           "the commonly used residual networks' (fb.resnet.torch)", "sharesnet50", _IMAGENET,
           _sgd(0.1, 1e-4, 90, 256, "imagenet", schedule="multistep", milestones=(30, 60), gamma=0.1),
           "the fb.resnet.torch ImageNet protocol the paper trains with."),
    Recipe("sharesnet-cifar", "Boulch, ShaResNet, §4 (CIFAR, wide ResNets trained as Zagoruyko & Komodakis)",
           "sharesnet_wrn40_4", "cifar10",
           _sgd(0.1, 5e-4, 200, 128, "cifar", schedule="multistep", milestones=(60, 120, 160), gamma=0.2),
           "the Wide ResNet CIFAR protocol (Zagoruyko & Komodakis 2016, §4) the paper reuses; ResNet-164 "
           "follows He et al. instead (wsms-cifar's schedule)."),
]}


def list_recipes() -> list[Recipe]:
    return list(RECIPES.values())


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(RECIPES), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise WsvizError(f"Unknown recipe {name!r}.{hint} Known: {', '.join(RECIPES)} "
                         "(python -m wsviz.train --list-recipes).") from None
