"""SHViT's building blocks in PyTorch, named as in the spec; attribute paths are the weight names.

Each block that can be folded for inference has ``fuse()``, returning an equivalent module
(ConvBN -> one Conv2d with bias; Residual(depthwise ConvBN) -> one Conv2d; BN + Linear -> Linear).
"""
from __future__ import annotations

import torch
from torch import nn

from shvit_numpy.config import se_channels


class ConvBN(nn.Sequential):
    """Conv2d without bias, then BatchNorm2d: ``c`` and ``bn``. ``bn_weight_init=0`` makes the
    block output zero at initialisation (the residual branch starts as the identity)."""

    def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """w' = w * g / sqrt(var + eps) per output channel;  b' = beta - mean * g / sqrt(var + eps)."""
        c, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (cout,)
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                         groups=c.groups, bias=True, device=c.weight.device, dtype=c.weight.dtype)
        conv.weight.copy_(c.weight * scale[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * scale)
        return conv


def dw_conv(c: int, bn_weight_init: float = 1.0) -> ConvBN:
    """The depthwise 3x3 ConvBN (stride 1, padding 1, groups = channels)."""
    return ConvBN(c, c, 3, 1, 1, groups=c, bn_weight_init=bn_weight_init)


class Residual(nn.Module):
    """x + m(x). In training, ``drop`` > 0 drops the branch per sample (stochastic depth)."""

    def __init__(self, m: nn.Module, drop: float = 0.0):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x):
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop)
            return x + self.m(x) * keep.to(x.dtype)
        return x + self.m(x)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """A residual depthwise 3x3 conv is one conv: add 1 to the centre tap of each kernel."""
        if isinstance(self.m, ConvBN) and self.m.c.groups == self.m.c.in_channels == self.m.c.out_channels:
            conv = self.m.fuse()
            conv.weight[:, 0, 1, 1] += 1.0
            return conv
        self.m = fuse_modules(self.m)
        return self


