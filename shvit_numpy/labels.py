"""Class names: ImageNet-1k's (public, shipped as a text file), a file's own, or indices."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in the standard (sorted WordNet id) order."""
    text = (Path(__file__).parent / "imagenet_classes.txt").read_text()
    return tuple(text.splitlines())


def class_names(num_classes: int, labels=None) -> list[str]:
    """The file's labels if it has them, ImageNet's for 1000 classes, else '0', '1', ..."""
    if labels is not None:
        return list(labels)
    if num_classes == 1000:
        return list(imagenet_classes())
    return [str(i) for i in range(num_classes)]
