"""``python -m shvit_torch.experiments NAME``: the paper's three claims, tested at laptop scale.

    python -m shvit_torch.experiments --list        # the experiments and what each compares
    python -m shvit_torch.experiments macro         # 16x16 stem, 3 stages vs 4x4 stem, 4 stages
    python -m shvit_torch.experiments heads         # multi-head attention's redundancy vs single-head
    python -m shvit_torch.experiments partial       # the share of channels single-head attention sees
    python -m shvit_torch.experiments all --jobs 2  # all three, two training runs at a time
    python -m shvit_torch.experiments --figures     # redraw docs/claims-*.png from the results

Every variant trains on the demo's task (``shvit_torch.data.canvas``: the largest of three
handwritten digits on a 128x128 canvas, 8 classes) with the demo's recipe, for each seed, and is
measured on the same footing: test accuracy (mean and spread over the seeds), parameters, MACs,
activation memory (the peak of live tensors and the bytes written in one forward pass, batch 1)
and latency (batch 1, one core, median). The baselines the paper compares with, a 4x4 stem with
four stages and multi-head attention, are built here from the library's own blocks
(``shvit_torch.layers``), so each comparison changes one thing. Results go to
``benchmarks/results/experiments/NAME.json``; trained runs are cached in ``runs/experiments``
(keyed by the variant, the recipe and this file's source, so a changed experiment trains again).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from shvit_numpy.cli import Parser
from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_numpy.weights import atomic_path

from . import data as datasets
from . import train
from .data import Split
from .layers import FFN, ConvBN, NormLinear, Residual, SingleHeadAttention, downsample, dw_conv

PROG = "python -m shvit_torch.experiments"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "experiments"
RUNS = Path("runs") / "experiments"
DOCS = ROOT / "docs"
PDIM_RATIO = 4.67  # the paper's C / pdim (S1: 224 / 48 = 4.67)


# ---- the variants: one architecture description, built from the library's blocks -------------------

@dataclass(frozen=True)
class Arch:
    """A hierarchical SHViT-like network: a stem of stride-2 3x3 ConvBNs, then stages of blocks.

    ``kinds[s]`` is 'i' (depthwise conv + FFN) or 's' (plus attention); ``mixer`` says which
    attention: 'shsa' (the library's SingleHeadAttention on ``pdim[s]`` channels) or 'mhsa'
    (``heads[s]`` heads over all channels, as DeiT and Swin attend). With a 4-conv stem, 3 stages
    and 'shsa' it is SHViT itself, weight name for weight name (tests check that)."""

    label: str
    stem: tuple[int, ...]  # output channels of each stride-2 3x3 ConvBN (total stride 2**len)
    dims: tuple[int, ...]
    depth: tuple[int, ...]
    kinds: tuple[str, ...]
    pdim: tuple[int, ...] = ()  # 'shsa': attended channels per stage
    heads: tuple[int, ...] = ()  # 'mhsa': heads per stage (each head sees dims[s] / heads[s] channels)
    mixer: str = "shsa"
    qk_dim: int = 16
    num_classes: int = len(datasets.CANVAS_CLASSES)

    @property
    def stride(self) -> int:
        return 2 ** len(self.stem)


def ratio_pdim(dims, ratio: float) -> tuple[int, ...]:
    """pdim = round(C / ratio) per stage, at least 1."""
    return tuple(max(1, round(c / ratio)) for c in dims)


DIMS, DEPTH, KINDS = (32, 64, 96), (1, 2, 2), ("i", "s", "s")  # the demo's SHViT widths and depths
SHVIT = Arch("SHViT: 16x16 stem, 3 stages, single head on C/4.67", (4, 8, 16, 32), DIMS, DEPTH, KINDS, ratio_pdim(DIMS, PDIM_RATIO))
VARIANTS: dict[str, Arch] = {
    "shvit": SHVIT,
    # the paper's Fig. 2 baseline: a 4x4 stem, four stages at strides 4-32, depthwise-conv blocks in the
    # first two stages and attention in the last two. SHViT's last width (96) and the fewest MACs these blocks
    # allow at stride 4: 8 channels and one block per stage still cost 6.1M MACs (SHViT: 4.5M) at 128x128
    "conv4": Arch("4x4 stem, 4 stages (DW conv, DW conv, attention, attention)", (4, 8), (8, 16, 32, 96), (1, 1, 1, 1),
                  ("i", "i", "s", "s"), ratio_pdim((8, 16, 32, 96), PDIM_RATIO)),
    # multi-head self-attention over all channels, heads of 16 channels (4 in stage 2, 6 in stage 3: DeiT-T with 6)
    "mhsa": replace(SHVIT, label="multi-head attention: 4 / 6 heads over all channels", mixer="mhsa", pdim=(), heads=(2, 4, 6)),
    **{f"pdim-{name}": replace(SHVIT, label=f"single head on C{suffix}", pdim=ratio_pdim(DIMS, r))
       for name, r, suffix in (("1/8", 8, "/8"), ("1/2", 2, "/2"), ("1", 1, " (all channels)"))},
}


class MultiHeadAttention(nn.Module):
    """The multi-head baseline: GroupNorm over all C channels, qkv = 1x1 ConvBN C -> heads * (2 qk + C/heads),
    per head softmax(q^T k / sqrt(qk)) over N tokens, heads concatenated, then SHSA's ReLU + 1x1 ConvBN.

    ``head_mask`` (heads,) multiplies each head's output before the projection: 0 removes a head."""

    def __init__(self, dim: int, heads: int, qk_dim: int = 16):
        super().__init__()
        if dim % heads:
            raise ShvitError(f"multi-head attention: {heads} heads do not divide {dim} channels")
        self.dim, self.heads, self.qk_dim, self.dh = dim, heads, qk_dim, dim // heads
        self.scale = qk_dim ** -0.5
        self.pre_norm = nn.GroupNorm(1, dim)
        self.qkv = ConvBN(dim, heads * (2 * qk_dim + self.dh))
        self.proj = nn.Sequential(nn.ReLU(), ConvBN(dim, dim, bn_weight_init=0.0))
        self.register_buffer("head_mask", torch.ones(heads), persistent=False)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> heads' outputs (B, heads, dh, N), each scaled by ``head_mask``, and attn (B, heads, N, N)."""
        B, _, H, W = x.shape
        qkv = self.qkv(self.pre_norm(x)).reshape(B, self.heads, 2 * self.qk_dim + self.dh, H * W)
        q, k, v = torch.split(qkv, [self.qk_dim, self.qk_dim, self.dh], dim=2)  # (B, h, qk, N) twice, (B, h, dh, N)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)  # (B, h, N, N): query x key
        out = (v @ attn.transpose(-2, -1)) * self.head_mask[None, :, None, None]  # (B, h, dh, N)
        return out, attn

    def forward(self, x):
        out, _ = self.attention(x)
        return self.proj(out.reshape(x.shape))


class Block(nn.Module):
    """SHViT's BasicBlock with a choice of attention: Residual(DW), Residual(attention) for 's', Residual(FFN)."""

    def __init__(self, dim: int, kind: str, mixer: nn.Module | None):
        super().__init__()
        self.conv = Residual(dw_conv(dim, bn_weight_init=0.0))
        self.mixer = Residual(mixer) if kind == "s" else nn.Identity()
        self.ffn = Residual(FFN(dim, 2 * dim))

    def forward(self, x):
        return self.ffn(self.mixer(self.conv(x)))


class ExpStage(nn.Module):
    """SHViT's Stage: an optional downsample (every stage but the first), then the blocks."""

    def __init__(self, prev_dim: int | None, dim: int, blocks: list[nn.Module]):
        super().__init__()
        if prev_dim is not None:
            self.downsample = downsample(prev_dim, dim)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        return self.blocks(x)


class Net(nn.Module):
    """The network an ``Arch`` describes: stem -> stages -> mean pool -> BatchNorm1d + Linear."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        stem, d = [], 3
        for i, c in enumerate(arch.stem):
            stem += [ConvBN(d, c, 3, 2, 1)] + ([nn.ReLU()] if i < len(arch.stem) - 1 else [])
            d = c
        self.patch_embed = nn.Sequential(*stem)
        stages = []
        for s, (dim, depth, kind) in enumerate(zip(arch.dims, arch.depth, arch.kinds)):
            blocks = [Block(dim, kind, self.mixer(s) if kind == "s" else None) for _ in range(depth)]
            stages.append(ExpStage(arch.dims[s - 1] if s else None, dim, blocks))
        self.stages = nn.Sequential(*stages)
        self.head = NormLinear(arch.dims[-1], arch.num_classes)

    def mixer(self, s: int) -> nn.Module:
        a = self.arch
        if a.mixer == "mhsa":
            return MultiHeadAttention(a.dims[s], a.heads[s], a.qk_dim)
        return SingleHeadAttention(a.dims[s], a.qk_dim, a.pdim[s])

    def forward(self, x):
        return self.head(self.stages(self.patch_embed(x)).mean((2, 3)))

    def fuse(self) -> Net:
        """A folded inference copy (every ConvBN one conv), as ``SHViT.fuse``."""
        import copy

        from .layers import fuse_modules

        fused = copy.deepcopy(self).eval()
        for name, child in list(fused.named_children()):
            setattr(fused, name, fuse_modules(child))
        return fused


def shvit_config(arch: Arch) -> SHViTConfig:
    """The library's SHViTConfig of a 3-stage single-head ``Arch`` (for the equivalence test)."""
    return SHViTConfig(embed_dim=arch.dims, partial_dim=arch.pdim, depth=arch.depth, types=arch.kinds,
                       qk_dim=(arch.qk_dim,) * 3, num_classes=arch.num_classes)


# ---- costs: parameters, MACs, activation memory, latency --------------------------------------------

def attention_macs(m: nn.Module, n: int) -> int:
    """The matrix products of attention over n tokens: q^T k (n * n * qk) and v attn^T (n * n * v), per head."""
    if isinstance(m, MultiHeadAttention):
        return m.heads * n * n * (m.qk_dim + m.dh)
    return n * n * (m.qk_dim + m.pdim)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, by formula per layer from the shapes it sees:
    a convolution H'W' C_out (C_in / groups) k^2 per image, a Linear out * in, attention's two
    matrix products. Element-wise work does not count (as in the paper and torch's counter)."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        else:  # attention: the tokens of its input map
            x = inputs[0]
            total += x.shape[0] * attention_macs(m, x.shape[2] * x.shape[3])

    kinds = (nn.Conv2d, nn.Linear, SingleHeadAttention, MultiHeadAttention)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


class MemoryMeter(TorchDispatchMode):
    """Counts the tensors a forward pass creates: ``written`` (bytes of every new storage) and
    ``peak`` (the most bytes alive at once). A storage is alive while any tensor that uses it
    is (views share their base's storage); the model's weights and the input are not counted,
    nor a kernel's private scratch memory (only what operators return)."""

    def __init__(self, external=()):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in external}
        self.users: dict[int, list[int]] = {}  # storage address -> [live tensors, bytes]
        self.live = self.peak = self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.external:
            return
        entry = self.users.get(key)
        if entry is None:
            entry = self.users[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.written += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self.release, key)

    def release(self, key: int) -> None:
        entry = self.users[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.users[key]


def activation_memory(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Peak live bytes and bytes written by one inference forward pass of ``model`` on ``x``."""
    external = [*model.parameters(), *model.buffers(), x]
    with torch.inference_mode(), MemoryMeter(external) as meter:
        out = model(x)
        del out
    return {"peak_bytes": meter.peak, "written_bytes": meter.written}


@contextmanager
def one_thread():
    """torch on one thread inside: these models' ops are tiny, and on a busy machine a second thread
    waiting at every op's barrier made one forward pass 100x slower (1.5 s against 10 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def timings(archs: dict[str, Arch], res: int = datasets.CANVAS_RES, rounds: int = 15, calls: int = 4,
            batch: int = 32) -> dict[str, dict]:
    """One-core speed of each folded model, measured interleaved (round after round over all the
    models, so a busy moment of a shared machine touches them all alike): batch-1 latency (median
    and quartiles over rounds * calls calls, ms) and images/s at ``batch`` (median over rounds)."""
    models, one, many = {}, torch.randn(1, 3, res, res), torch.randn(batch, 3, res, res)
    for name, arch in archs.items():
        torch.manual_seed(0)
        models[name] = Net(arch).eval().fuse()
    lat: dict[str, list[float]] = {n: [] for n in models}
    tput: dict[str, list[float]] = {n: [] for n in models}
    with one_thread(), torch.inference_mode():
        for m in models.values():  # warm-up
            m(one), m(many)
        for _ in range(rounds):
            for name, m in models.items():
                for _ in range(calls):
                    t = time.perf_counter()
                    m(one)
                    lat[name].append(1e3 * (time.perf_counter() - t))
                t = time.perf_counter()
                m(many)
                tput[name].append(batch / (time.perf_counter() - t))
    out = {}
    for name in models:
        q = statistics.quantiles(lat[name], n=4)
        out[name] = {"latency_ms": {"median": statistics.median(lat[name]), "q1": q[0], "q3": q[2]},
                     "images_per_s": {"batch": batch, "median": statistics.median(tput[name])}}
    return out


def costs(arch: Arch, res: int = datasets.CANVAS_RES) -> dict:
    """Parameters (unfolded, as the paper counts), MACs and activation memory (batch 1) of the
    folded inference model at ``res`` x ``res``."""
    torch.manual_seed(0)
    model = Net(arch).eval()
    fused = model.fuse()
    x = torch.randn(1, 3, res, res)
    with one_thread():
        return {"params": sum(p.numel() for p in model.parameters()), "macs": count_macs(fused, x), **activation_memory(fused, x)}


# ---- head redundancy: similarity between heads, and masking ----------------------------------------

def head_similarity(attn: torch.Tensor) -> torch.Tensor:
    """attn (B, heads, N, N) -> (heads, heads): the cosine similarity between two heads' attention
    maps (each flattened to N*N values), averaged over the B images (the paper's Fig. 3)."""
    a = attn.flatten(2).double()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # (B, h, N*N)
    return (a @ a.transpose(1, 2)).mean(0).float()


def cross_image_similarity(attn: torch.Tensor) -> float:
    """The same measure between two different heads on two different images: how alike any two
    attention maps of this layer are. Head similarity means something only above this."""
    a = attn.flatten(2).double()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    other = a.roll(1, dims=0)  # image b against image b - 1
    sim = a @ other.transpose(1, 2)  # (B, h, h)
    h = a.shape[1]
    off = ~torch.eye(h, dtype=torch.bool) if h > 1 else torch.ones(1, 1, dtype=torch.bool)
    return float(sim[:, off].mean())


def mean_off_diagonal(sim: torch.Tensor) -> float | None:
    """The mean of a (h, h) similarity matrix over its h * (h - 1) pairs of different heads."""
    h = sim.shape[0]
    return float(sim[~torch.eye(h, dtype=torch.bool)].mean()) if h > 1 else None


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of a model by name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (SingleHeadAttention, MultiHeadAttention))}


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each attention layer's maps on ``x``, as (B, heads, N, N) (one head for SHSA)."""
    maps, handles = {}, []
    for name, m in attention_layers(model).items():
        def hook(mod, inputs, out, name=name):
            a = mod.attention(inputs[0])[-1]
            maps[name] = a if a.ndim == 4 else a[:, None]

        handles.append(m.register_forward_hook(hook))
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return maps