class FFN(nn.Module):
    """1x1 ConvBN C -> 2C, ReLU, 1x1 ConvBN 2C -> C (last BN weight starts at 0)."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.pw1 = ConvBN(c, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvBN(hidden, c, bn_weight_init=0.0)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


class SingleHeadAttention(nn.Module):
    """SHSA: one attention head over the first ``pdim`` channels; the rest pass untouched.

    x1, x2 = split(x, [pdim, C - pdim]); x1 = GroupNorm(1 group)(x1);
    q, k, v = split(ConvBN(x1), [qk, qk, pdim]) flattened to N = H*W tokens;
    attn = softmax(q^T k * qk^-0.5) (N x N); x1 = v attn^T; out = ConvBN(ReLU(cat[x1, x2])).
    """

    def __init__(self, dim: int, qk_dim: int, pdim: int):
        super().__init__()
        self.dim, self.qk_dim, self.pdim = dim, qk_dim, pdim
        self.scale = qk_dim ** -0.5
        self.pre_norm = nn.GroupNorm(1, pdim)
        self.qkv = ConvBN(pdim, 2 * qk_dim + pdim)
        self.proj = nn.Sequential(nn.ReLU(), ConvBN(dim, dim, bn_weight_init=0.0))

    def attention(self, x: torch.Tensor):
        """(B, C, H, W) -> attended first-pdim channels (B, pdim, H, W), the rest, and attn (B, N, N)."""
        B, _, H, W = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        q, k, v = torch.split(self.qkv(self.pre_norm(x1)), [self.qk_dim, self.qk_dim, self.pdim], dim=1)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, qk, N), (B, qk, N), (B, pdim, N)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)  # (B, N, N): query x key
        x1 = (v @ attn.transpose(-2, -1)).reshape(B, self.pdim, H, W)
        return x1, x2, attn

    def forward(self, x):
        x1, x2, _ = self.attention(x)
        return self.proj(torch.cat([x1, x2], dim=1))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean_hw(x))))), 1x1 convs with bias, bottleneck se_channels(ch)."""

    def __init__(self, ch: int):
        super().__init__()
        rd = se_channels(ch)
        self.fc1 = nn.Conv2d(ch, rd, 1, bias=True)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, ch, 1, bias=True)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)  # (B, ch, 1, 1)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class PatchMerging(nn.Module):
    """Halve the resolution, C -> C': 1x1 up to 4C, ReLU, depthwise 3x3 stride 2, ReLU, SE, 1x1 down."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid = 4 * dim
        self.conv1 = ConvBN(dim, hid)
        self.act1 = nn.ReLU()
        self.conv2 = ConvBN(hid, hid, 3, 2, 1, groups=hid)
        self.act2 = nn.ReLU()
        self.se = SqueezeExcite(hid)
        self.conv3 = ConvBN(hid, out_dim)

    def forward(self, x):
        return self.conv3(self.se(self.act2(self.conv2(self.act1(self.conv1(x))))))


class BasicBlock(nn.Module):
    """Residual depthwise conv, then (type "s") residual single-head attention, then residual FFN."""

    def __init__(self, dim: int, qk_dim: int, pdim: int, kind: str, drop_path: float = 0.0):
        super().__init__()
        self.conv = Residual(dw_conv(dim, bn_weight_init=0.0), drop_path)
        self.mixer = Residual(SingleHeadAttention(dim, qk_dim, pdim), drop_path) if kind == "s" else nn.Identity()
        self.ffn = Residual(FFN(dim, 2 * dim), drop_path)

    def forward(self, x):
        return self.ffn(self.mixer(self.conv(x)))


def downsample(dim: int, out_dim: int, drop_path: float = 0.0) -> nn.Sequential:
    """Between stages: Residual(DW), Residual(FFN), PatchMerging, Residual(DW), Residual(FFN)."""
    return nn.Sequential(
        Residual(dw_conv(dim), drop_path), Residual(FFN(dim, 2 * dim), drop_path),
        PatchMerging(dim, out_dim),
        Residual(dw_conv(out_dim), drop_path), Residual(FFN(out_dim, 2 * out_dim), drop_path),
    )


class Stage(nn.Module):
    """An optional downsample (stages 2 and 3), then ``depth`` BasicBlocks."""

    def __init__(self, prev_dim: int | None, dim: int, qk_dim: int, pdim: int, kind: str, depth: int, drop_paths=()):
        super().__init__()
        drop_paths = list(drop_paths) or [0.0] * depth
        if prev_dim is not None:
            self.downsample = downsample(prev_dim, dim)
        self.blocks = nn.Sequential(*[BasicBlock(dim, qk_dim, pdim, kind, drop_paths[j]) for j in range(depth)])

    def forward(self, x):
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        return self.blocks(x)


class NormLinear(nn.Sequential):
    """BatchNorm1d then Linear (the classifier head); weight ~ truncated normal (std 0.02)."""

    def __init__(self, cin: int, cout: int, std: float = 0.02):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.l = nn.Linear(cin, cout)
        nn.init.trunc_normal_(self.l.weight, std=std)
        nn.init.constant_(self.l.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """Linear(BN(x)) = (W * s) x + (W (beta - mean * s) + b), s = g / sqrt(var + eps)."""
        bn, l = self.bn, self.l
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (cin,)
        lin = nn.Linear(l.in_features, l.out_features, device=l.weight.device, dtype=l.weight.dtype)
        lin.weight.copy_(l.weight * scale[None, :])
        lin.bias.copy_(l.weight @ (bn.bias - bn.running_mean * scale) + l.bias)
        return lin


def fuse_modules(module: nn.Module) -> nn.Module:
    """Replace, depth first, every child that has ``fuse()`` by its folded form."""
    if hasattr(module, "fuse"):
        return module.fuse()
    for name, child in module.named_children():
        setattr(module, name, fuse_modules(child))
    return module
