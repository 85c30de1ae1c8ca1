"""The SHViT model in tinygrad: build from a config, load canonical weights, fold, run (JIT).

``load(path, device)`` reads a weight file with shvit_numpy (every format it knows), folds every
BatchNorm in float32 and lays each weight out for its product on the host, optionally casts to
float16, and copies the result to the device. Calling the model with a numpy array returns numpy
logits; with a Tensor, a Tensor. Each input shape is captured once by TinyJit (on its first call)
and replayed after; captures persist across processes in the compiled-model cache (cache.py).
"""
from __future__ import annotations

import hashlib

import numpy as np
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.dtype import _from_np_dtype

from shvit_numpy.checks import check_array, check_input
from shvit_numpy.config import SHViTConfig, se_channels
from shvit_numpy.names import state_shapes
from shvit_numpy.weights import load_weights

from . import cache as _cache
from .devices import compile_context
from .layers import (
    FFN,
    BasicBlock,
    ConvBN,
    Module,
    NormLinear,
    PatchMerging,
    ReLU,
    Residual,
    Stage,
    building_on,
    channels_last,
    column_block,
    fuse,
    padded_columns,
    tensors,
)
from .layers import prepare as prepare_tree
from .replay import CpuReplay, cpu_replay


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
        self._replays: dict[tuple, CpuReplay | None] = {}  # numpy input on the CPU device: replay.py
        self.weights_id = None  # set by load(): names these weights in the compiled-model cache

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
        self._replays.clear()
        self.weights_id = None  # new weights: no longer those of the file load() read
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
        return self.forward_head(self.forward_features(x.cast(self.dtype))).float().contiguous()  # its own buffer (replay.py reads it)

    def _jitted(self, x: Tensor) -> Tensor:
        """The forward pass as a TinyJit capture, one per input shape: from the compiled-model
        cache when it has one (see cache.py), else captured on this first call and saved there."""
        key = (x.shape, x.dtype, x.device)
        jit, parts = self._jits.get(key), None
        if jit is None:
            parts = self.cache_parts(x)
            jit = _cache.fetch(parts) if parts is not None else None
            if jit is None:
                jit = TinyJit(lambda t: self.forward(t).realize())
                jit.cnt = 1  # capture on the first call: the weights are realised, nothing one-off to leave out
            else:
                parts = None  # loaded: nothing to save
            self._jits[key] = jit
        with compile_context(self.device):
            y = jit(x)
        if parts is not None:
            y = Tensor(y.numpy(), device=self.device)  # saving frees the capture's own buffers, its output's too
            _cache.store(parts, jit)
        return y

    def cache_parts(self, x: Tensor) -> dict | None:
        """This model's and input's compiled-model cache key, or None where it does not apply
        (turned off, or weights that are not a file's as ``load`` read it)."""
        if self.weights_id is None or not _cache.enabled():
            return None
        return _cache.key_parts(self.weights_id, x.shape, x.dtype.name, self.device)

    def __call__(self, x, jit: bool = True):
        """numpy (B, 3, H, W) float32 -> numpy logits; a Tensor -> a Tensor. Any H and W."""
        if isinstance(x, Tensor):
            check_input(x.shape, np.dtype(x.dtype.fmt).name if x.dtype.fmt else str(x.dtype), self.config.in_chans)
            return self._jitted(x.to(self.device).contiguous().realize()) if jit else self.forward(x.to(self.device))
        check_array(x, self.config.in_chans)
        if jit and (replay := self._replays.get(x.shape)) is not None:
            return replay(x)  # the capture as flat C calls (CPU device, from the second call of a shape on)
        t = Tensor(np.ascontiguousarray(x), device=self.device).realize()
        if not jit:
            with compile_context(self.device):  # the JIT's kernels, compiled as the JIT compiles them
                return self.forward(t).numpy()
        y = self._jitted(t).numpy()
        if x.shape not in self._replays:
            self._replays[x.shape] = cpu_replay(self._jits[(t.shape, t.dtype, t.device)], self.device, x.shape, t.dtype)
        return y


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


