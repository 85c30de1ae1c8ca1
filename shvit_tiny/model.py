"""The SHViT model in tinygrad: build from a config, load canonical weights, fold, run (JIT).

``load(path, device)`` reads a canonical or timm ``.safetensors`` file with tinygrad's own
``safe_load`` straight onto the device, folds every BatchNorm in float32, and optionally casts
to float16. Calling the model with a numpy array returns numpy logits; with a Tensor, a Tensor.
Repeated calls with one input shape replay a TinyJit capture (one per shape).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.nn.state import safe_load, safe_load_metadata

from shvit_numpy.checks import check_array, check_input
from shvit_numpy.config import SHViTConfig, default_resolution, se_channels
from shvit_numpy.errors import ShvitError
from shvit_numpy.names import authors_to_canonical, check_state, detect_format, infer_config, state_shapes
from shvit_numpy.weights import read_safetensors

from .devices import compile_context
from .layers import FFN, BasicBlock, ConvBN, Module, NormLinear, PatchMerging, ReLU, Residual, Stage, channels_last, fuse, tensors
from .layers import prepare as prepare_tree


def downsample(dim: int, out_dim: int) -> list:
    """Between stages: Residual(DW), Residual(FFN), PatchMerging, Residual(DW), Residual(FFN)."""
    return [
        Residual(ConvBN(dim, dim, 3, 1, 1, groups=dim)), Residual(FFN(dim, 2 * dim)),
        PatchMerging(dim, out_dim, se_channels(4 * dim)),
        Residual(ConvBN(out_dim, out_dim, 3, 1, 1, groups=out_dim)), Residual(FFN(out_dim, 2 * out_dim)),
    ]


class SHViT(Module):
    """Stem (4 stride-2 convs, total stride 16) -> 3 stages -> global average pool -> head."""

    def __init__(self, cfg: SHViTConfig):
        self.config = cfg
        self.labels, self.resolution, self.device, self.dtype = None, None, None, dtypes.float32
        d = (cfg.in_chans,) + cfg.stem_dims
        self.patch_embed = [ConvBN(d[0], d[1], 3, 2, 1), ReLU(), ConvBN(d[1], d[2], 3, 2, 1), ReLU(),
                            ConvBN(d[2], d[3], 3, 2, 1), ReLU(), ConvBN(d[3], d[4], 3, 2, 1)]
        self.stages = [
            Stage(downsample(cfg.embed_dim[s - 1], cfg.embed_dim[s]) if s else None,
                  [BasicBlock(cfg.embed_dim[s], cfg.qk_dim[s], cfg.partial_dim[s], cfg.types[s]) for _ in range(cfg.depth[s])])
            for s in range(3)
        ]
        self.head = NormLinear(cfg.embed_dim[2], cfg.num_classes)
        self.head_dist = NormLinear(cfg.embed_dim[2], cfg.num_classes) if cfg.distillation else None
        self._jits: dict[tuple, TinyJit] = {}

    def children(self):
        yield from ((k, v) for k, v in super().children() if v is not None)

    # -- weights ------------------------------------------------------------------------------------
    def _walk(self, name: str):
        *path, leaf = name.split(".")
        obj = self
        for part in path:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        return obj, leaf

    def load_state(self, state: dict[str, Tensor]) -> SHViT:
        """Set every tensor by walking its canonical name: attributes, and list indices for digits."""
        for name in state_shapes(self.config):
            obj, leaf = self._walk(name)
            setattr(obj, leaf, state[name])
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The unfolded tensors by canonical name, as numpy (only before ``fuse()``)."""
        return {name: getattr(*self._walk(name)).numpy() for name in state_shapes(self.config)}

    def fuse(self, ready: bool = True) -> SHViT:
        """Fold every BatchNorm into the layer before it, in place (see ConvBN.fuse); ``ready``:
        then lay out and compute the new weights (``load`` does that once, after any cast)."""
        for name, child in list(self.children()):
            setattr(self, name, [fuse(c) for c in child] if isinstance(child, list) else fuse(child))
        return self.prepare().realize() if ready else self

    def half(self, ready: bool = True) -> SHViT:
        """Cast every weight to float16 (GroupNorm and softmax still compute in float32)."""
        for _, child in list(self.children()):
            _cast_tree(child, dtypes.float16)
        self.dtype = dtypes.float16
        return self.prepare().realize() if ready else self

    def prepare(self) -> SHViT:
        """Cache every convolution's weight in the layout its product reads (see Conv2d.matrix):
        done once here rather than re-read with strides in every call."""
        for _, child in self.children():
            for c in child if isinstance(child, list) else [child]:
                prepare_tree(c)
        return self

    def realize(self) -> SHViT:
        """Compute every weight the model holds (read, folded, cast, laid out) in one schedule;
        the JIT captures made with the old weights are dropped."""
        Tensor.realize(*tensors(self))
        self._jits.clear()
        return self

    # -- forward ------------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> last stage's map, channels-last: (B, ceil(H/64), ceil(W/64), C3)."""
        return self.forward_intermediates(x, channels_first=False)[-1]

    def forward_intermediates(self, x: Tensor, channels_first: bool = True) -> list[Tensor]:
        """(B, 3, H, W) -> the three stage outputs, at strides 16, 32 and 64 (NCHW, as torch's)."""
        outs = []
        with channels_last():
            x = x.permute(0, 2, 3, 1)  # the one layout change: (B, H, W, 3)
            for conv, act in zip(self.patch_embed[::2], self.patch_embed[1::2] + [None]):  # ConvBN, ReLU, ..., ConvBN
                x = conv(x, relu=act is not None)  # the ReLU applied in the convolution's last step
            for stage in self.stages:
                x = stage(x)
                outs.append(x.permute(0, 3, 1, 2) if channels_first else x)
        return outs

    def forward_head(self, x: Tensor) -> Tensor:
        """Channels-last (B, H, W, C3) -> (B, classes)."""
        pooled = x.contiguous().mean(axis=(1, 2))  # global average pool of (B, H, W, C3): (B, C3); the
        # map is realised first, else tinygrad folds the last product into the pooling reduce (4x slower)
        y = self.head(pooled)
        if self.head_dist is not None:  # distilled: the mean of both heads at inference
            y = (y + self.head_dist(pooled)) / 2
        return y

    def forward(self, x: Tensor) -> Tensor:
        """The lazy graph, no JIT: (B, 3, H, W) -> (B, classes) float32."""
        return self.forward_head(self.forward_features(x.cast(self.dtype))).float()

    def _jitted(self, x: Tensor) -> Tensor:
        key = (x.shape, x.dtype, x.device)
        if key not in self._jits:
            self._jits[key] = TinyJit(lambda t: self.forward(t).realize())
        with compile_context(self.device):  # the first two calls compile and capture; later ones replay
            return self._jits[key](x)

    def __call__(self, x, jit: bool = True):
        """numpy (B, 3, H, W) float32 -> numpy logits; a Tensor -> a Tensor. Any H and W."""
        if isinstance(x, Tensor):
            check_input(x.shape, np.dtype(x.dtype.fmt).name if x.dtype.fmt else str(x.dtype), self.config.in_chans)
            return self._jitted(x.to(self.device).contiguous().realize()) if jit else self.forward(x.to(self.device))
        check_array(x, self.config.in_chans)
        t = Tensor(np.ascontiguousarray(x), device=self.device).realize()
        return (self._jitted(t) if jit else self.forward(t)).numpy()


