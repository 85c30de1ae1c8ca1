"""AdamW in NumPy, step for step ``torch.optim.AdamW`` (decoupled weight decay, bias correction),
with the trainer's parameter groups: weight decay on kernels and linear weights only, never on
norm parameters and biases (shvit_torch.train.param_groups: a tensor with one axis is not decayed);
and the learning-rate schedule both trainers follow (``lr_factor``).
"""
from __future__ import annotations

import math

import numpy as np


def lr_factor(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up to the peak, then cosine decay to ``floor``: a factor on the peak rate ``base``
    at ``step`` (from 0) of ``total``. shvit_torch.train hands it to ``LambdaLR``; shvit_numpy.train
    sets ``lr = base * lr_factor(...)`` before each step."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return (floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * t))) / base


def decays(param: np.ndarray) -> bool:
    """The trainer's rule: decay kernels and linear weights (2+ axes), not norms and biases (1 axis)."""
    return param.ndim > 1


class AdamW:
    """``torch.optim.AdamW(param_groups(model, weight_decay), lr, betas, eps)`` over named arrays.

    One step, at step t (from 1), for a parameter p with gradient g (all element-wise):
        p <- p * (1 - lr * wd)                          decoupled decay (wd = 0 for norms and biases)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    The arrays in ``params`` are updated in place (they are the model's own), so the model
    trains without being told. ``lr`` may change between steps (a schedule sets it)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.weight_decay, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = {k: np.zeros_like(p) for k, p in params.items()}  # first moment (torch's exp_avg)
        self.v = {k: np.zeros_like(p) for k, p in params.items()}  # second moment (exp_avg_sq)
        self.t = 0

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1 ** self.t)
        bias_correction2_sqrt = np.sqrt(1 - b2 ** self.t)
        for name, p in self.params.items():
            g = grads[name].astype(p.dtype, copy=False)
            m, v = self.m[name], self.v[name]
            if decays(p):
                p *= 1 - self.lr * self.weight_decay
            m += (1 - b1) * (g - m)  # = b1 m + (1 - b1) g (torch's lerp)
            v *= b2
            v += (1 - b2) * g * g
            p -= step_size * m / (np.sqrt(v) / bias_correction2_sqrt + self.eps)

    def state_dict(self) -> dict:
        return {"t": self.t, "m": self.m, "v": self.v}
