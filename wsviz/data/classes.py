"""Class names of the datasets wsviz trains on, so predictions read as names, not indices."""

from __future__ import annotations

from pathlib import Path

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_names(dataset: str | None, num_classes: int) -> list[str]:
    """Names of the ``num_classes`` classes of ``dataset`` (a card's dataset name); indices as text
    where the names are not known offline (CIFAR-100) or the dataset is unknown."""
    name = (dataset or "").lower()
    if name.startswith(("mnist", "mnist5k")) and num_classes == 10:
        return [str(i) for i in range(10)]
    if name.startswith("fashion-mnist") and num_classes == 10:
        return list(FASHION)
    if name == "cifar10" and num_classes == 10:
        return list(CIFAR10)
    if name.startswith("folder:"):
        from wsviz.data.datasets import _folder_classes
        from wsviz.errors import WsvizError

        try:
            found = _folder_classes(Path(dataset[len("folder:"):]))
        except (WsvizError, OSError):
            found = []
        if len(found) == num_classes:
            return list(found)
    return [f"class {i}" for i in range(num_classes)]
