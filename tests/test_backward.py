"""shvit_numpy learns: the hand-written backward pass (shvit_numpy.backward), AdamW (shvit_numpy.optim)
and the NumPy trainer (shvit_numpy.train), each against torch.

Exact comparisons run in float64 on both sides and allow |got - ref| <= 1e-7 + 1e-7 |ref| (float64
rounding leaves ~1e-12; a wrong rule is off by far more). Models have random weights AND random
BatchNorm statistics (tests.helpers.randomize), random configurations (odd, non-square inputs, the
distillation head, partial dims up to the full width). About 10 s on one core.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import shvit_numpy
import shvit_torch
from shvit_numpy import backward
from shvit_numpy.config import SHViTConfig
from shvit_numpy.optim import AdamW
from shvit_numpy.weights import save_weights
from shvit_torch.train import param_groups
from tests.helpers import assert_close, random_state, randomize
from tests.strategies import configs, seeds

ROOT = Path(__file__).resolve().parent.parent
F64 = dict(atol=1e-7, rtol=1e-7)


def twins(cfg: SHViTConfig, seed: int):
    """The same random weights and BatchNorm statistics as a float64 torch model in train mode and
    a float64 unfolded numpy model loaded from the canonical file (``shvit_numpy.load(path, fold=False)``)."""
    ref = shvit_torch.create(cfg)
    randomize(ref, seed)
    with tempfile.TemporaryDirectory() as tmp:
        shvit_torch.save(ref, Path(tmp) / "m.safetensors")
        model = shvit_numpy.load(Path(tmp) / "m.safetensors", fold=False)
    return ref.double().train(), backward.cast(model, np.float64)


def torch_loss(ref, x: torch.Tensor, labels: np.ndarray, smoothing: float) -> torch.Tensor:
    """Torch's train-mode loss: CE, or (CE(head) + CE(head_dist)) / 2 on the distilled pair."""
    out = ref(x)
    outs = out if isinstance(out, tuple) else (out,)
    y = torch.from_numpy(labels)
    return sum(F.cross_entropy(z, y, label_smoothing=smoothing) for z in outs) / len(outs)


@st.composite
def batches(draw):
    """(B, 3, H, W) with B >= 2 (BatchNorm in training needs two values per channel) and odd,
    even and non-square sizes; and a label smoothing of 0 or torch's 0.1."""
    return (draw(st.integers(2, 3)), 3, draw(st.integers(9, 48)), draw(st.integers(9, 48))), draw(st.sampled_from([0.0, 0.1]))


