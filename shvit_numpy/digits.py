"""The demo's data as NumPy arrays: scikit-learn's handwritten digits, and the canvas task built from
them (the largest of three digits on a 128x128 image), and the small SHViT sized for them that
both trainers start from. shvit_torch.data wraps these arrays as tensors; shvit_numpy.train uses
them as they are, without torch.

The 1797 8x8 scans ship with scikit-learn (``load_digits``) and are drawn with Pillow; both are
imported only when data is built. Every image goes through the spec's evaluation preprocessing
(shvit_numpy.preprocess), so a model trained on them classifies the same PNG files correctly in
all three runtimes' CLIs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import SHViTConfig
from .errors import ShvitError
from .preprocess import preprocess_pil, resize_size

DIGITS_RES = 64  # 8x8 scans shown at 64x64: 4x4 tokens in stage 1, 2x2 and 1x1 in the attention stages
DIGITS_RENDER = 32  # the PNG size a digit is rendered to before preprocessing
CANVAS_RES = 128  # 8x8 tokens in stage 1, 4x4 = 16 in stage 2 (attention), 2x2 in stage 3 (attention)
CANVAS_DIGITS = 3  # distinct digits per canvas; the label is the largest, so '2'..'9'
CANVAS_CLASSES = [str(d) for d in range(CANVAS_DIGITS - 1, 10)]
CANVAS_NOISE = 12.0  # std of the Gaussian pixel noise, in grey levels (0-255)
CANVAS_SIZES = (6000, 1000)  # train, test canvases
# The demo's small SHViT, the default model of shvit_torch.train and shvit_numpy.train: 334k parameters;
# attention over 4x4 tokens (stage 2) and 2x2 (stage 3) on the canvases, 2x2 and 1x1 on 64x64 digits.
# The trainers give it their data's class count (8 canvas classes here, 10 for the digits).
DEMO_CONFIG = SHViTConfig(embed_dim=(32, 64, 96), partial_dim=(8, 16, 24), depth=(1, 2, 2), num_classes=len(CANVAS_CLASSES))

__all__ = ["DIGITS_RES", "DIGITS_RENDER", "CANVAS_RES", "CANVAS_DIGITS", "CANVAS_CLASSES", "CANVAS_NOISE", "CANVAS_SIZES",
           "DEMO_CONFIG", "Arrays", "load_digits", "render_digit", "digits_split", "digits_arrays", "CanvasSpec", "canvas_corners",
           "canvas_specs", "digit_inks", "render_canvas", "canvas_split_specs", "canvas_arrays"]


@dataclass
class Arrays:
    """A split as NumPy arrays: images (N, 3, res, res) float32, normalised; labels (N,) int64."""

    x: np.ndarray
    y: np.ndarray


def load_digits():
    """scikit-learn's digits (``.images`` (1797, 8, 8), ``.target``), or one clear line without it."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ShvitError("the digits data needs scikit-learn (it ships the scans) and Pillow: pip install scikit-learn pillow") from None
    return sk_load_digits()


def render_digit(pixels: np.ndarray):
    """An 8x8 digit (0 = paper, 16 = ink) -> a 32x32 RGB image, dark ink on white, as a scan looks."""
    from PIL import Image

    grey = (255 - pixels.astype(np.float32) * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB").resize((DIGITS_RENDER, DIGITS_RENDER), Image.BICUBIC)


def digits_split(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed split: stratified 75/25 with random_state=0 (1347 train, 450 test indices)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(target)), test_size=0.25, random_state=0, stratify=target)


def digits_arrays(res: int = DIGITS_RES) -> tuple[Arrays, Arrays]:
    """(train, test): the 1797 digits rendered as dark ink on white and preprocessed at ``res``;
    the split of ``digits_split``."""
    d = load_digits()
    idx_train, idx_test = digits_split(d.target)
    x = np.stack([preprocess_pil(render_digit(im), res) for im in d.images])
    y = d.target.astype(np.int64)
    return Arrays(x[idx_train], y[idx_train]), Arrays(x[idx_test], y[idx_test])


@dataclass(frozen=True)
class CanvasSpec:
    """One canvas, before drawing: which scans go where, and the label they imply."""

    scans: tuple[int, ...]  # indices into load_digits().images
    digits: tuple[int, ...]  # their classes, distinct
    corners: tuple[tuple[int, int], ...]  # (top, left) of each 32x32 digit on the canvas
    noise_seed: int

    @property
    def label(self) -> int:
        """The class index of the largest digit in CANVAS_CLASSES (digit d is class d - 2)."""
        return max(self.digits) - (CANVAS_DIGITS - 1)


