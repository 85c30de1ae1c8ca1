"""SHViT learning in plain NumPy: a training-mode forward that keeps what backward needs, and the
backward pass of every layer written out by hand, in the order of layers.py.

Every layer here is ONE function that runs the layer forward in training mode and returns
``(y, back)``: ``y`` is the output, ``back(dy) -> dx`` is its backward pass, a closure over what
the forward computed (the layer's inputs, normalised values, attention matrix...). So each
layer's gradient reads right under its forward. ``back`` stores the gradient of every weight it
owns in the ``grads`` dict under the weight's canonical name (``stages.1.blocks.0.mixer.m.qkv.c.weight``):

    y, back = conv_bn(layer, "patch_embed.0", x, grads)   # forward; BatchNorm uses batch statistics
    dx = back(dy)                                         # backward; grads now hold the two kernels' gradients

The chain rule is then just: call the ``back`` functions in reverse order, each with the
gradient the next layer handed back. Activations are channels-last, (B, H, W, C), as in layers.py;
weights keep PyTorch's layout. Everything runs in the dtype of the input and weights (float32 to
train, float64 to check against autograd), with matrix products and whole-array passes: no loop
over pixels. ``loss_and_grads`` is the entry point; docs/09-backward-by-hand.md derives each rule.
"""
from __future__ import annotations

from types import FunctionType

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .names import state_shapes
from .tree import assign, walk

BN_MOMENTUM = 0.1  # running = (1 - m) * running + m * batch statistic, as torch


# ---- elementary operations ---------------------------------------------------------------------

def pad_hw(x: np.ndarray, p: int) -> np.ndarray:
    """Zero padding of H and W: (B, H, W, C) -> (B, H+2p, W+2p, C)."""
    if not p:
        return x
    B, H, W, C = x.shape
    out = np.zeros((B, H + 2 * p, W + 2 * p, C), x.dtype)
    out[:, p:p + H, p:p + W] = x
    return out


def out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def tap(xp: np.ndarray, i: int, j: int, stride: int, ho: int, wo: int) -> np.ndarray:
    """The (B, Ho, Wo, C) view of padded ``xp`` that kernel tap (i, j) meets: rows i, i+s, ..."""
    return xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]


def windows(xp: np.ndarray, k: int, stride: int, ho: int, wo: int) -> np.ndarray:
    """im2col as a strided VIEW of padded ``xp``: (B, Ho, Wo, k, k, C), no copy until reshaped."""
    sb, sh, sw, sc = xp.strides
    return as_strided(xp, (xp.shape[0], ho, wo, k, k, xp.shape[3]), (sb, sh * stride, sw * stride, sh, sw, sc), writeable=False)


def unpad(dxp: np.ndarray, p: int) -> np.ndarray:
    """The gradient of ``pad_hw``: padding only copied x, so drop the border's gradient."""
    return dxp[:, p:dxp.shape[1] - p, p:dxp.shape[2] - p] if p else dxp


def standardize(x: np.ndarray, axes: tuple[int, ...], eps: float):
    """xhat = (x - mean) / sqrt(var + eps) over ``axes`` (biased var), and its backward.

    With n values per statistic, g = dL/dxhat:
        dL/dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps)
    (the two means are what the mean and the variance depend on every x: see docs/09).
    BatchNorm (axes B, H, W) and GroupNorm with one group (axes H, W, C) share it."""
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    var = np.square(d).mean(axis=axes, keepdims=True)  # biased, as torch normalises with
    inv = 1.0 / np.sqrt(var + eps)
    xhat = d * inv

    def back(g):
        return inv * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return xhat, mean, var, back


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---- convolutions --------------------------------------------------------------------------------

