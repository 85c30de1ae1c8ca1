"""The SHViT model in plain NumPy: build from a config, load canonical weights, fold, run.

``load(path)`` reads a canonical or timm ``.safetensors`` file, or the authors' or timm's
``.pth``, with the numpy-only readers of ``shvit_numpy.weights`` and ``shvit_numpy.pth``, and
folds every BatchNorm once, at load. Calling the model (``forward``) takes the usual NCHW
float32 batch; inside, activations are channels-last (see layers.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .checks import check_array
from .config import SHViTConfig, default_resolution, se_channels
from .layers import FFN, BasicBlock, ConvBN, NormLinear, PatchMerging, ReLU, Residual, SingleHeadAttention, Stage
from .names import check_state, state_shapes, to_canonical
from .tree import Module, assign, fuse_children, walk
from .weights import Weights, load_weights


def downsample(dim: int, out_dim: int) -> list:
    """Between stages: Residual(DW), Residual(FFN), PatchMerging, Residual(DW), Residual(FFN)."""
    return [
        Residual(ConvBN(dim, dim, 3, 1, 1, groups=dim)), Residual(FFN(dim, 2 * dim)),
        PatchMerging(dim, out_dim, se_channels(4 * dim)),
        Residual(ConvBN(out_dim, out_dim, 3, 1, 1, groups=out_dim)), Residual(FFN(out_dim, 2 * out_dim)),
    ]


@dataclass
class Intermediates:
    """What ``forward_intermediates`` returns: NCHW stage outputs (strides 16, 32, 64), every
    attention matrix by block name ((B, N, N), rows are queries), and the logits."""

    stages: list[np.ndarray]
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    logits: np.ndarray | None = None


class SHViT(Module):
    """Stem (4 stride-2 convs, total stride 16) -> 3 stages -> global average pool -> head."""

    def __init__(self, cfg: SHViTConfig):
        self.config = cfg
        self.labels, self.resolution = None, None
        d = (cfg.in_chans,) + cfg.stem_dims
        self.patch_embed = [ConvBN(d[0], d[1], 3, 2, 1), ReLU(inplace=True), ConvBN(d[1], d[2], 3, 2, 1), ReLU(inplace=True),
                            ConvBN(d[2], d[3], 3, 2, 1), ReLU(inplace=True), ConvBN(d[3], d[4], 3, 2, 1)]
        self.stages = [
            Stage(downsample(cfg.embed_dim[s - 1], cfg.embed_dim[s]) if s else None,
                  [BasicBlock(cfg.embed_dim[s], cfg.qk_dim[s], cfg.partial_dim[s], cfg.types[s]) for _ in range(cfg.depth[s])])
            for s in range(3)
        ]
        self.head = NormLinear(cfg.embed_dim[2], cfg.num_classes)
        self.head_dist = NormLinear(cfg.embed_dim[2], cfg.num_classes) if cfg.distillation else None

    # -- weights ------------------------------------------------------------------------------------
    def load_state(self, state: dict[str, np.ndarray]) -> SHViT:
        """Set every tensor by walking its canonical name: attributes, and list indices for digits.

        ``state`` holds numpy arrays under canonical (timm) or the authors' names; a missing,
        unknown or mis-shaped tensor raises ``ShvitError`` naming it."""
        state = to_canonical(state)  # float32, C-contiguous, canonical names
        check_state(state, self.config)
        for name in state_shapes(self.config):
            assign(self, name, state[name])
        return self

    def fuse(self) -> SHViT:
        """Fold every BatchNorm for inference, in place; returns the model. Three folds (layers.py):
        ConvBN -> Conv2d with bias (w' = w g / sqrt(var + eps), b' = beta - mean g / sqrt(var + eps));
        Residual(depthwise ConvBN) -> one depthwise conv (+1 on each kernel's centre tap);
        head BatchNorm1d + Linear -> Linear (W' = W diag(s), b' = W t + b). Outputs change by rounding only."""
        return fuse_children(self)

    def children(self):
        yield from ((k, v) for k, v in super().children() if v is not None)

    # -- forward ------------------------------------------------------------------------------------
    # Public methods take and give NCHW, as torch does; inside, activations are channels-last.
    def features(self, x: np.ndarray) -> np.ndarray:
        """Channels-last (B, H, W, 3) -> last stage (B, ceil(H/64), ceil(W/64), C3), unchecked."""
        for layer in self.patch_embed:  # 4 stride-2 convs: (B, H/16, W/16, C1)
            x = layer(x)
        for stage in self.stages:  # strides 16, 32, 64
            x = stage(x)
        return x

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        """(B, C3) pooled features -> (B, classes); distilled: the mean of both heads at inference."""
        y = self.head(pooled)
        if self.head_dist is not None:
            y = (y + self.head_dist(pooled)) / 2
        return y

    def forward_features(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> last stage's map (B, C3, ceil(H/64), ceil(W/64))."""
        check_array(x, self.config.in_chans)
        return self.features(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def forward_head(self, x: np.ndarray) -> np.ndarray:
        """(B, C3, h, w) map -> logits: global average pool, then the head(s)."""
        return self.logits(x.mean(axis=(2, 3)))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32, any H and W -> logits (B, classes) float32 (``model(x)``)."""
        check_array(x, self.config.in_chans)
        return self.logits(self.features(x.transpose(0, 2, 3, 1)).mean(axis=(1, 2)))  # pool: (B, C3)

    def attention_layers(self) -> dict[str, SingleHeadAttention]:
        return {f"stages.{s}.blocks.{j}.mixer.m": b.mixer.m
                for s, stage in enumerate(self.stages) for j, b in enumerate(stage.blocks) if b.mixer is not None}

    def forward_intermediates(self, x: np.ndarray) -> Intermediates:
        """Each stage's output (NCHW) and every attention matrix, for docs and visualisation."""
        check_array(x, self.config.in_chans)
        layers = self.attention_layers()
        for m in layers.values():
            m.keep_attention = True
        try:
            h = x.transpose(0, 2, 3, 1)
            for layer in self.patch_embed:
                h = layer(h)
            outs = []
            for stage in self.stages:
                h = stage(h)
                outs.append(h.transpose(0, 3, 1, 2))
            return Intermediates(outs, {k: m.last_attention for k, m in layers.items()}, self.logits(h.mean(axis=(1, 2))))
        finally:
            for m in layers.values():
                m.keep_attention, m.last_attention = False, None

    def state_dict(self) -> dict[str, np.ndarray]:
        """The unfolded tensors by canonical name (only before ``fuse()``)."""
        return {name: walk(self, name) for name in state_shapes(self.config)}


def from_weights(w: Weights, fold: bool = True) -> SHViT:
    """A model holding ``w``'s tensors (and its labels and resolution), folded unless ``fold=False``."""
    model = SHViT(w.config).load_state(w.state)
    model.labels, model.resolution = w.labels, w.resolution or default_resolution(w.config)
    return model.fuse() if fold else model


def load(path, fold: bool = True) -> SHViT:
    """A ``.safetensors`` or ``.pth`` weight file -> model (BatchNorm folded unless ``fold=False``)."""
    return from_weights(load_weights(path), fold)