def canvas_corners(rng: np.random.Generator, n: int, gap: int = 2) -> tuple[tuple[int, int], ...]:
    """n non-overlapping 32x32 boxes (at least ``gap`` pixels apart) inside the centre 128x128
    crop of a resize_size(128) = 146-pixel canvas, so preprocessing crops no ink; by rejection."""
    res, d = CANVAS_RES, DIGITS_RENDER
    size = resize_size(res)
    lo = (size - res) // 2 + 2
    hi = lo + res - 4 - d  # last top-left coordinate that keeps the box inside the crop
    boxes: list[tuple[int, int]] = []
    while len(boxes) < n:
        t, le = (int(v) for v in rng.integers(lo, hi + 1, 2))
        if all(abs(t - t2) >= d + gap or abs(le - l2) >= d + gap for t2, l2 in boxes):
            boxes.append((t, le))
    return tuple(boxes)


def canvas_specs(target: np.ndarray, pool: np.ndarray, n: int, seed: int) -> list[CanvasSpec]:
    """n canvases drawn from the scans in ``pool`` only: the largest digit uniform over 2..9,
    the other two distinct and smaller, each a random scan of its class at a random place."""
    rng = np.random.default_rng(seed)
    by_class = {d: pool[target[pool] == d] for d in range(10)}
    specs = []
    for _ in range(n):
        top = int(rng.integers(CANVAS_DIGITS - 1, 10))
        digits = [top, *(int(d) for d in rng.choice(top, CANVAS_DIGITS - 1, replace=False))]
        rng.shuffle(digits)
        scans = tuple(int(rng.choice(by_class[d])) for d in digits)
        specs.append(CanvasSpec(scans, tuple(digits), canvas_corners(rng, CANVAS_DIGITS), int(rng.integers(2**31))))
    return specs


def digit_inks(images: np.ndarray) -> np.ndarray:
    """Every 8x8 scan as ``render_digit`` draws it, grey: (N, 32, 32) float32, 255 = paper."""
    return np.stack([np.asarray(render_digit(im).convert("L"), np.float32) for im in images])


def render_canvas(inks: np.ndarray, spec: CanvasSpec):
    """A spec -> a 146x146 RGB image: white paper, each digit from ``digit_inks`` pasted at its
    corner, plus a little Gaussian noise (the same for the same spec)."""
    from PIL import Image

    size, d = resize_size(CANVAS_RES), DIGITS_RENDER
    grey = np.full((size, size), 255.0, np.float32)
    for scan, (t, le) in zip(spec.scans, spec.corners):
        grey[t:t + d, le:le + d] = np.minimum(grey[t:t + d, le:le + d], inks[scan])
    grey += np.random.default_rng(spec.noise_seed).normal(0, CANVAS_NOISE, grey.shape)
    return Image.fromarray(grey.clip(0, 255).round().astype(np.uint8)).convert("RGB")


def canvas_split_specs(sizes: tuple[int, int] = CANVAS_SIZES, seed: int = 0) -> tuple[list[CanvasSpec], list[CanvasSpec]]:
    """(train, test) specs: train canvases use only ``digits_split``'s train scans and test
    canvases only its test scans, so no test scan was ever seen in training."""
    target = load_digits().target
    idx_train, idx_test = digits_split(target)
    return (canvas_specs(target, np.sort(idx_train), sizes[0], seed * 2 + 1),
            canvas_specs(target, np.sort(idx_test), sizes[1], seed * 2 + 2))


def canvas_arrays(res: int = CANVAS_RES, sizes: tuple[int, int] = CANVAS_SIZES, seed: int = 0) -> tuple[Arrays, Arrays]:
    """(train, test): the largest of three handwritten digits placed on a canvas (8 classes,
    '2'..'9'): a label that needs every digit on the image, so attention has distant tokens to
    relate. Deterministic from ``seed``; drawn at 146x146 and preprocessed at ``res`` as the
    runtimes' CLIs do (at 128, the centre crop, no rescaling)."""
    inks = digit_inks(load_digits().images)
    splits = []
    for specs in canvas_split_specs(sizes, seed):
        x = np.stack([preprocess_pil(render_canvas(inks, s), res) for s in specs]) if specs else np.zeros((0, 3, res, res), np.float32)
        splits.append(Arrays(x, np.array([s.label for s in specs], dtype=np.int64)))
    return splits[0], splits[1]