@torch.no_grad()
def accuracy(model: nn.Module, split: datasets.Split, batch: int = 250) -> float:
    model.eval()
    correct = sum(int((model(split.x[i:i + batch]).argmax(1) == split.y[i:i + batch]).sum()) for i in range(0, len(split.y), batch))
    return correct / max(1, len(split.y))


def head_masking(model: nn.Module, split: datasets.Split) -> dict[str, dict]:
    """For every multi-head layer and each of its heads, the accuracy with that head removed
    (its output zeroed) and with it left alone (every other head of the layer zeroed); the
    other layers keep all their heads (the paper's Figs. 3-4, right). With them, on the same
    images: the accuracy with every head ("all") and with the layer's every head zeroed ("none")."""
    out = {}
    everything = accuracy(model, split)
    for name, m in attention_layers(model).items():
        if not isinstance(m, MultiHeadAttention):
            continue
        m.head_mask.fill_(0.0)
        none = accuracy(model, split)
        removed, alone = [], []
        for h in range(m.heads):
            m.head_mask.fill_(1.0)
            m.head_mask[h] = 0.0
            removed.append(accuracy(model, split))
            m.head_mask.fill_(0.0)
            m.head_mask[h] = 1.0
            alone.append(accuracy(model, split))
        m.head_mask.fill_(1.0)
        out[name] = {"all": everything, "none": none, "removed": removed, "alone": alone}
    return out