def conv_dense(x: np.ndarray, w: np.ndarray, stride: int, padding: int, input_grad: bool = True):
    """Dense k x k convolution as one matrix product, and its backward.

    Forward: cols (M, k*k*C_in) @ W (k*k*C_in, C_out), M = B*H'*W' (a 1x1 conv: cols = x).
    Backward: dW = cols^T @ dY (every output pixel adds its input window times its gradient);
    dcols = dY @ W^T, then col2im: each tap's slice of dcols is added back where the tap read
    from (k*k strided adds; windows overlap, so the adds accumulate). ``input_grad=False`` skips
    dx (None): the stem's first convolution needs no gradient for the image."""
    cout, cin, k, _ = w.shape
    B, H, W, _ = x.shape
    ho, wo = out_size(H, k, stride, padding), out_size(W, k, stride, padding)
    w_mat = w.transpose(2, 3, 1, 0).reshape(k * k * cin, cout)  # rows ordered (ky, kx, c_in)
    if k == 1 and stride == 1 and padding == 0:
        cols = x.reshape(-1, cin)  # (M, C_in): the pixels are the rows
    else:
        cols = windows(pad_hw(x, padding), k, stride, ho, wo).reshape(-1, k * k * cin)  # the im2col copy
    y = (cols @ w_mat).reshape(B, ho, wo, cout)

    def back(dy):  # (B, H', W', C_out) -> dx (B, H, W, C_in), dW (C_out, C_in, k, k)
        dy = dy.reshape(-1, cout)
        dw = (cols.T @ dy).reshape(k, k, cin, cout).transpose(3, 2, 0, 1)
        if not input_grad:
            return None, dw
        dcols = dy @ w_mat.T  # (M, k*k*C_in)
        if k == 1 and stride == 1 and padding == 0:
            return dcols.reshape(x.shape), dw
        dcols = dcols.reshape(B, ho, wo, k, k, cin)
        dxp = np.zeros((B, H + 2 * padding, W + 2 * padding, cin), dy.dtype)
        for i in range(k):
            for j in range(k):
                tap(dxp, i, j, stride, ho, wo)[...] += dcols[:, :, :, i, j]
        return unpad(dxp, padding), dw
    return y, back


def conv_depthwise(x: np.ndarray, w: np.ndarray, stride: int, padding: int):
    """Depthwise k x k convolution as k*k shifted multiply-adds, and its backward.

    Forward: y[b, y, x, c] = sum_ij xp[b, s*y + i, s*x + j, c] * w[c, 0, i, j].
    Backward, per tap (i, j), as the forward read it:
        dw[c, 0, i, j] = sum_{b,y,x} dy[b, y, x, c] * xp[b, s*y + i, s*x + j, c]
        dxp[b, s*y + i, s*x + j, c] += dy[b, y, x, c] * w[c, 0, i, j]"""
    C, _, k, _ = w.shape
    xp = pad_hw(x, padding)
    ho, wo = out_size(x.shape[1], k, stride, padding), out_size(x.shape[2], k, stride, padding)
    taps = w[:, 0].transpose(1, 2, 0)  # (k, k, C)
    y = tap(xp, 0, 0, stride, ho, wo) * taps[0, 0]
    for i in range(k):
        for j in range(k):
            if i or j:
                y += tap(xp, i, j, stride, ho, wo) * taps[i, j]

    def back(dy):  # (B, H', W', C) -> dx (B, H, W, C), dw (C, 1, k, k)
        dw = np.empty((k, k, C), dy.dtype)
        dxp = np.zeros_like(xp, dtype=dy.dtype)
        for i in range(k):
            for j in range(k):
                window = tap(xp, i, j, stride, ho, wo)
                dw[i, j] = np.einsum("bhwc,bhwc->c", window, dy)
                tap(dxp, i, j, stride, ho, wo)[...] += dy * taps[i, j]
        return unpad(dxp, padding), dw.transpose(2, 0, 1)[:, None]
    return y, back


# ---- layers with weights -------------------------------------------------------------------------

