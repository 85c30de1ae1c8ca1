"""SHViT's configuration: one frozen dataclass, and the paper's variants as data.

Shared by all three runtimes (this module imports only the standard library).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import ShvitError

BLOCK_TYPES = ("i", "s")  # "i": depthwise conv + FFN; "s": depthwise conv + single-head attention + FFN


@dataclass(frozen=True)
class SHViTConfig:
    """Everything that fixes the shapes of an SHViT model.

    Three stages at strides 16, 32 and 64. ``partial_dim`` is the number of channels the
    single-head attention sees (the paper's partial channels); it is unused in a stage of
    type "i".
    """

    embed_dim: tuple[int, int, int] = (128, 224, 320)
    partial_dim: tuple[int, int, int] = (32, 48, 68)
    depth: tuple[int, int, int] = (2, 4, 5)
    qk_dim: tuple[int, int, int] = (16, 16, 16)
    types: tuple[str, str, str] = ("i", "s", "s")
    num_classes: int = 1000
    distillation: bool = False
    in_chans: int = 3

    def __post_init__(self):
        for name in ("embed_dim", "partial_dim", "depth", "qk_dim", "types"):
            value = getattr(self, name)
            if isinstance(value, list):  # accept lists (JSON) but store tuples (hashable)
                object.__setattr__(self, name, tuple(value))
                value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 3:
                raise ShvitError(f"config.{name} must have 3 entries (one per stage), got {value!r}")
        for name in ("embed_dim", "partial_dim", "qk_dim"):
            if not all(isinstance(v, int) and v >= 1 for v in getattr(self, name)):
                raise ShvitError(f"config.{name} must be positive integers, got {getattr(self, name)!r}")
        if not all(isinstance(d, int) and d >= 0 for d in self.depth):
            raise ShvitError(f"config.depth must be integers >= 0, got {self.depth!r}")
        if self.embed_dim[0] < 8:
            raise ShvitError(f"config.embed_dim[0] must be >= 8 (the stem starts at embed_dim[0] // 8 channels), got {self.embed_dim[0]}")
        for i, (c, p, t) in enumerate(zip(self.embed_dim, self.partial_dim, self.types)):
            if t not in BLOCK_TYPES:
                raise ShvitError(f"config.types[{i}] must be one of {BLOCK_TYPES}, got {t!r}")
            if t == "s" and p > c:
                raise ShvitError(f"config.partial_dim[{i}] must be <= embed_dim[{i}] = {c}, got {p}")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 1):
            raise ShvitError(f"config.num_classes must be an integer >= 1, got {self.num_classes!r}")
        if not (isinstance(self.in_chans, int) and self.in_chans >= 1):
            raise ShvitError(f"config.in_chans must be an integer >= 1, got {self.in_chans!r}")

    @property
    def stem_dims(self) -> tuple[int, int, int, int]:
        """Output channels of the four stride-2 stem convolutions: C/8, C/4, C/2, C."""
        c = self.embed_dim[0]
        return (c // 8, c // 4, c // 2, c)

    def replace(self, **changes) -> SHViTConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SHViTConfig:
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShvitError(f"the config stored in the file is not valid JSON ({e.msg})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not set(fields) <= known:
            raise ShvitError(f"the config stored in the file has unknown fields; expected a subset of {sorted(known)}")
        return cls(**fields)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``divisor``), as timm's SE does."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def se_channels(ch: int) -> int:
    """Squeeze-excite bottleneck width: make_divisible(ch / 4, 8) (1232 -> 312 in s2)."""
    return make_divisible(ch / 4, 8)


# The paper's variants (spec table); resolution is the train/eval image size.
VARIANTS: dict[str, SHViTConfig] = {
    "s1": SHViTConfig(embed_dim=(128, 224, 320), partial_dim=(32, 48, 68), depth=(2, 4, 5)),
    "s2": SHViTConfig(embed_dim=(128, 308, 448), partial_dim=(32, 66, 96), depth=(2, 4, 5)),
    "s3": SHViTConfig(embed_dim=(192, 352, 448), partial_dim=(48, 75, 96), depth=(3, 5, 5)),
    "s4": SHViTConfig(embed_dim=(224, 336, 448), partial_dim=(48, 72, 96), depth=(4, 7, 6)),
}
RESOLUTION: dict[str, int] = {"s1": 224, "s2": 224, "s3": 224, "s4": 256}


def get_config(variant_or_config, **overrides) -> SHViTConfig:
    """``"s1"``..``"s4"``, an ``SHViTConfig`` or a dict of its fields -> ``SHViTConfig``."""
    if isinstance(variant_or_config, SHViTConfig):
        cfg = variant_or_config
    elif isinstance(variant_or_config, str):
        key = variant_or_config.lower().removeprefix("shvit_")
        if key not in VARIANTS:
            raise ShvitError(f"unknown variant {variant_or_config!r}; expected one of {sorted(VARIANTS)}")
        cfg = VARIANTS[key]
    elif isinstance(variant_or_config, dict):
        cfg = SHViTConfig(**variant_or_config)
    else:
        raise ShvitError(f"expected a variant name, SHViTConfig or dict, got {type(variant_or_config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg


def variant_name(cfg: SHViTConfig) -> str | None:
    """The variant whose architecture ``cfg`` is (ignoring classes and distillation), if any."""
    for name, v in VARIANTS.items():
        if v == cfg.replace(num_classes=v.num_classes, distillation=v.distillation):
            return name
    return None


def default_resolution(cfg: SHViTConfig) -> int:
    return RESOLUTION.get(variant_name(cfg) or "", 224)