def head_analysis(model: nn.Module, split: datasets.Split, n_maps: int = 128, n_masking: int = 500) -> dict:
    """Per attention layer: the heads' similarity matrix and its off-diagonal mean and the cross-image
    reference (on ``n_maps`` images), and head masking (on ``n_masking``)."""
    maps = attention_maps(model, split.x[:n_maps])
    layers = {}
    for name, a in maps.items():
        sim = head_similarity(a)
        layers[name] = {"heads": a.shape[1], "tokens": a.shape[-1], "similarity": sim.tolist(),
                        "mean_similarity": mean_off_diagonal(sim), "cross_image_similarity": cross_image_similarity(a)}
    for name, masks in head_masking(model, Split(split.x[:n_masking], split.y[:n_masking])).items():
        layers[name].update(masks)
    return layers


# ---- training: the demo's recipe, for any variant ---------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How every variant trains: the demo's recipe (shvit_torch.demo: AdamW at 4e-3, batch 64, cosine
    to 1e-5, label smoothing, clipping, random warps) on the demo's canvases, in fewer epochs."""

    epochs: int = 5
    train_size: int = 6000
    test_size: int = 1000
    batch_size: int = 64
    lr: float = 4e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.025
    label_smoothing: float = 0.1
    ema: float = 0.0  # > 0: evaluate an exponential moving average of the weights (decay per step)


