"""The shared test helpers: one comparison for every check, random weights from a seed.

``assert_close`` checks shape, then dtype, then values against atol + rtol * |ref|, and on
failure names the tensor, the max abs/rel difference and the worst index: a failure
explains itself. ``randomize`` gives a torch model random weights AND random BatchNorm
statistics (the default init zeroes many residual branches and would hide bugs).
"""
from __future__ import annotations

import numpy as np

from shvit_numpy.weights import random_state  # noqa: F401  (the tests' random weights live in the base: the bench uses them too)

# Tolerances, in one place (docs/05-three-frameworks.md explains them). float32 results
# differ by summation order only; errors grow with depth and with |logits|.
TOL = {
    "float32": dict(atol=1e-4, rtol=1e-4),  # whole models and blocks, float32 everywhere
    "float16": dict(atol=1e-2, rtol=1e-2),  # tinygrad --half against float32 torch (measured <= 3.6e-3)
}


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # tinygrad
        return x.numpy()
    return np.asarray(x)


def compare(name: str, got, ref, atol: float, rtol: float, dtype=None) -> str | None:
    """None when ``got`` matches ``ref``; else one line saying what differs and where."""
    got, ref = to_numpy(got), to_numpy(ref)
    if got.shape != ref.shape:
        return f"{name}: shape {list(got.shape)} != expected {list(ref.shape)}"
    if dtype is not None and got.dtype != np.dtype(dtype):
        return f"{name}: dtype {got.dtype} != expected {np.dtype(dtype)}"
    g, r = got.astype(np.float64), ref.astype(np.float64)
    if not np.isfinite(g).all():
        return f"{name}: {int((~np.isfinite(g)).sum())} non-finite values"
    diff = np.abs(g - r)
    bad = diff > atol + rtol * np.abs(r)
    if not bad.any():
        return None
    worst = np.unravel_index(np.argmax(diff - rtol * np.abs(r)), diff.shape)
    rel = diff / np.maximum(np.abs(r), 1e-12)
    return (f"{name}: {int(bad.sum())}/{bad.size} values off; max abs diff {diff.max():.3g}, max rel diff {rel.max():.3g}; "
            f"worst at {tuple(int(i) for i in worst)}: got {g[worst]:.6g}, expected {r[worst]:.6g} (atol {atol}, rtol {rtol})")


def assert_close(name: str, got, ref, atol: float | None = None, rtol: float | None = None, dtype=None) -> None:
    tol = TOL["float32"]
    msg = compare(name, got, ref, tol["atol"] if atol is None else atol, tol["rtol"] if rtol is None else rtol, dtype)
    assert msg is None, msg


def randomize(model, seed: int):
    """Load ``random_state`` into a shvit_torch model (in place); returns the numpy state."""
    import torch

    from shvit_numpy.names import state_shapes

    state = random_state(state_shapes(model.config), seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    return state


def random_model_file(cfg, seed: int, path):
    """A torch model of ``cfg`` in eval mode with ``randomize``'s weights, saved as the canonical
    file ``path``: the reference and the file every other runtime loads. Returns the model."""
    import shvit_torch

    model = shvit_torch.create(cfg).eval()
    randomize(model, seed)
    shvit_torch.save(model, path)
    return model


def authors_file(state: dict, path, *, fp16=False, two_d=False, training=False, prefix_module=False) -> None:
    """Write ``state`` (canonical numpy) as the authors' ``.pth`` in one of the spec's shapes:
    ``{'model': sd}``, float16 tensors, 1x1 kernels stored 2-D, or a training-program dict with
    ``optimizer``, ``lr_scheduler``, ``epoch``, ``scaler``, ``model_ema`` and ``args``."""
    import argparse

    import torch

    from shvit_numpy.names import canonical_to_authors

    sd = {}
    for k, v in state.items():
        t = torch.from_numpy(np.array(v))
        if two_d and t.ndim == 4 and t.shape[2:] == (1, 1):
            t = t[:, :, 0, 0].clone()
        if fp16:
            t = t.half()
        name = ("module." if prefix_module else "") + canonical_to_authors(k)
        sd[name] = t
        if k.endswith("running_var"):
            sd[name.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    obj = {"model": sd}
    if training:
        ema = {k: v.clone() + 1 if v.is_floating_point() else v for k, v in sd.items()}
        obj.update(optimizer={"state": {}, "param_groups": [{"lr": 1e-3}]}, lr_scheduler={"last_epoch": 3},
                   epoch=299, scaler={"scale": 65536.0}, model_ema=ema,
                   args=argparse.Namespace(model="shvit_s1", lr=1e-3, batch_size=256, distillation_type="none"))
    torch.save(obj, path)