def conv2d(conv, name: str, x: np.ndarray, grads: dict, input_grad: bool = True):
    """A Conv2d layer (dense or depthwise; optional bias): ``{name}.weight``, ``{name}.bias``."""
    w = conv.weight
    depthwise = conv.groups > 1
    if depthwise and not (conv.groups == w.shape[0] and w.shape[1] == 1):
        raise NotImplementedError("grouped convolutions other than depthwise are not part of SHViT")
    y, conv_back = conv_depthwise(x, w, conv.stride, conv.padding) if depthwise else conv_dense(x, w, conv.stride, conv.padding, input_grad)
    if conv.bias is not None:
        y += conv.bias

    def back(dy):
        dx, grads[f"{name}.weight"] = conv_back(dy)
        if conv.bias is not None:
            grads[f"{name}.bias"] = dy.reshape(-1, dy.shape[-1]).sum(0)  # the bias is added at every pixel
        return dx
    return y, back


def batch_norm(bn, name: str, x: np.ndarray, grads: dict, momentum: float = BN_MOMENTUM):
    """BatchNorm2d on (B, H, W, C) or BatchNorm1d on (B, C) in TRAINING mode.

    Forward: normalise with the batch's mean and biased variance over every axis but the channel
    (n = B*H*W values per channel), then y = g * xhat + beta. It also moves the running statistics
    as torch does: running = (1 - m) running + m * batch, the variance unbiased (times n / (n - 1)).
    Backward: dbeta = sum dy, dg = sum dy * xhat, and dx from ``standardize``'s rule with g * dy."""
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xhat, mean, var, norm_back = standardize(x, axes, bn.eps)
    y = xhat * bn.weight + bn.bias
    m = momentum
    bn.running_mean = (1 - m) * bn.running_mean + m * mean.reshape(-1).astype(bn.running_mean.dtype)
    bn.running_var = (1 - m) * bn.running_var + m * (var.reshape(-1) * n / max(n - 1, 1)).astype(bn.running_var.dtype)

    def back(dy):
        grads[f"{name}.weight"] = (dy * xhat).sum(axis=axes)
        grads[f"{name}.bias"] = dy.sum(axis=axes)
        return norm_back(dy * bn.weight)
    return y, back


def conv_bn(layer, name: str, x: np.ndarray, grads: dict, input_grad: bool = True):
    """Conv2d without bias (``c``), then BatchNorm2d in training mode (``bn``)."""
    y, conv_back = conv2d(layer.c, f"{name}.c", x, grads, input_grad)
    y, bn_back = batch_norm(layer.bn, f"{name}.bn", y, grads)
    return y, lambda dy: conv_back(bn_back(dy))


def relu(layer, name: str, x: np.ndarray, grads: dict):
    """max(x, 0); its gradient passes where x > 0 and stops elsewhere."""
    keep = x > 0
    return x * keep, lambda dy: dy * keep


def residual(layer, name: str, x: np.ndarray, grads: dict):
    """x + m(x): the gradient reaches x twice, straight and through m, and the two add."""
    y, m_back = run(layer.m, f"{name}.m", x, grads)
    return x + y, lambda dy: dy + m_back(dy)


def ffn(layer, name: str, x: np.ndarray, grads: dict):
    """1x1 ConvBN C -> 2C, ReLU, 1x1 ConvBN 2C -> C."""
    return sequence([layer.pw1, relu, layer.pw2], name, x, grads, ["pw1", "act", "pw2"])


def group_norm(layer, name: str, x: np.ndarray, grads: dict):
    """GroupNorm with ONE group: ``standardize`` over each sample's (H, W, C), then y = g * xhat + beta
    per channel. Backward as BatchNorm's, with the statistics' axes (H, W, C) instead of (B, H, W)."""
    xhat, _, _, norm_back = standardize(x, (1, 2, 3), layer.eps)
    y = xhat * layer.weight + layer.bias

    def back(dy):
        grads[f"{name}.weight"] = (dy * xhat).sum(axis=(0, 1, 2))
        grads[f"{name}.bias"] = dy.sum(axis=(0, 1, 2))
        return norm_back(dy * layer.weight)
    return y, back