QUICK = Recipe(epochs=1, train_size=256, test_size=200)

_DATA: dict[tuple[int, int], datasets.Dataset] = {}


def canvas_data(recipe: Recipe) -> datasets.Dataset:
    """The demo's canvases (built once per process)."""
    key = (recipe.train_size, recipe.test_size)
    if key not in _DATA:
        _DATA[key] = datasets.canvas(datasets.CANVAS_RES, sizes=key)
    return _DATA[key]


def train_variant(arch: Arch, seed: int, recipe: Recipe, analyse_heads: bool = False) -> dict:
    """Train ``arch`` from seed ``seed`` with ``recipe`` on one thread; returns the test accuracy
    after each of the last three epochs (of the weights' moving average with ``recipe.ema``), and
    the head analysis if asked."""
    torch.set_num_threads(1)
    ds = canvas_data(recipe)
    torch.manual_seed(seed)
    model = Net(arch)
    n, bs = len(ds.train.y), recipe.batch_size
    batches = n // bs + (n % bs > 1)  # a batch of 1 cannot train BatchNorm
    opt = torch.optim.AdamW(train.param_groups(model, recipe.weight_decay), lr=recipe.lr)
    total, warmup = batches * recipe.epochs, int(recipe.warmup_epochs * batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: train.lr_factor(i, total, warmup, recipe.lr, recipe.min_lr))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema),
                                              use_buffers=True) if recipe.ema else None
    step = train.Step(model, model, opt, torch.device("cpu"), label_smoothing=recipe.label_smoothing, clip_grad=1.0)
    curve, t0 = [], time.perf_counter()
    for epoch in range(recipe.epochs):
        gen = train.reseed(seed, epoch, 0)
        order = torch.randperm(n, generator=gen)
        model.train()
        for b in range(batches):
            idx = order[b * bs:(b + 1) * bs]
            x, target = datasets.mix(datasets.augment(ds.train.x[idx], gen), ds.train.y[idx], arch.num_classes, 0, 0, gen)
            train.train_step(step, x, target)
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
        final = ema.module if ema is not None else model
        if epoch >= recipe.epochs - 3:  # the last three epochs: is the end of the curve settled?
            curve.append(accuracy(final, ds.test))
    out = {"test_acc": curve[-1], "last_epochs": curve, "train_seconds": time.perf_counter() - t0}
    if analyse_heads:
        out["heads"] = head_analysis(final, ds.test)
    return out


