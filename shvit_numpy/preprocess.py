"""The spec's evaluation preprocessing, from an image file to a normalised float32 array.

RGB; resize the shorter side to int(256 / 224 * res) (bicubic); centre crop res x res;
scale to [0, 1]; normalise with ImageNet's mean and std. Decoding and resizing use Pillow,
imported only here and only when an image is actually read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ShvitError

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def resize_size(res: int) -> int:
    return int(256 / 224 * res)


def normalize(rgb_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 normalised."""
    x = rgb_uint8.astype(np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1).copy()


def preprocess_pil(im, res: int) -> np.ndarray:
    """A PIL image -> (3, res, res) float32: RGB, shorter side to int(256/224*res) (bicubic),
    centre crop, normalise. The one implementation every runtime and the trainer use."""
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    short = resize_size(res)  # torchvision's Resize(int): shorter side -> short
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize(size, Image.BICUBIC)
    left, top = round((size[0] - res) / 2), round((size[1] - res) / 2)  # CenterCrop
    return normalize(np.asarray(im.crop((left, top, left + res, top + res))))


def load_image(path, res: int) -> np.ndarray:
    """One image file -> (3, res, res) float32, ready for any of the three models."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ShvitError("reading images needs Pillow: pip install pillow") from None
    path = Path(path)
    if not path.is_file():
        raise ShvitError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return preprocess_pil(im, res)
    except (UnidentifiedImageError, OSError) as e:
        raise ShvitError(f"cannot read image {path}: {e}") from None


def load_images(paths, res: int) -> np.ndarray:
    return np.stack([load_image(p, res) for p in paths])