def attention_core(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float):
    """o = softmax(scale * q k^T) v over tokens (rows), and its backward.

    With S = scale * q k^T (B, N, N), A = softmax over each row of S, o = A v:
        dA = do v^T,   dv = A^T do
        dS = A * (dA - rowsum(dA * A))      (softmax's Jacobian: diag(a) - a a^T, per row)
        dq = scale * dS k,   dk = scale * dS^T q"""
    attn = softmax(scale * (q @ k.transpose(0, 2, 1)))  # (B, N, N): row = query, column = key
    o = attn @ v  # (B, N, pdim)

    def back(do):
        d_attn = do @ v.transpose(0, 2, 1)  # (B, N, N)
        dv = attn.transpose(0, 2, 1) @ do  # (B, N, pdim)
        ds = attn * (d_attn - (d_attn * attn).sum(axis=-1, keepdims=True))
        dq = scale * (ds @ k)  # (B, N, qk)
        dk = scale * (ds.transpose(0, 2, 1) @ q)  # (B, N, qk)
        return dq, dk, dv
    return o, attn, back


def single_head_attention(layer, name: str, x: np.ndarray, grads: dict):
    """SHSA on the first pdim channels: GroupNorm, qkv ConvBN, softmax attention, concat with the
    untouched channels, ReLU, proj ConvBN. Backward in the reverse order; the split and the
    concat only route gradients (the first pdim channels to attention, the rest straight through)."""
    B, H, W, C = x.shape
    p, qk = layer.pdim, layer.qk_dim
    normed, norm_back = group_norm(layer.pre_norm, f"{name}.pre_norm", x[..., :p], grads)
    qkv, qkv_back = conv_bn(layer.qkv, f"{name}.qkv", normed, grads)  # (B, H, W, 2qk + p)
    qkv = qkv.reshape(B, H * W, -1)  # tokens are pixels
    o, _, attn_back = attention_core(qkv[..., :qk], qkv[..., qk:2 * qk], qkv[..., 2 * qk:], qk ** -0.5)
    y = np.concatenate([o.reshape(B, H, W, p), x[..., p:]], axis=-1)  # (B, H, W, C)
    out, proj_back = sequence(layer.proj, f"{name}.proj", y, grads)  # ReLU, then ConvBN C -> C

    def back(dout):
        dy = proj_back(dout)  # (B, H, W, C)
        dq, dk, dv = attn_back(dy[..., :p].reshape(B, H * W, p))
        dqkv = np.concatenate([dq, dk, dv], axis=-1).reshape(B, H, W, 2 * qk + p)
        dx1 = norm_back(qkv_back(dqkv))
        return np.concatenate([dx1, dy[..., p:]], axis=-1)
    return out, back