@settings(max_examples=8)
@given(cfg=configs(max_width=24, max_depth=1), batch=batches(), seed=seeds)
def test_every_gradient_and_the_running_statistics_equal_autograd(cfg, batch, seed):
    """loss, every parameter's gradient (named as torch's named_parameters), dL/dx, and the
    BatchNorm running statistics after the step, against torch autograd in train mode."""
    shape, smoothing = batch
    ref, model = twins(cfg, seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    labels = rng.integers(0, cfg.num_classes, shape[0])
    loss, grads, dx = backward.forward_backward(model, x, labels, smoothing)

    xt = torch.from_numpy(x).requires_grad_()
    ref_loss = torch_loss(ref, xt, labels, smoothing)
    ref_loss.backward()
    params = dict(ref.named_parameters())
    assert list(grads) == list(params)  # every trainable tensor, nothing else, in torch's order
    assert_close("loss", np.float64(loss), ref_loss, **F64)
    for name, p in reversed(params.items()):  # from the loss backwards: the first that differs is the broken layer
        assert_close(f"grad {name}", grads[name], p.grad, dtype=np.float64, **F64)
    assert_close("grad input", dx, xt.grad, dtype=np.float64, **F64)
    stats = ref.state_dict()
    for name, value in model.state_dict().items():
        if "running_" in name:
            assert_close(name, value, stats[name], **F64)


def test_loss_and_grads_api_in_float32():
    """The public call on a float32 model and batch: float32 gradients, within float32's rounding of
    torch's float32 autograd (1e-4 relative, plus 1e-4 of the model's largest gradient)."""
    cfg = SHViTConfig(embed_dim=(16, 24, 16), partial_dim=(4, 8, 16), depth=(1, 1, 1), types=("i", "s", "s"), num_classes=5,
                      distillation=True)
    ref = shvit_torch.create(cfg)
    randomize(ref, 7)
    with tempfile.TemporaryDirectory() as tmp:
        shvit_torch.save(ref, Path(tmp) / "m.safetensors")
        model = shvit_numpy.load(Path(tmp) / "m.safetensors", fold=False)
    x = np.random.default_rng(0).normal(size=(4, 3, 37, 50)).astype(np.float32)
    labels = [0, 4, 2, 2]
    loss, grads = backward.loss_and_grads(model, x, labels, label_smoothing=0.1)
    ref_loss = torch_loss(ref.train(), torch.from_numpy(x), np.array(labels), 0.1)
    ref_loss.backward()
    assert isinstance(loss, float)
    assert_close("loss", np.float32(loss), ref_loss.detach())
    scale = max(float(p.grad.abs().max()) for p in ref.parameters())  # some gradients are 0 up to rounding
    for name, p in ref.named_parameters():  # (a BatchNorm's bias before another BatchNorm): atol from the largest
        assert_close(f"grad {name}", grads[name], p.grad, atol=1e-4 * scale, rtol=1e-4, dtype=np.float32)


@settings(max_examples=4)
@given(cfg=configs(max_width=16, max_depth=1), seed=seeds, lr=st.floats(1e-4, 1e-2), wd=st.floats(0.0, 0.1))
def test_three_adamw_steps_equal_torch(cfg, seed, lr, wd):
    """Three training steps (forward, backward, AdamW with the trainer's parameter groups: no
    decay on norms and biases): every parameter and running statistic equals torch's after them."""
    ref, model = twins(cfg, seed)
    opt_ref = torch.optim.AdamW(param_groups(ref, wd), lr=lr)
    opt = AdamW(backward.parameters(model), lr=lr, weight_decay=wd)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        x = rng.normal(size=(2, 3, 33, 20))
        labels = rng.integers(0, cfg.num_classes, 2)
        _, grads = backward.loss_and_grads(model, x, labels, 0.1)
        opt.step(grads)
        opt_ref.zero_grad()
        torch_loss(ref, torch.from_numpy(x), labels, 0.1).backward()
        opt_ref.step()
    stats = ref.state_dict()
    for name, value in model.state_dict().items():
        assert_close(name, value, stats[name], **F64)


def test_finite_differences_on_a_tiny_model():
    """Without torch: for every tensor, the loss's change along a random direction (central
    differences, step 1e-5, float64) equals the gradient's dot product with that direction, to
    1e-9 + 1e-6 relative (the differences' own error is ~1e-11); the input too."""
    cfg = SHViTConfig(embed_dim=(8, 12, 10), partial_dim=(2, 5, 10), qk_dim=(3, 4, 2), depth=(1, 0, 0), types=("s", "s", "s"),
                      num_classes=4, distillation=True)  # every kind of layer: stem, block with attention, 2 downsamples, 2 heads
    model = backward.cast(shvit_numpy.model.SHViT(cfg).load_state(random_state(shvit_numpy.names.state_shapes(cfg), 3)), np.float64)
    rng = np.random.default_rng(0)
    x, labels, h = rng.normal(size=(2, 3, 40, 27)), np.array([1, 3]), 1e-5
    _, grads, dx = backward.forward_backward(model, x, labels, 0.1)

    def loss_at(x_):  # the training forward alone (no backward), as forward_backward computes the loss
        logits, _ = backward.model_forward(model, x_, {})
        return sum(backward.cross_entropy(z, labels, 0.1)[0] for z in logits) / len(logits)

    params = backward.parameters(model)
    for name, p in [*reversed(params.items()), ("input", x)]:  # from the loss backwards
        v = rng.normal(size=p.shape)
        p += h * v
        up = loss_at(x)
        p -= 2 * h * v
        down = loss_at(x)
        p += h * v
        numeric, analytic = (up - down) / (2 * h), float(((dx if name == "input" else grads[name]) * v).sum())
        assert abs(numeric - analytic) <= 1e-9 + 1e-6 * abs(analytic), \
            f"{name}: finite differences {numeric:.12g}, gradient {analytic:.12g}"


def test_initialisation_is_torchs():
    """shvit_numpy.train's random start has torch's layout: norms and biases as torch sets them
    (BatchNorm weight 0 where a residual branch starts as the identity, else 1), kernels and SE
    biases within +-1/sqrt(fan_in), the classifier ~ N(0, 0.02)."""
    from shvit_numpy.train import DEMO_CONFIG, init_state

    shapes = shvit_numpy.names.state_shapes(DEMO_CONFIG)
    ref = {k: v.numpy() for k, v in shvit_torch.create(DEMO_CONFIG).state_dict().items() if k in shapes}
    state = init_state(DEMO_CONFIG, np.random.default_rng(0))
    assert list(state) == list(ref) and all(state[k].shape == ref[k].shape for k in ref)
    for name, value in state.items():
        if name.endswith((".se.fc1.bias", ".se.fc2.bias")) or value.ndim == 4:  # uniform(+-1/sqrt(fan_in))
            fan_in = int(np.prod(shapes[name.replace(".bias", ".weight")][1:]))
            assert 0 < np.abs(value).max() <= 1 / np.sqrt(fan_in), name
        elif name.endswith(".l.weight"):
            assert 0.015 < value.std() < 0.025, name
        else:
            np.testing.assert_array_equal(value, ref[name], err_msg=name)


NO_TORCH_RUN = """
import importlib.abc, json, runpy, sys
import numpy as np
class NoTorch(importlib.abc.MetaPathFinder):  # as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTorch())
try:
    import torch
    raise SystemExit("the torch blocker does not work")
except ImportError:
    pass
weights, out = sys.argv[1], sys.argv[2]
import shvit_numpy
from shvit_numpy.backward import loss_and_grads
model = shvit_numpy.load(weights, fold=False)
loss, grads = loss_and_grads(model, np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32), [0, 1], 0.1)
json.dump({"loss": loss, "grads": sorted(grads)}, open(out + ".json", "w"))
sys.argv = ["shvit_numpy.train", "--out", out, "--init-from", weights, "--limit", "4", "--batch-size", "4", "--epochs", "1",
            "--resolution", "32", "--no-progress"]
try:
    runpy.run_module("shvit_numpy.train", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, e.code
assert "torch" not in sys.modules
"""


def test_loss_and_grads_and_the_trainer_run_without_torch(tmp_path):
    """In a process where ``import torch`` fails: loss_and_grads, and one step of shvit_numpy.train
    (4 canvases at 32x32) from a weight file, whose model.safetensors then loads in torch."""
    cfg = SHViTConfig(embed_dim=(8, 12, 16), partial_dim=(2, 4, 8), depth=(1, 1, 1), num_classes=3)
    state = random_state(shvit_numpy.names.state_shapes(cfg), 0)
    save_weights(tmp_path / "init.safetensors", cfg, state)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", NO_TORCH_RUN, str(tmp_path / "init.safetensors"), str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    api = json.loads((tmp_path / "run.json").read_text())
    assert np.isfinite(api["loss"]) and api["grads"] == sorted(backward.trainable_names(cfg))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_images"] == 4 and 0 <= metrics["test_acc"] <= 1 and metrics["config"]["num_classes"] == 8
    trained = shvit_torch.load(out / "model.safetensors").canonical_state()
    assert set(trained) == set(shvit_numpy.names.state_shapes(cfg.replace(num_classes=8)))
    moved = [k for k in trained if not k.startswith("head") and not np.array_equal(trained[k], state[k])]
    assert moved and all(np.isfinite(v).all() for v in trained.values())  # one AdamW step changed the weights


def test_trainer_bad_input_is_one_line(capsys, tmp_path):
    """A missing --init-from file and a batch BatchNorm cannot train on: one line, exit status 2."""
    from shvit_numpy.train import main

    assert main(["--out", str(tmp_path), "--init-from", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.safetensors" in err, err
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--batch-size", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--batch-size" in err, err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
