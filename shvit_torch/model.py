"""The SHViT model in PyTorch: ``create``, ``load``, ``save``, and the model class.

State-dict names are the canonical (timm) names of ``shvit_numpy.names.state_shapes``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shvit_numpy.checks import check_finite, check_input
from shvit_numpy.config import SHViTConfig, default_resolution, get_config
from shvit_numpy.errors import ShvitError
from shvit_numpy.names import state_shapes
from shvit_numpy.weights import Weights, save_weights

from .layers import ConvBN, NormLinear, Stage, fuse_modules


class SHViT(nn.Module):
    """Stem (4 stride-2 ConvBNs, total stride 16) -> 3 stages (strides 16, 32, 64) -> pooled head.

    ``forward`` returns logits; with a distillation head it returns the mean of both heads in
    eval mode and the pair ``(head, head_dist)`` in training, as the authors' model does.
    """

    def __init__(self, config: SHViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = cfg = config
        self.labels: list[str] | None = None  # class names, if the weight file had them
        self.resolution: int | None = None  # training resolution, if known
        d = (cfg.in_chans,) + cfg.stem_dims
        self.patch_embed = nn.Sequential(
            ConvBN(d[0], d[1], 3, 2, 1), nn.ReLU(),
            ConvBN(d[1], d[2], 3, 2, 1), nn.ReLU(),
            ConvBN(d[2], d[3], 3, 2, 1), nn.ReLU(),
            ConvBN(d[3], d[4], 3, 2, 1),
        )
        # stochastic depth: rate grows linearly over the residual blocks (stage blocks only)
        rates = np.linspace(0, drop_path_rate, max(1, sum(cfg.depth))).tolist()
        stages, start = [], 0
        for s in range(3):
            stages.append(Stage(cfg.embed_dim[s - 1] if s else None, cfg.embed_dim[s], cfg.qk_dim[s],
                                cfg.partial_dim[s], cfg.types[s], cfg.depth[s], rates[start:start + cfg.depth[s]]))
            start += cfg.depth[s]
        self.stages = nn.Sequential(*stages)
        self.head = NormLinear(cfg.embed_dim[2], cfg.num_classes)
        if cfg.distillation:
            self.head_dist = NormLinear(cfg.embed_dim[2], cfg.num_classes)
        self.fused = False

    # -- forward -------------------------------------------------------------------------------
    def check(self, x: torch.Tensor) -> None:
        """Shape and dtype (always), finiteness (in eval mode): the library's error, not torch's."""
        if not isinstance(x, torch.Tensor):
            raise ShvitError(f"input is a {type(x).__name__}, expected a torch.Tensor")
        expected = str(next(self.parameters()).dtype).removeprefix("torch.")
        check_input(x.shape, str(x.dtype).removeprefix("torch."), self.config.in_chans, expected)
        if not self.training and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(x)  # NaN propagates, so two numbers tell (16x cheaper than isfinite(x).all())
            check_finite(bool(torch.isfinite(lo) & torch.isfinite(hi)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> last stage's map (B, C3, ceil(H/64), ceil(W/64))."""
        return self.stages(self.patch_embed(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The three stage outputs at strides 16, 32 and 64 (for detection backbones)."""
        x = self.patch_embed(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = x.mean((2, 3))  # global average pool: (B, C3)
        if pre_logits:
            return x
        if not self.config.distillation:
            return self.head(x)
        y, y_dist = self.head(x), self.head_dist(x)
        return (y, y_dist) if self.training else (y + y_dist) / 2

    def forward(self, x: torch.Tensor):
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check(x)
        return self.forward_head(self.forward_features(x))

    # -- inference and fine-tuning ----------------------------------------------------------------
    def fuse(self) -> SHViT:
        """A folded inference copy (eval mode): every ConvBN -> Conv2d, head BN -> Linear,
        residual depthwise ConvBN -> one Conv2d. Outputs equal this model's in eval mode."""
        fused = copy.deepcopy(self).eval()
        for name, child in list(fused.named_children()):
            setattr(fused, name, fuse_modules(child))
        fused.fused = True
        return fused

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head (and distillation head) for ``num_classes`` classes, for fine-tuning."""
        if self.fused:
            raise ShvitError("cannot reset the classifier of a folded model; reset it before fuse()")
        self.config = self.config.replace(num_classes=num_classes)
        device = self.head.l.weight.device
        self.head = NormLinear(self.config.embed_dim[2], num_classes).to(device)
        if self.config.distillation:
            self.head_dist = NormLinear(self.config.embed_dim[2], num_classes).to(device)
        self.labels = None

    def canonical_state(self) -> dict[str, np.ndarray]:
        """The unfolded weights as float32 numpy arrays under canonical names."""
        if self.fused:
            raise ShvitError("a folded model cannot be saved in the canonical (unfolded) format; save before fuse()")
        sd = self.state_dict()
        return {k: sd[k].detach().float().cpu().numpy() for k in state_shapes(self.config)}


def create(variant_or_config="s1", num_classes: int | None = None, distillation: bool | None = None,
           drop_path_rate: float = 0.0, **config_fields) -> SHViT:
    """A new randomly initialised SHViT: a variant name ("s1".."s4") or an ``SHViTConfig``/dict,
    with optional overrides (``num_classes``, ``distillation``, any config field)."""
    overrides = dict(config_fields)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if distillation is not None:
        overrides["distillation"] = distillation
    cfg = get_config(variant_or_config, **overrides)
    model = SHViT(cfg, drop_path_rate=drop_path_rate)
    if isinstance(variant_or_config, str):
        model.resolution = default_resolution(cfg)
    return model


def from_weights(w: Weights) -> SHViT:
    """An eval-mode model holding ``w``'s tensors exactly."""
    model = SHViT(w.config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in w.state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # check_state already guarantees this; a guard against drift
        raise ShvitError(f"weights do not fit the model: missing {missing[:1]}, unexpected {unexpected[:1]}")
    model.labels, model.resolution = w.labels, w.resolution or default_resolution(w.config)
    return model.eval()


def load(path) -> SHViT:
    """Any accepted weight file -> model in eval mode. See ``shvit_torch.checkpoint``."""
    from .checkpoint import read_checkpoint

    return from_weights(read_checkpoint(Path(path)))


def save(model: SHViT, path, labels=None, resolution: int | None = None) -> None:
    """Write ``model`` as a canonical safetensors file (float32, config in the metadata), atomically."""
    save_weights(path, model.config, model.canonical_state(), labels if labels is not None else model.labels,
                 resolution if resolution is not None else model.resolution)