def squeeze_excite(layer, name: str, x: np.ndarray, grads: dict):
    """y = x * gate, gate = sigmoid(fc2(relu(fc1(mean_hw x)))) per sample and channel.

    Backward: x reaches y twice, directly (dy * gate) and through the gate, via the mean:
    dgate = sum_hw dy * x;  dz2 = dgate * gate * (1 - gate);  back through fc2, ReLU, fc1 to
    ds (B, 1, 1, C); the mean hands ds / (H*W) to every pixel."""
    hw = x.shape[1] * x.shape[2]
    s = x.mean(axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
    z1, fc1_back = conv2d(layer.fc1, f"{name}.fc1", s, grads)
    a, relu_back = relu(None, "", z1, grads)
    z2, fc2_back = conv2d(layer.fc2, f"{name}.fc2", a, grads)
    gate = sigmoid(z2)  # (B, 1, 1, C)

    def back(dy):
        dgate = (dy * x).sum(axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
        ds = fc1_back(relu_back(fc2_back(dgate * gate * (1 - gate))))
        return dy * gate + ds / hw
    return x * gate, back


def patch_merging(layer, name: str, x: np.ndarray, grads: dict):
    """1x1 ConvBN to 4C, ReLU, depthwise 3x3 stride 2 ConvBN, ReLU, SE, 1x1 ConvBN to C'."""
    return sequence([layer.conv1, relu, layer.conv2, relu, layer.se, layer.conv3], name, x, grads,
                    ["conv1", "act1", "conv2", "act2", "se", "conv3"])


def basic_block(layer, name: str, x: np.ndarray, grads: dict):
    """Residual DW, residual SHSA (type "s"), residual FFN."""
    parts = [(layer.conv, "conv"), (getattr(layer, "mixer", None), "mixer"), (layer.ffn, "ffn")]
    parts = [(m, n) for m, n in parts if m is not None]
    return sequence([m for m, _ in parts], name, x, grads, [n for _, n in parts])


def stage(layer, name: str, x: np.ndarray, grads: dict):
    """The downsample's five layers (stages 2 and 3), then the blocks."""
    down = getattr(layer, "downsample", None) or []
    layers = [*down, *layer.blocks]
    names = [f"downsample.{i}" for i in range(len(down))] + [f"blocks.{j}" for j in range(len(layer.blocks))]
    return sequence(layers, name, x, grads, names)


def linear(layer, name: str, x: np.ndarray, grads: dict):
    """y = x W^T + b on (B, C_in): dW = dy^T x, db = sum_B dy, dx = dy W."""
    def back(dy):
        grads[f"{name}.weight"] = dy.T @ x
        grads[f"{name}.bias"] = dy.sum(0)
        return dy @ layer.weight
    return x @ layer.weight.T + layer.bias, back


def norm_linear(layer, name: str, x: np.ndarray, grads: dict):
    """BatchNorm1d (training mode) then Linear: the classifier head."""
    return sequence([layer.bn, layer.l], name, x, grads, ["bn", "l"])


def sequence(layers: list, name: str, x: np.ndarray, grads: dict, names: list[str] | None = None):
    """Layers one after another (named ``{name}.{i}`` or by ``names``); backward runs them in reverse.
    An entry may be a layer-function itself (``relu``) for a weightless step."""
    backs = []
    for i, layer in enumerate(layers):
        sub = f"{name}.{names[i] if names else i}"
        x, b = layer(None, sub, x, grads) if isinstance(layer, FunctionType) else run(layer, sub, x, grads)
        backs.append(b)

    def back(dy):
        for b in reversed(backs):
            dy = b(dy)
        return dy
    return x, back


TRAIN = {  # layers.py's class -> its training forward here (with backward inside)
    "Conv2d": conv2d, "BatchNorm2d": batch_norm, "BatchNorm1d": batch_norm, "ConvBN": conv_bn, "ReLU": relu,
    "Residual": residual, "FFN": ffn, "GroupNorm": group_norm, "SingleHeadAttention": single_head_attention,
    "SqueezeExcite": squeeze_excite, "PatchMerging": patch_merging, "BasicBlock": basic_block, "Stage": stage,
    "Linear": linear, "NormLinear": norm_linear,
}


def run(layer, name: str, x: np.ndarray, grads: dict):
    """The training forward of any layer of layers.py: ``(y, back)``."""
    return TRAIN[type(layer).__name__](layer, name, x, grads)


# ---- the whole model, the loss, the gradients ----------------------------------------------------

def model_forward(model, x: np.ndarray, grads: dict, input_grad: bool = True):
    """Training-mode forward of an unfolded ``shvit_numpy`` model on NCHW ``x``: (logits, back).

    ``logits`` is a list: [head] or, with a distillation head, [head, head_dist] (torch's
    training-mode pair). ``back(dlogits_list)`` fills ``grads`` and returns dL/dx, NCHW (None
    with ``input_grad=False``: training needs no gradient for the image, and skips its cost).
    Global average pooling's backward hands each pixel 1/(H*W) of the pooled gradient."""
    h, first_back = conv_bn(model.patch_embed[0], "patch_embed.0", x.transpose(0, 2, 3, 1), grads, input_grad)
    rest = model.patch_embed[1:]
    h, stem_back = sequence(rest, "patch_embed", h, grads, [str(i + 1) for i in range(len(rest))])
    h, stages_back = sequence(model.stages, "stages", h, grads)
    B, H, W, C = h.shape
    pooled = h.mean(axis=(1, 2))  # (B, C3)
    heads = [(model.head, "head")] + ([(model.head_dist, "head_dist")] if getattr(model, "head_dist", None) is not None else [])
    outs = [norm_linear(m, n, pooled, grads) for m, n in heads]

    def back(dlogits: list[np.ndarray]) -> np.ndarray:
        dpooled = sum(b(d) for (_, b), d in zip(outs, dlogits))
        dh = np.broadcast_to((dpooled / (H * W))[:, None, None, :], (B, H, W, C))
        dx = first_back(stem_back(stages_back(dh)))
        return None if dx is None else dx.transpose(0, 3, 1, 2)
    return [y for y, _ in outs], back


def cross_entropy(logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0):
    """torch's F.cross_entropy (mean over the batch) with label smoothing, and dL/dlogits.

    The target is q = (1 - eps) onehot(y) + eps / K; loss = mean_b -sum_c q_c log p_c with
    p = softmax(z), and dL/dz = (p - q) / B."""
    B, K = logits.shape
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    q = np.full_like(log_p, label_smoothing / K)
    q[np.arange(B), labels] += 1.0 - label_smoothing
    loss = float(-(q * log_p).sum() / B)
    return loss, (np.exp(log_p) - q) / B


def forward_backward(model, x: np.ndarray, labels, label_smoothing: float = 0.0, input_grad: bool = True):
    """(loss, grads by canonical name, dL/dx NCHW) for one training step's batch; the BatchNorm
    running statistics move as in one torch train-mode forward. With a distillation head the
    loss is (CE(head) + CE(head_dist)) / 2, both against ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    grads: dict[str, np.ndarray] = {}
    logits, back = model_forward(model, x, grads, input_grad)
    parts = [cross_entropy(z, labels, label_smoothing) for z in logits]
    loss = sum(p[0] for p in parts) / len(parts)
    dx = back([p[1] / len(parts) for p in parts])
    order = trainable_names(model.config)
    return loss, {k: grads[k] for k in order}, dx


def loss_and_grads(model, x: np.ndarray, labels, label_smoothing: float = 0.0) -> tuple[float, dict[str, np.ndarray]]:
    """For ``model = shvit_numpy.load(path, fold=False)``: the training loss on the NCHW batch ``x``
    with integer ``labels``, and the gradient of every trainable tensor by canonical name."""
    loss, grads, _ = forward_backward(model, x, labels, label_smoothing, input_grad=False)
    return loss, grads


# ---- parameters ----------------------------------------------------------------------------------

def trainable_names(cfg) -> list[str]:
    """The canonical names torch's ``named_parameters()`` reports: every tensor but running statistics."""
    return [k for k in state_shapes(cfg) if not k.endswith(("running_mean", "running_var"))]


def parameters(model) -> dict[str, np.ndarray]:
    """The model's trainable arrays by canonical name, in torch's ``named_parameters()`` order,
    made writable in place (an optimiser updates them where the model reads them)."""
    out = {}
    for name in trainable_names(model.config):
        value = walk(model, name)
        if not (value.flags.writeable and value.flags.c_contiguous and value.flags.owndata):
            value = np.array(value)
            assign(model, name, value)
        out[name] = value
    return out


def cast(model, dtype):
    """Every tensor of an unfolded model (weights and running statistics) in ``dtype``; returns the model."""
    for name in state_shapes(model.config):
        assign(model, name, np.array(walk(model, name), dtype=dtype))
    return model
