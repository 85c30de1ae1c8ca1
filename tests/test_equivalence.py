"""The cross-framework equivalence suite: NumPy == PyTorch (eval) == tinygrad, on models,
sizes and weights that hypothesis draws (random weights AND random BatchNorm statistics).

Every failure message ends with one line to paste (``python -m tests.repro ...``) that
re-runs the failing configuration and prints OK / NOT OK per runtime and per block.
Tolerances live in tests/helpers.py (TOL) and are explained in docs/05-three-frameworks.md.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shvit_torch
from shvit_numpy.names import canonical_to_authors, state_shapes
from shvit_numpy.weights import load_weights, read_safetensors
from tests.helpers import TOL, authors_file, compare
from tests.repro import command, make_input, make_weights
from tests.runtimes import HAVE_NUMPY_MODEL, HAVE_TINY, Numpy, Torch, block_paths, runtimes
from tests.strategies import configs, input_shapes, seeds

pytestmark = pytest.mark.xdist_group("equivalence")  # one worker: kernels that recur across examples compile once
# Each tinygrad example compiles new kernels (seconds): the costliest properties take half the
# profile's examples (4 of 8 in 'ci', 100 of 200 in 'thorough').
fewer = settings(max_examples=max(2, settings.default.max_examples // 2))
needs_others = pytest.mark.skipif(not (HAVE_NUMPY_MODEL and HAVE_TINY), reason="numpy and tinygrad models needed")


def agree(results: dict, ref, repro: str, **tol) -> None:
    """Assert every runtime's output matches torch's; the message names each failure + the repro line."""
    tol = tol or TOL["float32"]
    failures = [m for name, got in results.items() if (m := compare(name, got, ref, **tol))]
    assert not failures, "\n".join(failures) + f"\nreproduce: {repro}"


@pytest.mark.slow
@fewer
@needs_others
@given(cfg=configs(), shape=input_shapes(), seed=seeds)
def test_whole_models_agree_and_keep_samples_apart(cfg, shape, seed, tmp_path_factory):
    """Every runtime's logits equal torch's, and no runtime mixes the samples of a batch.

    BatchNorm runs in eval mode and attention per image: with every other sample replaced, sample
    i's logits stay as they were (the same input shape, so tinygrad's capture is replayed, not
    recompiled)."""
    path = make_weights(cfg, seed, tmp_path_factory.mktemp("w"))
    x = make_input(shape, seed)
    ref, *others = runtimes(path, fold=True)
    logits = {rt.name: rt(x) for rt in (ref, *others)}
    agree({f"{rt.name} logits": logits[rt.name] for rt in others}, logits[ref.name], command(cfg, shape, seed))
    if len(x) > 1:
        i = len(x) - 1
        x2 = make_input(shape, seed + 1)
        x2[i] = x[i]
        for rt in (ref, *others):
            agree({f"{rt.name}: sample {i} among other samples": rt(x2)[i:i + 1]}, logits[rt.name][i:i + 1],
                  command(cfg, shape, seed))


@pytest.mark.slow
@fewer
@needs_others
@given(cfg=configs(max_depth=1), shape=input_shapes(max_batch=2, max_size=40), seed=seeds)
def test_every_block_agrees(cfg, shape, seed, tmp_path_factory):
    """Each block alone, unfolded (ConvBN, depthwise residual, FFN, attention, SE, PatchMerging, head)."""
    path = make_weights(cfg, seed, tmp_path_factory.mktemp("w"))
    ref, *others = runtimes(path, fold=False)
    for kind, (bpath, ch, flat) in block_paths(cfg).items():
        x = make_input((shape[0], ch) if flat else (shape[0], ch, shape[2], shape[3]), seed)
        agree({f"{rt.name} {kind} ({bpath})": rt.block(bpath, x) for rt in others}, ref.block(bpath, x),
              command(cfg, shape, seed) + " --unfolded")


@fewer
@needs_others
@given(cfg=configs(max_depth=1), shape=input_shapes(max_size=48), seed=seeds)
def test_folding_changes_nothing(cfg, shape, seed, tmp_path_factory):
    """Folded == unfolded, in torch and in NumPy (and so in tinygrad, which folds with NumPy's code).

    shvit_tiny's load() folds on the host with this same NumPy code (its folded weights are
    shvit_numpy's); its own ``fuse()`` is checked tensor by tensor in tests/test_tiny.py, and its
    unfolded layers in ``test_every_block_agrees``."""
    path = make_weights(cfg, seed, tmp_path_factory.mktemp("w"))
    x = make_input(shape, seed)
    for rt in (Torch, Numpy):
        agree({f"{rt.name} folded": rt(path, fold=True)(x)}, rt(path, fold=False)(x), command(cfg, shape, seed))


@given(cfg=configs(), seed=seeds, fmt=st.sampled_from(["canonical", "timm-safetensors", "timm-pth", "authors", "authors-2d"]))
def test_weight_files_round_trip_losslessly(cfg, seed, fmt, tmp_path_factory):
    """Every format, through every loader, gives back exactly the tensors that were written."""
    d = tmp_path_factory.mktemp("f")
    src = make_weights(cfg, seed, d)
    state = read_safetensors(src)[0]
    model = shvit_torch.load(src)
    if fmt == "canonical":
        path = src
    elif fmt == "timm-safetensors":
        import safetensors.torch

        path = d / "model.safetensors"
        safetensors.torch.save_file(dict(model.state_dict()), path)
    elif fmt == "timm-pth":
        path = d / "model.pth"
        torch.save(model.state_dict(), path)
    else:
        path = d / "shvit.pth"
        authors_file(state, path, two_d=fmt == "authors-2d", training=True)
    loaded = shvit_torch.load(path).canonical_state()
    assert list(loaded) == list(state_shapes(cfg))
    bad = [k for k in state if not np.array_equal(loaded[k], state[k])]
    assert not bad, f"{fmt}: {len(bad)} tensors changed through shvit_torch.load, first {bad[0]} ({canonical_to_authors(bad[0])})"
    if path.suffix == ".safetensors":  # the numpy base (and so numpy and tinygrad) reads these directly
        base = load_weights(path).state
        assert all(np.array_equal(base[k], state[k]) for k in state)
        if HAVE_TINY:
            import shvit_tiny

            tiny_state = shvit_tiny.load(path, device="CPU", fold=False).state_dict()
            assert all(np.array_equal(np.asarray(tiny_state[k]), state[k]) for k in state), "tinygrad changed a tensor"


@needs_others
@given(shape=input_shapes(max_batch=2, max_size=40), seed=seeds, shift=st.floats(-50, 50))
def test_attention_rows_are_distributions_and_shift_invariant(shape, seed, shift, tmp_path_factory):
    from shvit_numpy.config import SHViTConfig

    cfg = SHViTConfig(embed_dim=(16, 24, 32), partial_dim=(4, 8, 16), depth=(1, 1, 1), types=("s", "s", "s"))
    path = make_weights(cfg, seed, tmp_path_factory.mktemp("w"))
    import shvit_numpy
    from shvit_numpy import layers as nl

    inter = shvit_numpy.load(path).forward_intermediates(make_input(shape, seed))
    attns = inter.attention if hasattr(inter, "attention") else inter["attention"]
    assert len(attns) == 3
    for name, a in attns.items():
        assert a.dtype == np.float32 and (a >= 0).all(), name
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5, err_msg=name)
    scores = make_input((2, 5, 7), seed) * 10
    for label, sm in [("numpy", nl.softmax), ("torch", lambda s: torch.from_numpy(s).softmax(-1).numpy())]:
        agree({f"{label} softmax(s + c)": sm(scores + np.float32(shift))}, sm(scores), f"seed={seed} shift={shift}", atol=1e-6, rtol=1e-5)