def run_key(name: str, arch: Arch, seed: int, recipe: Recipe) -> str:
    """A cache key: the variant, seed and recipe, a fingerprint of the canvases, and the source of
    everything a training run executes (the blocks, the training step and schedule, augmentation,
    and this file's model, training and analysis code), so an edit there trains again."""
    import inspect

    from . import layers

    h = hashlib.sha256(json.dumps([asdict(arch), seed, asdict(recipe)], sort_keys=True).encode())
    ds = canvas_data(recipe)
    for t in (ds.train.x[::101], ds.train.y, ds.test.x[::101], ds.test.y):
        h.update(t.contiguous().numpy().tobytes())
    for obj in (layers.ConvBN, layers.dw_conv, layers.Residual, layers.FFN, layers.SingleHeadAttention, layers.SqueezeExcite,
                layers.PatchMerging, layers.downsample, layers.NormLinear, train.param_groups, train.lr_factor, train.Step,
                train.compute_loss, train.train_step, train.reseed, datasets.augment, datasets.mix,
                MultiHeadAttention, Block, ExpStage, Net, head_similarity, cross_image_similarity, mean_off_diagonal,
                attention_maps, accuracy, head_masking, head_analysis, train_variant):
        h.update(inspect.getsource(obj).encode())
    return f"{name.replace('/', '_')}-seed{seed}-{h.hexdigest()[:12]}"


def _run_job(job) -> tuple[str, int, dict]:
    name, seed, recipe = job
    arch = VARIANTS[name]
    return name, seed, train_variant(arch, seed, recipe, analyse_heads="s" in arch.kinds)


def train_all(jobs: list[tuple[str, int]], recipe: Recipe, runs: Path, workers: int = 1) -> dict[tuple[str, int], dict]:
    """Every (variant, seed) training run, from the cache in ``runs`` where it holds one; the
    rest ``workers`` at a time (forked processes, one thread each), slowest first. Shows progress."""
    from tqdm import tqdm

    runs.mkdir(parents=True, exist_ok=True)
    done, todo, keys = {}, [], {}
    for name, seed in dict.fromkeys(jobs):
        keys[name, seed] = path = runs / f"{run_key(name, VARIANTS[name], seed, recipe)}.json"
        if path.is_file():
            done[name, seed] = json.loads(path.read_text())
        else:
            todo.append((name, seed, recipe))
    if not todo:
        return done
    todo.sort(key=lambda j: -count_macs(Net(VARIANTS[j[0]]).eval(), torch.zeros(1, 3, 64, 64)))  # the slowest first
    canvas_data(recipe)  # build the canvases once, before forking
    bar = tqdm(total=len(todo), desc="training runs", file=sys.stderr)

    def store(name, seed, res):
        done[name, seed] = res
        with atomic_path(keys[name, seed]) as tmp:
            Path(tmp).write_text(json.dumps(res))
        bar.write(f"{PROG}: {name} seed {seed}: test accuracy {res['test_acc']:.3f} ({res['train_seconds']:.0f} s)")
        bar.update()

    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:
            for result in pool.imap_unordered(_run_job, todo):
                store(*result)
    else:
        for job in todo:
            store(*_run_job(job))
    bar.close()
    return done


# ---- the experiments --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Experiment:
    claim: str
    variants: tuple[str, ...]
    heads: tuple[str, ...] = field(default=())  # variants whose attention analysis the result shows


EXPERIMENTS = {
    "macro": Experiment("a 16x16 patchify stem with 3 stages is about as accurate as a 4x4 stem with 4 stages, "
                        "at far lower memory and latency (paper Fig. 2)", ("shvit", "conv4")),
    "heads": Experiment("the heads of multi-head attention attend alike and most can be masked at little cost; "
                        "single-head attention avoids the redundancy (paper Figs. 3-4)", ("mhsa", "shvit"), ("mhsa", "shvit")),
    "partial": Experiment("single-head attention on about C/4.67 channels, the rest passed through, is as accurate as "
                          "attending to more channels, and cheaper (the paper's ablations)",
                          ("pdim-1/8", "shvit", "pdim-1/2", "pdim-1", "mhsa")),
}


def jobs_of(names: list[str], seeds: int) -> list[tuple[str, int]]:
    """The (variant, seed) training runs the experiments ``names`` need (a variant shared by two is trained once)."""
    return list(dict.fromkeys((v, s) for n in names for v in EXPERIMENTS[n].variants for s in range(seeds)))


