"""The fast path's forward: the model's own layer tree, run through the CPU kernels of kernels.py.

``Lowered(model, weights)(layer, x)`` computes what ``layer(x)`` computes (shvit_tiny/layers.py),
layer by layer in the same order, with two differences that are only about speed:

* convolutions and linear layers are custom kernels reading their weights as pack.py laid them out
  (``weights``: id(layer) -> (weight, bias));
* the ReLU or the residual addition that follows a product is handed to it (``relu=``,
  ``residual=``) and applied in its last step, while the result is still in registers, rather
  than in another pass over memory.

A layer with no kernel of its own (BatchNorm, GroupNorm, ReLU) runs as layers.py writes it.
Channels-last throughout, as in layers.py.
"""
from __future__ import annotations

from tinygrad import Tensor

from . import csource
from .kernels import attend_kernel, conv_kernel, depthwise_kernel, frame_kernel, gemm_kernel, row_parts
from .pack import is_product, padded_stem


def epilogue(y: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
    """The ReLU and residual of a layer without a kernel epilogue (tinygrad fuses them lazily)."""
    y = y.relu() if relu else y
    return y if residual is None else y + residual


def product(x: Tensor, w: Tensor, bias: Tensor, n: int, relu: bool = False, residual: Tensor | None = None) -> Tensor:
    """(M, K) @ W + bias, then ReLU and + residual (M, n) if asked; W packed (Np/P, K, P)."""
    padded = w.shape[0] * w.shape[2]
    out = Tensor.empty(x.shape[0], padded, device=x.device, dtype=x.dtype)
    res = () if residual is None else (residual,)
    for rows in row_parts(x.shape[0], padded):  # one kernel, or 14-row tiles then the rows left over (kernels.row_parts)
        out = out.custom_kernel(x, w, bias, *res, fxn=csource.fxn(gemm_kernel, relu=relu, rows=rows))[0]
    return out if padded == n else out[:, :n]  # the padding columns dropped


def window_kernel(kernel, x: Tensor, w: Tensor, bias: Tensor, cout: int, k: int, stride: int, padding: int,
                  relu: bool, **layout) -> Tensor:
    """A k x k convolution kernel (dense or depthwise) over (B, H, W, C) -> (B, H', W', cout);
    dense only, ``layout``: ``channels_first=True``: x is (B, C, H, W); ``framed_in=True``: x is
    (B, H+2, W+2, C) with a zero frame; ``framed_out=True``: the output gets one (kernels.conv_kernel)."""
    B, H, W = (x.shape[0], *x.shape[2:]) if layout.get("channels_first") else x.shape[:3]
    H, W = (H - 2, W - 2) if layout.get("framed_in") else (H, W)
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    framed = int(layout.get("framed_out", False))
    out = Tensor.empty(B, Ho + 2 * framed, Wo + 2 * framed, cout, device=x.device, dtype=x.dtype)
    if framed:  # the frame's zeros first (only the frame: zeroing it all cost 3 ms of S1's stem at batch 16)
        out = out.custom_kernel(fxn=csource.fxn(frame_kernel))[0]
    fxn = csource.fxn(kernel, k=k, stride=stride, padding=padding, relu=relu, **layout)
    return out.custom_kernel(x, w, bias, fxn=fxn)[0]


class Lowered:
    """``model``'s forward on the CPU kernels; call it on a layer as you would call the layer."""

    def __init__(self, model, weights: dict[int, tuple]):
        self.model, self.weights = model, weights

    def __call__(self, layer, x: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
        run = getattr(self, type(layer).__name__, None)  # the method named after the layer's class
        return run(layer, x, relu, residual) if run else epilogue(layer(x), relu, residual)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, classes) float32: SHViT.forward, through the kernels."""
        m = self.model
        x = self.stem(x.cast(m.dtype))  # (B, 3, H, W) -> (B, H/16, W/16, C1)
        for stage in m.stages:
            x = self(stage, x)
        pooled = x.contiguous().mean(axis=(1, 2))  # (B, C3); the map realised first, else tinygrad
        y = self(m.head, pooled)  # folds the last product into the pooling reduce (4x slower)
        if m.head_dist is not None:
            y = (y + self(m.head_dist, pooled)) / 2
        return y.float().contiguous()  # its own buffer (replay.py reads it)

    def stem(self, x: Tensor) -> Tensor:
        """patch_embed (four 3x3 stride-2 convolutions, ReLU between) on the (B, 3, H, W) input.
        The first reads it channels-first (layers.py transposes it to channels-last first: a copy,
        2 ms for S1 at batch 16), and each but the last writes its output inside a one-pixel zero
        frame that is the next one's padding, so the next reads its taps without a test for the
        edge (kernels.conv_kernel). An unfolded model (ConvBN) runs as layers.py does."""
        m = self.model
        convs = m.patch_embed[::2]
        if not padded_stem(m) or any(c.padding != 1 for c in convs):  # not plain dense Conv2d layers, or another frame
            x = x.permute(0, 2, 3, 1)
            for conv, act in zip(convs, m.patch_embed[1::2] + [None]):
                x = self(conv, x, relu=act is not None)
            return x
        for i, conv in enumerate(convs):
            w, bias = self.weights[id(conv)]
            last = i == len(convs) - 1
            x = window_kernel(conv_kernel, x, w, bias, w.shape[1], conv.weight.shape[2], conv.stride, conv.padding,
                              not last, channels_first=i == 0, framed_in=i > 0, framed_out=not last)
        return x  # (B, H/16, W/16, C1)

    # ---- one method per layer class of layers.py ------------------------------------------------
    def Conv2d(self, conv, x, relu, residual):
        w, bias = self.weights[id(conv)]
        cout, _, k, _ = conv.weight.shape
        if is_product(conv):  # pixels as ONE row axis: (B*H*W, C_in) @ (C_in, C_out)
            B, H, W, C = x.shape
            res = None if residual is None else residual.reshape(B * H * W, cout)
            return product(x.reshape(B * H * W, C), w, bias, cout, relu, res).reshape(B, H, W, cout)
        kernel = conv_kernel if conv.groups == 1 else depthwise_kernel
        cout = w.shape[1] if conv.groups == 1 else cout  # the stem's: zero channels added (pack.padded_stem)
        return epilogue(window_kernel(kernel, x, w, bias, cout, k, conv.stride, conv.padding, relu), residual=residual)

    def ConvBN(self, m, x, relu, residual):  # an unfolded model: the BatchNorm after the kernel
        return epilogue(m.bn(self(m.c, x)), relu, residual)

    def Residual(self, r, x, relu, residual):
        return self(r.m, x, residual=x)  # x + m(x): the addition in m's last product

    def FFN(self, f, x, relu, residual):
        return self(f.pw2, self(f.pw1, x, relu=True), relu, residual)

    def SingleHeadAttention(self, a, x, relu, residual):
        """As layers.py, but each query's weighted sum of the values is a tiled kernel reading the
        values in place from the qkv map (tinygrad's generic reduce ran it at 9 GFLOPS)."""
        B, H, W, _ = x.shape
        x1, x2 = x[..., :a.pdim], x[..., a.pdim:]
        qkv = self(a.qkv, a.pre_norm(x1)).reshape(B, H * W, -1)  # (B, N, 2qk + pdim)
        q, k = qkv[..., :a.qk_dim], qkv[..., a.qk_dim:2 * a.qk_dim]
        scores = (q @ k.transpose(1, 2)).float() * a.scale  # (B, N, N)
        attn = scores.softmax(-1).cast(x.dtype).contiguous()
        out = Tensor.empty(B, H * W, a.pdim, device=x.device, dtype=x.dtype)
        x1 = out.custom_kernel(attn, qkv, fxn=csource.fxn(attend_kernel, offset=2 * a.qk_dim))[0]
        y = x1.reshape(B, H, W, a.pdim)
        y = y.cat(x2, dim=-1) if x2.shape[-1] else y  # (B, H, W, C)
        return self(a.proj[1], y.relu(), relu, residual)  # proj: ReLU, then 1x1 ConvBN C -> C

    def SqueezeExcite(self, se, x, relu, residual):
        s = x.mean(axis=(1, 2), keepdim=True)  # (B, 1, 1, C)
        gate = self(se.fc2, self(se.fc1, s, relu=True)).sigmoid().contiguous()
        return epilogue((x * gate).contiguous(), relu, residual)

    def PatchMerging(self, p, x, relu, residual):
        x = self(p.conv1, x, relu=True)
        x = self(p.conv2, x, relu=True)
        return self(p.conv3, self(p.se, x), relu, residual)

    def BasicBlock(self, b, x, relu, residual):
        x = self(b.conv, x)
        if b.mixer is not None:
            x = self(b.mixer, x)
        return self(b.ffn, x, relu, residual)

    def Stage(self, s, x, relu, residual):
        for layer in (s.downsample or []) + s.blocks:
            x = self(layer, x)
        return epilogue(x, relu, residual)

    def Linear(self, lin, x, relu, residual):
        w, bias = self.weights[id(lin)]
        return product(x, w, bias, lin.weight.shape[0], relu, residual)

    def NormLinear(self, nl, x, relu, residual):
        return self(nl.l, nl.bn(x), relu, residual)