def _cast_tree(module, dtype):
    if isinstance(module, list):
        for m in module:
            _cast_tree(m, dtype)
        return
    for name, value in list(vars(module).items()):
        if isinstance(value, Tensor):
            setattr(module, name, value.cast(dtype))
        elif isinstance(value, Module) or (isinstance(value, list) and value and isinstance(value[0], Module)):
            _cast_tree(value, dtype)


def read_state(path: Path, device: str) -> tuple[SHViTConfig, dict[str, Tensor], list | None, int | None]:
    """tinygrad's own ``safe_load``: tensors land on ``device`` (float32); config from the metadata
    or, for timm's files, inferred from the shapes."""
    path = Path(path)
    if not path.is_file():
        raise ShvitError(f"weight file not found: {path}")
    if path.suffix in (".pth", ".pt", ".bin", ".tar"):
        raise ShvitError(f"{path} is a torch pickle; convert it first: python -m shvit_torch.convert {path} model.safetensors")
    read_safetensors_header(path)
    meta = safe_load_metadata(str(path))[2].get("__metadata__") or {}
    raw = safe_load(str(path))
    state = {k.removeprefix("module."): v for k, v in raw.items() if not k.endswith("num_batches_tracked")}
    if detect_format(state) == "authors":
        state = {authors_to_canonical(k): v for k, v in state.items()}
    state = {k: (v.reshape(*v.shape, 1, 1) if v.ndim == 2 and k.endswith((".c.weight", ".fc1.weight", ".fc2.weight")) else v)
             for k, v in state.items()}
    cfg = SHViTConfig.from_json(meta["shvit_config"]) if "shvit_config" in meta else infer_config({k: v.shape for k, v in state.items()})
    check_state(state, cfg)
    labels = json.loads(meta["shvit_labels"]) if "shvit_labels" in meta else None
    resolution = int(meta["shvit_resolution"]) if "shvit_resolution" in meta else None
    state = {k: v.to(device).cast(dtypes.float32) for k, v in state.items()}  # lazy: load() realises all at once
    return cfg, state, labels, resolution


def read_safetensors_header(path: Path) -> None:
    """Reject a truncated or malformed file with the library's error before tinygrad reads it
    (the numpy reader checks the header, every offset and every dtype)."""
    read_safetensors(path)


def load(path, device: str | None = None, half: bool = False, fold: bool = True) -> SHViT:
    """A canonical or timm ``.safetensors`` file -> model on ``device`` (tinygrad's default if None)."""
    from .devices import resolve_device

    device = resolve_device(device)
    cfg, state, labels, resolution = read_state(Path(path), device)
    model = SHViT(cfg).load_state(state)
    model.labels, model.resolution, model.device = labels, resolution or default_resolution(cfg), device
    if fold:
        model.fuse(ready=False)
    if half:
        model.half(ready=False)
    return model.prepare().realize()  # one schedule for every weight kernel