def summarize(accs: list[float]) -> dict:
    return {"mean": statistics.fmean(accs), "min": min(accs), "max": max(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": accs}


def run_experiment(name: str, recipe: Recipe, seeds: int, runs: Path, workers: int = 1, speed: dict | None = None) -> dict:
    """Train (or take from the cache) every variant of experiment ``name`` for each seed, measure
    its costs (``speed``: the variants' ``timings``, measured here when not given), and return the
    result (what NAME.json holds)."""
    exp = EXPERIMENTS[name]
    trained = train_all(jobs_of([name], seeds), recipe, runs, workers)
    speed = speed or timings({v: VARIANTS[v] for v in exp.variants})
    rows = {}
    for v in exp.variants:
        per_seed = [trained[v, s] for s in range(seeds)]
        row = {"label": VARIANTS[v].label, "arch": asdict(VARIANTS[v]), "test_acc": summarize([r["test_acc"] for r in per_seed]),
               "last_epochs_acc": [r["last_epochs"] for r in per_seed], "train_seconds": [r["train_seconds"] for r in per_seed],
               **costs(VARIANTS[v]), **speed[v]}
        if v in exp.heads:
            row["heads"] = [r["heads"] for r in per_seed]
        rows[v] = row
    return {"experiment": name, "claim": exp.claim, "recipe": asdict(recipe), "seeds": seeds, "variants": rows,
            "machine": machine(), "conclusion": conclude(name, rows)}


def machine() -> dict:
    import os
    import platform

    from benchmarks.machine import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d"),
            "note": "a machine shared with other developers' work: speeds are noisy (one core, all variants timed "
                    "interleaved: 15 rounds of 4 batch-1 calls and one batch-32 call each)"}


# ---- conclusions, stated from the numbers ------------------------------------------------------------

def noise(acc: dict) -> float:
    """Half the seeds' range: how far one seed's accuracy strays from the mean."""
    return (acc["max"] - acc["min"]) / 2


CHANCE = 1 / len(datasets.CANVAS_CLASSES)


def as_accurate(a: dict, b: dict) -> tuple[bool, str]:
    """Whether variant a is at least as accurate as b, within the seeds' spread (at least 1 point),
    both having learnt something (twice chance): near chance no comparison says anything."""
    tol = max(0.01, noise(a["test_acc"]) + noise(b["test_acc"]))
    d = a["test_acc"]["mean"] - b["test_acc"]["mean"]
    learnt = min(a["test_acc"]["mean"], b["test_acc"]["mean"]) > 2 * CHANCE
    text = f"{a['test_acc']['mean']:.3f} vs {b['test_acc']['mean']:.3f} ({d:+.3f}; seed spread +-{tol:.3f})"
    return learnt and d >= -tol, text + ("" if learnt else f"; near chance ({CHANCE:.3f}): nothing learnt to compare")


def ratio_text(a: dict, b: dict, key: str) -> str:
    get = (lambda r: r["latency_ms"]["median"]) if key == "latency" else (lambda r: r[key])
    return f"{get(b) / get(a):.2f}x"


def cheaper(a: dict, b: dict) -> bool:
    return a["macs"] < b["macs"] and a["written_bytes"] < b["written_bytes"]


def verdict(ok: bool) -> str:
    return "supports" if ok else "does not show at this scale"


def conclude(name: str, rows: dict) -> list[dict]:
    """One line per claim: 'supports' or 'does not show at this scale', with the numbers."""
    out = []
    if name == "macro":
        a, b = rows["shvit"], rows["conv4"]
        acc_ok, acc = as_accurate(a, b)
        mem_ok = a["peak_bytes"] < b["peak_bytes"] and cheaper(a, b)
        speedup = a["images_per_s"]["median"] / b["images_per_s"]["median"]
        out.append({"claim": "16x16 stem + 3 stages about as accurate as 4x4 stem + 4 stages", "verdict": verdict(acc_ok),
                    "evidence": f"test accuracy {acc}"})
        out.append({"claim": "... at far lower memory", "verdict": verdict(mem_ok),
                    "evidence": f"the 4x4 layout needs {ratio_text(a, b, 'peak_bytes')} the peak activation memory, "
                                f"{ratio_text(a, b, 'written_bytes')} the bytes written and {ratio_text(a, b, 'macs')} the MACs"})
        out.append({"claim": "... and faster (images/s at batch 32, one core)", "verdict": verdict(speedup > 1.1),
                    "evidence": f"{speedup:.2f}x the 4x4 layout's images/s at batch {a['images_per_s']['batch']}; "
                                f"at batch 1 the 4x4 layout takes {ratio_text(a, b, 'latency')} the latency"})
    elif name == "heads":
        m, s = rows["mhsa"], rows["shvit"]
        layers = m["heads"][0].keys()
        sims = {k: statistics.fmean(r[k]["mean_similarity"] for r in m["heads"]) for k in layers}
        cross = {k: statistics.fmean(r[k]["cross_image_similarity"] for r in m["heads"]) for k in layers}
        above = [k for k in layers if sims[k] > cross[k]]
        out.append({"claim": "the heads of multi-head attention attend alike (high cosine similarity)",
                    "verdict": verdict(statistics.fmean(sims.values()) > 0.5 and len(above) == len(sims)),
                    "evidence": "mean similarity between heads per layer " + ", ".join(f"{sims[k]:.2f}" for k in layers)
                                + "; between two heads on two different images " + ", ".join(f"{cross[k]:.2f}" for k in layers)})
        drops, layer_drops = [], []
        for r in m["heads"]:
            for k in layers:
                drops += [r[k]["all"] - x for x in r[k]["removed"]]
                layer_drops.append(r[k]["all"] - r[k]["none"])
        cheap = sum(d < 0.01 for d in drops)
        learnt = m["test_acc"]["mean"] > 2 * CHANCE
        out.append({"claim": "most heads can be removed at little cost", "verdict": verdict(learnt and cheap > len(drops) / 2),
                    "evidence": f"{cheap} of {len(drops)} head removals (all layers, all seeds) cost under 1 point of accuracy; "
                                f"the largest cost {max(drops):.3f}; removing a layer's every head cost "
                                f"{min(layer_drops):.3f} to {max(layer_drops):.3f}"})
        acc_ok, acc = as_accurate(s, m)
        out.append({"claim": "single-head attention is as accurate as multi-head, and cheaper",
                    "verdict": verdict(acc_ok and cheaper(s, m)),
                    "evidence": f"test accuracy {acc}; multi-head has {ratio_text(s, m, 'params')} the parameters, "
                                f"{ratio_text(s, m, 'macs')} the MACs, {ratio_text(s, m, 'latency')} the latency"})
    elif name == "partial":
        s = rows["shvit"]
        for other in ("pdim-1/2", "pdim-1", "pdim-1/8", "mhsa"):
            if other not in rows:
                continue
            acc_ok, acc = as_accurate(s, rows[other])
            out.append({"claim": f"single head on C/4.67 as accurate as {rows[other]['label']}",
                        "verdict": verdict(acc_ok), "evidence": f"test accuracy {acc}; {other} has "
                        f"{ratio_text(s, rows[other], 'macs')} the MACs, {ratio_text(s, rows[other], 'latency')} the latency"})
    return out


# ---- tables and figures ------------------------------------------------------------------------------

def print_result(result: dict) -> None:
    rows = result["variants"]
    print(f"\n{result['experiment']}: {result['claim']}")
    r = result["recipe"]
    print(f"{result['seeds']} seeds; {r['epochs']} epochs on {r['train_size']} training canvases, {r['test_size']} test canvases; "
          f"costs at 128x128, batch 1, folded model; speed on one core, {result['machine']['cpu']}")
    print(f"{'variant':10s} {'test acc (mean, min-max)':>25s} {'params':>8s} {'MACs':>7s} {'peak mem':>9s} {'written':>9s} "
          f"{'latency':>8s} {'img/s b32':>9s}")
    for name, v in rows.items():
        a = v["test_acc"]
        print(f"{name:10s} {a['mean']:11.3f} ({a['min']:.3f}-{a['max']:.3f}) {v['params']:>8,d} {v['macs'] / 1e6:6.2f}M "
              f"{v['peak_bytes'] / 2**10:6.0f} KiB {v['written_bytes'] / 2**10:5.0f} KiB "
              f"{v['latency_ms']['median']:5.2f} ms {v['images_per_s']['median']:9.0f}")
    for name, v in rows.items():
        for seed, layers in enumerate(v.get("heads", [])[:1]):
            print(f"\n{name} (seed {seed}): per attention layer, cosine similarity between heads' maps "
                  f"(128 test canvases) and head masking (test accuracy with every head, 1000 canvases: "
                  f"{v['test_acc']['seeds'][seed]:.3f})")
            for layer, d in layers.items():
                sim = "-" if d["mean_similarity"] is None else f"{d['mean_similarity']:.2f}"
                line = f"  {layer:30s} {d['heads']} heads x {d['tokens']:3d} tokens: similarity {sim:>4s} " \
                       f"(two different images: {d['cross_image_similarity']:.2f})"
                if "removed" in d:
                    line += f"; masking (500 canvases): all {d['all']:.2f}, none {d['none']:.2f}, removed "
                    line += " ".join(f"{x:.2f}" for x in d["removed"])
                    line += ", alone " + " ".join(f"{x:.2f}" for x in d["alone"])
                print(line)
    print()
    for c in result["conclusion"]:
        print(f"{c['verdict'].upper():28s} {c['claim']}: {c['evidence']}")


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def tradeoff_figure(results: dict[str, dict], path: Path) -> None:
    """Test accuracy against one-core images/s (batch 32), peak activation memory and bytes written,
    every variant of every experiment (error bars: the seeds' min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for res in results.values():
        rows.update(res["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    xs = {"images/s on one core, batch 32 (median; higher is faster)": lambda v: v["images_per_s"]["median"],
          "peak activation memory, batch 1 (KiB)": lambda v: v["peak_bytes"] / 2**10,
          "bytes written by one forward pass (KiB)": lambda v: v["written_bytes"] / 2**10}
    colors = plt.get_cmap("tab10").colors
    for ax, (xlabel, get) in zip(axes, xs.items()):
        for i, (name, v) in enumerate(rows.items()):
            a = v["test_acc"]
            ax.errorbar(get(v), a["mean"], yerr=[[a["mean"] - a["min"]], [a["max"] - a["mean"]]], fmt="o", ms=7, capsize=4,
                        color=colors[i % 10], label=f"{name}: {v['label']}")
            ax.annotate(name, (get(v), a["mean"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set(xlabel=xlabel, ylabel="test accuracy (mean of seeds; bars min-max)")
        ax.grid(alpha=0.3)
    any_res = next(iter(results.values()))
    r = any_res["recipe"]
    fig.suptitle(f"The paper's claims at laptop scale: every variant on the demo's canvases ({r['epochs']} epochs, "
                 f"{r['train_size']} training canvases, {any_res['seeds']} seeds), costs at 128x128\n"
                 f"{any_res['machine']['cpu']}, shared with other work ({any_res['machine']['date']}): speeds are noisy; "
                 "at batch 1 every variant takes 4.3-4.5 ms (operator overhead)",
                 fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def heads_figure(result: dict, path: Path, variant: str = "mhsa", seed: int = 0) -> None:
    """Like the paper's Fig. 3: per attention layer of the multi-head model, the cosine similarity
    between its heads' maps (top) and the accuracy with each head removed or left alone (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = result["variants"][variant]
    layers = v["heads"][seed]
    fig, axes = plt.subplots(2, len(layers), figsize=(3.6 * len(layers), 7), squeeze=False)
    for j, (name, d) in enumerate(layers.items()):
        sim = torch.tensor(d["similarity"])
        ax = axes[0, j]
        im = ax.imshow(sim, vmin=0, vmax=1, cmap="viridis")
        for (r, c), val in zip([(r, c) for r in range(d["heads"]) for c in range(d["heads"])], sim.flatten().tolist()):
            ax.text(c, r, f"{val:.2f}", ha="center", va="center", fontsize=7, color="white" if val < 0.6 else "black")
        ax.set_title(f"{name.removesuffix('.mixer.m')}\n{d['tokens']} tokens; mean {d['mean_similarity']:.2f} "
                     f"(other image: {d['cross_image_similarity']:.2f})", fontsize=8.5)
        ax.set(xlabel="head", ylabel="head", xticks=range(d["heads"]), yticks=range(d["heads"]))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        ax = axes[1, j]
        h = torch.arange(d["heads"]).float()
        ax.bar(h - 0.2, d["removed"], 0.4, label="head removed")
        ax.bar(h + 0.2, d["alone"], 0.4, label="head left alone")
        ax.axhline(d["all"], color="k", ls="--", lw=1, label="all heads")
        ax.axhline(d["none"], color="tab:red", ls="-.", lw=1, label="no head (the layer's attention zeroed)")
        ax.axhline(1 / v["arch"]["num_classes"], color="grey", ls=":", lw=1, label="chance")
        ax.set(xlabel="head", ylabel="test accuracy", ylim=(0, 1), xticks=range(d["heads"]))
    fig.suptitle(f"Multi-head attention's redundancy ({variant}, seed {seed}), as in the paper's Fig. 3: top, the cosine "
                 "similarity between heads' attention maps (128 test canvases);\nbottom, accuracy on 500 test canvases with each head "
                 "removed (its output zeroed) or left alone (the layer's other heads zeroed), other layers intact", fontsize=9.5)
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def figures(results: dict[str, dict], docs: Path = DOCS) -> list[Path]:
    out = []
    if results:
        tradeoff_figure(results, docs / "claims-tradeoff.png")
        out.append(docs / "claims-tradeoff.png")
    if "heads" in results:
        heads_figure(results["heads"], docs / "claims-heads.png")
        out.append(docs / "claims-heads.png")
    return out


# ---- command line --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"{', '.join(EXPERIMENTS)} or all")
    p.add_argument("--list", action="store_true", help="list the experiments and their variants")
    p.add_argument("--seeds", type=int, default=2, help="training runs per variant (default 2)")
    p.add_argument("--epochs", type=int, default=Recipe.epochs, help=f"default {Recipe.epochs}")
    p.add_argument("--train-size", type=int, default=Recipe.train_size, help=f"default {Recipe.train_size} (the demo: 6000)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch on 256 canvases (accuracy near chance); "
                                                       "results to runs/experiments-quick, not the committed ones")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time, one core each (default 1)")
    p.add_argument("--out", type=Path, help=f"folder for NAME.json (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--runs", type=Path, default=RUNS, help=f"cache of trained runs (default {RUNS})")
    p.add_argument("--figures", action="store_true", help="redraw docs/claims-*.png from the results in --out")
    args = p.parse_args(argv)
    if args.list:
        for name, e in EXPERIMENTS.items():
            print(f"{name}: {e.claim}")
            for v in e.variants:
                print(f"    {v:10s} {VARIANTS[v].label}")
        return 0
    names = list(EXPERIMENTS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment {unknown[0]!r}; expected {', '.join(EXPERIMENTS)} or all (--list describes them)")
    if not names and not args.figures:
        p.error(f"name an experiment: {', '.join(EXPERIMENTS)} or all (--list describes them)")
    for key in ("seeds", "epochs", "train_size", "jobs"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    out = args.out or (Path("runs") / "experiments-quick" if args.quick else RESULTS)
    recipe = QUICK if args.quick else Recipe(epochs=args.epochs, train_size=args.train_size)
    t0 = time.perf_counter()
    if names:
        train_all(jobs_of(names, args.seeds), recipe, args.runs, args.jobs)  # all of them in one pool
    if names:
        used = dict.fromkeys(v for n in names for v in EXPERIMENTS[n].variants)
        print(f"{PROG}: timing {len(used)} variants on one core, interleaved", file=sys.stderr)
        speed = timings({v: VARIANTS[v] for v in used})
    for name in names:
        result = run_experiment(name, recipe, args.seeds, args.runs, args.jobs, speed)
        result["wall_seconds"] = time.perf_counter() - t0  # since the start of the command (training shared)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / f"{name}.json") as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
        print_result(result)
        print(f"wrote {out / (name + '.json')} ({result['wall_seconds']:.0f} s)")
    if args.figures or (names and not args.quick):
        for path in figures(load_results(out)):
            print(f"drew {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
