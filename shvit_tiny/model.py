"""The SHViT model in tinygrad: build from a config, load canonical weights, fold, run (JIT).

``load(path, device)`` reads a weight file with shvit_numpy (every format it knows), folds every
BatchNorm there in float32 (the same equations as ``fuse()`` here), optionally casts to float16,
and copies the result to the device. Calling the model with a numpy array returns numpy logits;
with a Tensor, a Tensor. Each input shape is compiled once and captured by TinyJit; the captures
replay after that. On the CPU device the fast path (shvit_tiny/fast/) runs the same layer tree
through hand-written kernels: the one place that decides is ``__call__``.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading

import numpy as np
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.dtype import _from_np_dtype

from shvit_numpy.checks import check_array, check_input
from shvit_numpy.config import SHViTConfig, se_channels
from shvit_numpy.errors import ShvitError
from shvit_numpy.names import state_shapes
from shvit_numpy.tree import Module, assign, fuse_children, leaves, walk
from shvit_numpy.weights import load_weights

from . import fast
from .layers import FFN, BasicBlock, ConvBN, NormLinear, PatchMerging, ReLU, Residual, Stage, building_on


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
        self.labels, self.resolution = None, None
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
        # how it runs (not weights): set by load()
        self.device, self.dtype, self.use_fast = None, dtypes.float32, True  # use_fast: False keeps to the reference path
        self.weights_id = None  # names these weights in the compiled-model cache (fast/cache.py)
        self.threads = None  # the CPU fast path's cores (fast/parallel.py); None: tinygrad's NUM_CPU_THREADS
        self._jits: dict[tuple, TinyJit] = {}  # the reference path's captures, one per input
        self.runner = None  # the fast path's captures and kernels' weights (fast/runner.py)
        self._calling = threading.Lock()  # a capture's input and output buffers are shared: one call at a time

    def children(self):
        yield from ((k, v) for k, v in super().children() if v is not None)

    # -- weights ------------------------------------------------------------------------------------
    def load_state(self, state: dict[str, Tensor]) -> SHViT:
        """Set every tensor by walking its canonical name: attributes, and list indices for digits."""
        for name in state_shapes(self.config):
            assign(self, name, state[name])
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The unfolded tensors by canonical name, as numpy (only before ``fuse()``)."""
        return {name: walk(self, name).numpy() for name in state_shapes(self.config)}

    def fuse(self, ready: bool = True) -> SHViT:
        """Fold every BatchNorm for inference, in place (see ConvBN.fuse, Residual.fuse, NormLinear.fuse);
        ``ready``: compute the new weights now (False: only the structure, for ``from_host``)."""
        fuse_children(self)
        return self.realize() if ready else self

    def half(self, ready: bool = True) -> SHViT:
        """Cast every weight to float16 (GroupNorm and softmax still compute in float32); ``ready``
        as in ``fuse``."""
        for name, t in list(leaves(self, Tensor)):
            assign(self, name, t.cast(dtypes.float16))
        self.dtype = dtypes.float16
        return self.realize() if ready else self

    def realize(self) -> SHViT:
        """Compute every weight the model holds (read, folded, cast) in one schedule; the captures
        made with the old weights are dropped."""
        Tensor.realize(*(t for _, t in leaves(self, Tensor)))
        self._jits.clear()
        self.runner = None
        self.weights_id = None  # new weights: no longer those of the file load() read
        return self

    # -- forward ------------------------------------------------------------------------------------
    # Public methods take and give NCHW, as torch does; inside, activations are channels-last.
    def features(self, x: Tensor) -> Tensor:
        """Channels-last (B, H, W, 3) -> last stage (B, ceil(H/64), ceil(W/64), C3)."""
        for layer in self.patch_embed:  # 4 stride-2 convs: (B, H/16, W/16, C1)
            x = layer(x)
        for stage in self.stages:  # strides 16, 32, 64
            x = stage(x)
        return x

    def logits(self, pooled: Tensor) -> Tensor:
        """(B, C3) pooled features -> (B, classes); distilled: the mean of both heads at inference."""
        y = self.head(pooled)
        if self.head_dist is not None:
            y = (y + self.head_dist(pooled)) / 2
        return y

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> last stage's map (B, C3, ceil(H/64), ceil(W/64))."""
        return self.features(x.cast(self.dtype).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_head(self, x: Tensor) -> Tensor:
        """(B, C3, h, w) map -> logits: global average pool, then the head(s)."""
        return self.logits(x.mean(axis=(2, 3))).float()

    def forward(self, x: Tensor) -> Tensor:
        """The lazy graph, the reference path: (B, 3, H, W) -> (B, classes) float32."""
        h = self.features(x.cast(self.dtype).permute(0, 2, 3, 1))  # the one layout change: (B, H, W, 3)
        # the map realised before pooling: else tinygrad folds the last product into the pool's reduce (4x slower)
        return self.logits(h.contiguous().mean(axis=(1, 2))).float()

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> the three stage outputs, at strides 16, 32 and 64 (NCHW, as torch's)."""
        h = x.cast(self.dtype).permute(0, 2, 3, 1)
        for layer in self.patch_embed:
            h = layer(h)
        outs = []
        for stage in self.stages:
            h = stage(h)
            outs.append(h.permute(0, 3, 1, 2))
        return outs

    def __call__(self, x, jit: bool = True):
        """numpy (B, 3, H, W) float32 -> numpy logits; a Tensor -> a Tensor. Any H and W.
        ``jit``: capture each input shape once with TinyJit and replay it (False: the lazy graph)."""
        if isinstance(x, Tensor):
            check_input(x.shape, np.dtype(x.dtype.fmt).name if x.dtype.fmt else str(x.dtype), self.config.in_chans)
        else:  # finiteness checked on the way where the fast path's replay does it (fast/replay.py)
            check_array(x, self.config.in_chans, finite=not fast.checks_finite(self, x, jit))
        with self._calling:  # two threads' batches in one input buffer would answer one of them twice
            return self._call(x, jit)

    def _call(self, x, jit: bool):
        if fast.applies(self):  # the CPU kernels, their replay and the compiled-model cache
            return fast.run(self, x, jit)
        t = x.to(self.device) if isinstance(x, Tensor) else Tensor(np.ascontiguousarray(x), device=self.device)
        y = self.jitted(t.contiguous().realize()) if jit else self.forward(t)
        return y if isinstance(x, Tensor) else y.numpy()

    def jitted(self, t: Tensor) -> Tensor:
        """``forward`` captured by TinyJit, one capture per input shape: its first two calls run
        and capture the kernels, later ones replay them."""
        key = (t.shape, t.dtype, t.device)
        if key not in self._jits:
            self._jits[key] = TinyJit(lambda inp: self.forward(inp).realize())
        return self._jits[key](t)


def copy_host(tiny: SHViT, host, device: str, dtype) -> None:
    """Set every array of the numpy model ``host`` on the same weight name of ``tiny`` (the two
    mirror each other attribute for attribute), as a ``device`` Tensor of ``dtype``."""
    for name, value in leaves(host, np.ndarray):
        assign(tiny, name, device_tensor(value.astype(dtype.fmt), device))


def device_tensor(a: np.ndarray, device: str) -> Tensor:
    """A realised ``device`` Tensor holding ``a``: its buffer is allocated and the bytes copied in
    directly (``Tensor(a)`` would schedule a copy kernel per tensor: ~5x slower for ~500 weights)."""
    a = np.ascontiguousarray(a)
    t = Tensor.empty(*a.shape, device=device, dtype=_from_np_dtype(a.dtype))
    buf = t.uop.buffer.ensure_allocated()
    buf.allocator._copyin(buf._buf, memoryview(a.reshape(-1)).cast("B"))
    return t


@contextlib.contextmanager
def default_device(device: str):
    """tinygrad's default device is ``device`` inside this block, unless ``DEV`` names one.

    Why: tinygrad wraps a Python number in ``x + 1e-5`` as a Tensor on its default device, and
    finds that device by opening every backend it knows (METAL, AMD, NV, CUDA, QCOM, CL): ~0.5 s
    of every new process (half a warm first answer). The number itself belongs to no device, so
    naming the model's device changes no result; only the search is skipped."""
    from tinygrad import Context
    from tinygrad.helpers import DEV, Target

    if DEV.device:
        yield
        return
    with Context(DEV=[Target(device.split(":")[0])] + DEV.value):
        yield


def from_host(host, device: str, half: bool = False) -> SHViT:
    """A shvit_numpy model (folded or not) -> the same model in tinygrad on ``device``.

    Folding and the float16 cast are done once on the host in numpy (shvit_numpy's ``fuse``: the
    same equations as ``SHViT.fuse`` here). Done by tinygrad they are ~600 one-off kernels (S1),
    each lowered and compiled: seconds of every first run."""
    with building_on(device), default_device(device):
        model = SHViT(host.config)
        if not hasattr(host.patch_embed[0], "bn"):  # the host model is folded: take the folded structure
            model.fuse(ready=False)
    model.dtype = dtypes.float16 if half else dtypes.float32
    copy_host(model, host, device, model.dtype)
    model.labels, model.resolution, model.device = host.labels, host.resolution, device
    return model


def load(path, device: str | None = None, half: bool = False, fold: bool = True, cache: bool = True,
         fast: bool = True, threads: int | None = None) -> SHViT:
    """A weight file (canonical or timm ``.safetensors``, the authors' or timm's ``.pth``) -> model
    on ``device`` (tinygrad's default if None).

    The file is read and checked by shvit_numpy (every format it reads, the same errors), folded
    there unless ``fold=False``, and copied to the device in one step (see ``from_host``).
    ``cache``: keep and reuse compiled captures on disk (fast/cache.py; also off with SHVIT_CACHE=0).
    ``fast``: False runs the reference path only (also SHVIT_FAST=0).
    ``threads``: the cores the CPU fast path splits its kernels across (default: tinygrad's
    NUM_CPU_THREADS, the environment variable or else the cores this process may use)."""
    from shvit_numpy.model import from_weights

    from .devices import resolve_device

    device = resolve_device(device)
    weights = load_weights(path)
    model = from_host(from_weights(weights, fold=fold), device, half)
    if threads is not None and threads < 1:
        raise ShvitError(f"threads must be a count >= 1, got {threads}")
    model.use_fast, model.threads = fast, threads
    model.weights_id = weights_digest(path, fold, half) if cache else None
    return model


def weights_digest(path, fold: bool, half: bool) -> str:
    """What the loaded weights are, for the compiled-model cache: the file's SHA-256 + how it was loaded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{h.hexdigest()}-fold{int(fold)}-half{int(half)}"
