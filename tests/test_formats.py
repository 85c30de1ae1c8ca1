"""Weight files: canonical, timm and the authors' formats load and reproduce the model's logits.
Bad files (the one-line library error, the CLIs' exit 2): tests/test_bad_input.py."""
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import torch

import shvit_torch
from shvit_numpy.config import VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_numpy.names import state_shapes
from shvit_numpy.weights import load_weights, read_safetensors
from shvit_torch import convert
from tests.helpers import assert_close, authors_file, randomize

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7)
X = torch.randn(2, 3, 45, 38, generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


@pytest.fixture(scope="module")
def s1():
    model = shvit_torch.create("s1").eval()
    state = randomize(model, seed=11)
    return model, state


def test_canonical_round_trip_keeps_every_bit_and_metadata(tmp_path, s1):
    model, state = s1
    path = tmp_path / "m.safetensors"
    shvit_torch.save(model, path, resolution=224)
    tensors, meta = read_safetensors(path)
    assert list(tensors) == list(state_shapes(model.config))
    assert all(np.array_equal(tensors[k], state[k]) and tensors[k].dtype == np.float32 for k in state)
    assert json.loads(meta["shvit_config"])["embed_dim"] == [128, 224, 320]
    assert meta["shvit_resolution"] == "224"
    loaded = shvit_torch.load(path)
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(logits(loaded), logits(model))


def test_file_is_readable_by_the_safetensors_package(tmp_path, s1):
    model, state = s1
    shvit_torch.save(model, tmp_path / "m.safetensors")
    other = safetensors.numpy.load_file(tmp_path / "m.safetensors")
    assert set(other) == set(state) and all(np.array_equal(other[k], state[k]) for k in state)


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_timm_files_load(tmp_path, s1, kind):
    """timm's names are the canonical names; its files carry num_batches_tracked and no metadata."""
    model, state = s1
    sd = dict(model.state_dict())
    if kind == "safetensors":
        path = tmp_path / "model.safetensors"
        safetensors.numpy.save_file({k: v.numpy() for k, v in sd.items()}, path)
    else:
        path = tmp_path / "shvit_s1.pth"
        torch.save(sd, path)
    loaded = shvit_torch.load(path)
    assert loaded.config == VARIANTS["s1"]
    assert_close(f"timm {kind} logits", logits(loaded), logits(model), atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["s1", "s4"])
def test_timm_model_itself_agrees(tmp_path, variant):
    """timm's own SHViT (timm 1.0.31, imported with benchmarks/standin.py's inert torchvision)
    takes our canonical state with no renaming and gives our logits, unfolded and folded: the
    reference implementation and this one are the same function, and its files are ours."""
    from benchmarks.standin import import_timm

    timm, _ = import_timm()
    ours = shvit_torch.create(variant).eval()
    state = randomize(ours, seed=5)
    theirs = timm.create_model(f"shvit_{variant}", pretrained=False).eval()
    missing, unexpected = theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert [k for k in missing if not k.endswith("num_batches_tracked")] == [] and unexpected == []
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    safetensors.numpy.save_file({k: v.numpy() for k, v in theirs.state_dict().items()}, tmp_path / "timm.safetensors")
    with torch.no_grad():
        expected = ours(x)
        assert_close(f"timm shvit_{variant} logits", theirs(x), expected)
        assert_close(f"timm shvit_{variant} fused logits", theirs.fuse()(x), expected)
        assert_close("timm's own file through shvit_torch.load", logits_of(shvit_torch.load(tmp_path / "timm.safetensors"), x), expected)


def logits_of(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_standin_torchvision_refuses_use():
    """The stand-in exists only to import timm: calling any of it raises, naming itself."""
    from benchmarks.standin import import_timm

    _, note = import_timm()
    if note is None:
        pytest.skip("a real torchvision loads here")
    import torchvision.transforms as T

    with pytest.raises(RuntimeError, match="stand-in"):
        T.Resize(224)


@pytest.mark.parametrize("opts", [{}, {"training": True}, {"two_d": True}, {"prefix_module": True},
                                  {"fp16": True, "two_d": True, "training": True}])
def test_authors_files_load(tmp_path, s1, opts):
    model, state = s1
    path = tmp_path / "shvit_s1.pth"
    authors_file(state, path, **opts)
    loaded = shvit_torch.load(path)
    assert loaded.config == VARIANTS["s1"]
    if opts.get("fp16"):  # the file holds float16-rounded weights: compare with exactly those
        ref = shvit_torch.create("s1")
        ref.load_state_dict({k: torch.from_numpy(v.astype(np.float16).astype(np.float32)) for k, v in state.items()}, strict=False)
        assert_close("authors fp16 logits", logits(loaded), logits(ref))
    else:
        assert_close("authors logits", logits(loaded), logits(model), atol=0, rtol=0)


def test_authors_file_takes_model_not_ema(tmp_path, s1):
    model, state = s1
    authors_file(state, tmp_path / "a.pth", training=True)  # model_ema holds state + 1
    assert torch.equal(logits(shvit_torch.load(tmp_path / "a.pth")), logits(model))


def test_config_is_inferred_for_custom_and_distilled_models(tmp_path):
    cfg = SMALL.replace(distillation=True, types=("s", "s", "s"), qk_dim=(8, 4, 16))
    model = shvit_torch.create(cfg)
    state = randomize(model, seed=12)
    authors_file(state, tmp_path / "c.pth", fp16=False)
    loaded = shvit_torch.load(tmp_path / "c.pth")
    assert loaded.config == cfg
    assert torch.equal(logits(loaded), logits(model))


def test_pickle_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"x": Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(ShvitError):
        shvit_torch.load(tmp_path / "evil.pth")
    assert not marker.exists()


def test_convert_cli_authors_to_canonical(tmp_path, s1):
    model, state = s1
    authors_file(state, tmp_path / "shvit_s1.pth", training=True, two_d=True)
    out = tmp_path / "s1.safetensors"
    assert convert.main([str(tmp_path / "shvit_s1.pth"), str(out)]) == 0  # in this process; as python -m: tests/test_bad_input.py
    w = load_weights(out)  # the numpy base reads it: no torch needed from here on
    assert w.config == VARIANTS["s1"] and w.labels[0] == "tench" and len(w.labels) == 1000
    assert torch.equal(logits(shvit_torch.load(out)), logits(model))