def copy_host(tiny, host, device: str, dtype) -> None:
    """Set every array of the numpy layer tree ``host`` on the same attribute of ``tiny`` (the
    two mirror each other attribute for attribute), as a ``device`` Tensor of ``dtype``; each
    convolution's and linear layer's product layout (``w_mat``) is made on the host too."""
    for name, value in vars(host).items():
        if isinstance(value, np.ndarray):
            setattr(tiny, name, device_tensor(value.astype(dtype.fmt), device))
    if hasattr(tiny, "w_mat"):
        tiny.w_mat = device_tensor(host_matrix(tiny, host, tiny.packs(device, dtype)).astype(dtype.fmt), device)
    for name, child in host.children():
        if isinstance(child, list):
            for h, t in zip(child, getattr(tiny, name)):
                copy_host(t, h, device, dtype)
        else:
            copy_host(getattr(tiny, name), child, device, dtype)


def device_tensor(a: np.ndarray, device: str) -> Tensor:
    """A realised ``device`` Tensor holding ``a``: its buffer is allocated and the bytes copied in
    directly (``Tensor(a)`` would schedule a copy kernel per tensor: ~5x slower for ~500 weights)."""
    a = np.ascontiguousarray(a)
    t = Tensor.empty(*a.shape, device=device, dtype=_from_np_dtype(a.dtype))
    buf = t.uop.buffer.ensure_allocated()
    buf.allocator._copyin(buf._buf, memoryview(a.reshape(-1)).cast("B"))
    return t


def host_matrix(tiny, host, packed: bool) -> np.ndarray:
    """numpy twin of ``Conv2d.prepare`` / ``Linear.prepare``: the weight in the layout its product
    reads, ``packed`` as ``layers.pack_columns`` packs it."""
    w = host.weight
    if w.ndim == 2:  # Linear: weight.T
        m = w.T
    else:
        cout, cin_g, k, _ = w.shape
        m = w.transpose(2, 3, 1, 0).reshape(k * k * cin_g, cout) if tiny.groups == 1 else w.reshape(cout, k * k).T
    if not packed:
        return m
    K, N = m.shape
    Np = padded_columns(N)
    m = np.pad(m, ((0, 0), (0, Np - N)))
    P = column_block(Np)
    return m.reshape(K, Np // P, P).transpose(1, 0, 2)


def from_host(host, device: str, half: bool = False) -> SHViT:
    """A shvit_numpy model (folded or not) -> the same model in tinygrad on ``device``.

    Folding, the float16 cast and the product layouts are done once on the host in numpy
    (shvit_numpy's ``fuse``: the same equations as ``SHViT.fuse`` here). Done by tinygrad they
    are ~600 one-off kernels (S1), each lowered and compiled: seconds of every first run."""
    with building_on(device):
        model = SHViT(host.config)
        if not hasattr(host.patch_embed[0], "bn"):  # the host model is folded: take the folded structure
            model.fuse(ready=False)
    model.dtype = dtypes.float16 if half else dtypes.float32
    copy_host(model, host, device, model.dtype)
    model.labels, model.resolution, model.device = host.labels, host.resolution, device
    return model


def load(path, device: str | None = None, half: bool = False, fold: bool = True, cache: bool = True) -> SHViT:
    """A weight file (canonical or timm ``.safetensors``, the authors' or timm's ``.pth``) -> model
    on ``device`` (tinygrad's default if None).

    The file is read and checked by shvit_numpy (every format it reads, the same errors), folded
    there unless ``fold=False``, and copied to the device in one step (see ``from_host``).
    ``cache``: keep and reuse compiled captures on disk (cache.py; also off with SHVIT_CACHE=0)."""
    from shvit_numpy.model import from_weights

    from .devices import resolve_device

    device = resolve_device(device)
    weights = load_weights(path)
    model = from_host(from_weights(weights, fold=fold), device, half)
    model.weights_id = weights_digest(path, fold, half) if cache and _cache.enabled() else None
    return model


def weights_digest(path, fold: bool, half: bool) -> str:
    """What the loaded weights are, for the compiled-model cache: the file's SHA-256 + how it was loaded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{h.hexdigest()}-fold{int(fold)}-half{int(half)}"
