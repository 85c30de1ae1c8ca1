"""shvit_torch.optimize (folded, channels-last, traced and frozen) against the eager, unfolded
eval-mode model: equal outputs for two input shapes (batch 1, odd and non-square), with and
without a distillation head; inference only; a bad mode is a one-line ShvitError (bad input:
tests/test_bad_input.py);
``python -m shvit_torch.run --fast`` saves the same logits as without it.

Cheap: a small config (every block type, a few thousand weights), a trace of ~0.1 s per shape;
mode="compile" (inductor, frozen weights) is run once, on one shape (~10 s to compile).
"""
import numpy as np
import pytest
import torch

import shvit_torch
from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_torch import run
from shvit_torch.fast import FastSHViT
from tests.helpers import assert_close, randomize

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7)
SHAPES = [(1, 3, 45, 38), (3, 3, 64, 96)]  # batch 1 with an odd, non-square image; then a batch of 3


def batch(shape, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.fixture(scope="module", params=[False, True], ids=["head", "distilled"])
def model(request):
    m = shvit_torch.create(SMALL.replace(distillation=request.param))
    randomize(m, seed=31)
    return m.eval()


@pytest.fixture(scope="module")
def fast(model):
    return shvit_torch.optimize(model)


def test_equals_eager_unfolded_model(model, fast):
    with torch.no_grad():
        refs = [model(batch(s, i)) for i, s in enumerate(SHAPES)]
    for again in range(2):  # the second pass reuses the traced graphs
        for i, s in enumerate(SHAPES):
            assert_close(f"optimize() {s}, pass {again}", fast(batch(s, i)), refs[i], dtype=np.float32)
    assert len(fast.graphs) == len(SHAPES)  # one frozen trace per shape, not one per call
    assert all(isinstance(g, torch.jit.ScriptModule) for g in fast.graphs.values())


@pytest.mark.slow
def test_compile_mode_equals_eager_unfolded_model():
    """Inductor with frozen weights: the same answers, inputs kept in the default layout."""
    torch._dynamo.reset()
    m = shvit_torch.create(SMALL)
    randomize(m, seed=32)
    m.eval()
    fast = shvit_torch.optimize(m, mode="compile")
    assert fast.mode == "compile" and fast.memory_format == torch.contiguous_format
    with torch.no_grad():
        for seed in (0, 1):  # the second call replays the compiled graph
            x = batch(SHAPES[1], seed)
            assert_close(f"optimize(mode='compile') call {seed}", fast(x), m(x), dtype=np.float32)


def test_example_traces_now_and_model_is_left_alone(model):
    params = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        fast = shvit_torch.optimize(model, example=batch(SHAPES[0]))
    finally:
        model.eval()
    assert list(fast.graphs) == [(SHAPES[0], torch.float32, torch.device("cpu"))]
    assert not model.fused and all(p.requires_grad for p in model.parameters())
    assert not model.patch_embed[0].c.weight.is_contiguous(memory_format=torch.channels_last)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    with torch.no_grad():  # a folded model in, the same answer out
        assert_close("optimize(fused)", shvit_torch.optimize(model.fuse())(batch(SHAPES[1])), model(batch(SHAPES[1])))


def test_inference_only(fast):
    x = batch(SHAPES[0]).requires_grad_(True)
    y = fast(x)
    assert not y.requires_grad and y.grad_fn is None
    assert not isinstance(fast, torch.nn.Module)  # nothing an optimizer could be handed
    assert not any(p.requires_grad for p in fast.model.parameters())
    assert fast.eval() is fast
    with pytest.raises(ShvitError, match="inference only"):
        fast.train()


@pytest.mark.parametrize("kwargs, match", [(dict(mode="jit"), "unknown optimize mode 'jit'"), (dict(mode=None), "mode None")])
def test_bad_mode_is_one_line(model, kwargs, match):
    with pytest.raises(ShvitError, match=match) as e:
        shvit_torch.optimize(model, **kwargs)
    assert "\n" not in str(e.value) and "trace, compile" in str(e.value)


def test_not_a_shvit_model():
    with pytest.raises(ShvitError, match="takes a shvit_torch SHViT, got Linear"):
        shvit_torch.optimize(torch.nn.Linear(2, 2))


def test_cli_fast_saves_the_same_logits(model, tmp_path, capsys):
    shvit_torch.save(model, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", batch(SHAPES[1], seed=5).numpy())
    common = ["--weights", str(tmp_path / "m.safetensors"), "--input", str(tmp_path / "x.npy"), "--device", "cpu", "--topk", "2"]
    assert run.main([*common, "--save-logits", str(tmp_path / "eager.npy")]) == 0
    assert run.main([*common, "--save-logits", str(tmp_path / "fast.npy"), "--fast"]) == 0
    err = capsys.readouterr().err
    assert "Warning" not in err and "Traceback" not in err  # the trace's deprecation notices are kept quiet
    eager, fast = np.load(tmp_path / "eager.npy"), np.load(tmp_path / "fast.npy")
    assert eager.shape == (3, 7)
    assert_close("--fast logits", fast, eager, dtype=np.float32)


def test_fast_shvit_is_what_optimize_returns(fast):
    assert isinstance(fast, FastSHViT) and fast.mode == "trace" and fast.config.num_classes == 7


def test_cli_fast_trace_failure_is_one_line(model, tmp_path, capsys, monkeypatch):
    """Where tracing fails (a device torch.jit cannot trace on), --fast ends in one line and exit 2."""
    def broken(module, example):
        raise RuntimeError("no tracing kernel for this device\nlong C++ stack")

    monkeypatch.setattr("shvit_torch.fast.trace_frozen", broken)
    shvit_torch.save(model, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", batch(SHAPES[0]).numpy())
    assert run.main(["--weights", str(tmp_path / "m.safetensors"), "--input", str(tmp_path / "x.npy"), "--fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m shvit_torch.run: error: torch.jit.trace failed on cpu (no tracing kernel for this device); "
                   "use model.fuse() instead (on the command line: drop --fast)"]
