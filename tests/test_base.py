"""The dependency-free base: config, name mapping, preprocessing, and the shared CLI."""
import numpy as np
import pytest
import torch

import shvit_torch
from shvit_numpy.config import VARIANTS, SHViTConfig, get_config, make_divisible, se_channels
from shvit_numpy.errors import ShvitError
from shvit_numpy.labels import class_names, imagenet_classes
from shvit_numpy.names import infer_config, state_shapes, to_canonical
from shvit_numpy.preprocess import MEAN, STD, load_image
from tests.helpers import randomize

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7)


def test_make_divisible_matches_the_spec():
    assert se_channels(4 * 308) == 312  # s2's PatchMerging: 1232 / 4 = 308 -> 312
    assert se_channels(4 * 128) == 128 and make_divisible(3, 8) == 8 and make_divisible(12, 8) == 16


def test_config_json_round_trip_and_variants():
    for cfg in [*VARIANTS.values(), SMALL.replace(distillation=True)]:
        assert SHViTConfig.from_json(cfg.to_json()) == cfg
    assert get_config("shvit_s2") == VARIANTS["s2"] and get_config({"depth": [1, 1, 1]}).depth == (1, 1, 1)


@pytest.mark.parametrize("fields,match", [
    ({"embed_dim": (4, 8, 8)}, "embed_dim\\[0\\] must be >= 8"), ({"partial_dim": (4, 30, 12)}, "partial_dim\\[1\\]"),
    ({"types": ("i", "x", "s")}, "types\\[1\\]"), ({"depth": (1, -1, 1)}, "depth"), ({"num_classes": 0}, "num_classes"),
    ({"qk_dim": (16, 16)}, "3 entries"),
])
def test_invalid_configs_name_the_field(fields, match):
    with pytest.raises(ShvitError, match=match):
        SMALL.replace(**fields)


@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(depth=(0, 0, 3)), SMALL.replace(types=("s", "i", "s"), depth=(2, 1, 0))])
def test_config_inferred_from_shapes(cfg):
    inferred = infer_config(state_shapes(cfg))
    assert state_shapes(inferred) == state_shapes(cfg)
    assert inferred.depth == cfg.depth and inferred.embed_dim == cfg.embed_dim


def test_to_canonical_reshapes_2d_kernels_and_casts():
    state = {k: np.ones(s, np.float16) for k, s in state_shapes(SMALL).items()}
    state["stages.1.blocks.0.mixer.m.qkv.c.weight"] = np.ones((2 * 16 + 8, 8), np.float16)
    state["stages.1.downsample.2.se.fc1.weight"] = state["stages.1.downsample.2.se.fc1.weight"][:, :, 0, 0]
    out = to_canonical(state)
    assert out["stages.1.blocks.0.mixer.m.qkv.c.weight"].shape == (40, 8, 1, 1)
    assert out["stages.1.downsample.2.se.fc1.weight"].ndim == 4
    assert all(v.dtype == np.float32 for v in out.values())


def test_imagenet_labels():
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden retriever" and names[999] == "toilet tissue"
    assert class_names(10) == [str(i) for i in range(10)] and class_names(3, ["a", "b", "c"]) == ["a", "b", "c"]


def test_preprocessing_crops_and_normalises(tmp_path):
    from PIL import Image

    Image.new("RGB", (300, 200), (255, 0, 128)).save(tmp_path / "flat.png")
    x = load_image(tmp_path / "flat.png", 224)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    expected = (np.array([255, 0, 128]) / 255 - MEAN) / STD
    np.testing.assert_allclose(x.reshape(3, -1).mean(1), expected, atol=1e-5)
    img = np.zeros((40, 100, 3), np.uint8)
    img[:, 50:] = 255  # left half black, right half white: the centre crop keeps the boundary in the middle
    Image.fromarray(img).save(tmp_path / "half.png")
    x = load_image(tmp_path / "half.png", 32)
    assert x[0, :, :12].max() < 0 < x[0, :, 20:].min()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "small.safetensors"
    model = shvit_torch.create(SMALL)
    randomize(model, seed=1)
    shvit_torch.save(model, path, labels=list("abcdefg"), resolution=40)
    return path, model.eval()


def test_cli_image_and_labels_from_file(weights, tmp_path, capsys):
    """The shared CLI (here shvit_torch.run's, in this process) takes the file's resolution and labels.
    Its input errors: tests/test_bad_input.py."""
    path, model = weights
    import sklearn

    from shvit_torch import run

    china = f"{sklearn.__path__[0]}/datasets/images/china.jpg"
    assert run.main(["--weights", str(path), "--image", china, "--topk", "2", "--save-logits", str(tmp_path / "y.npy")]) == 0
    out = capsys.readouterr().out
    x = load_image(china, 40)[None]  # the file's resolution
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-4, atol=1e-4)
    top = "abcdefg"[int(ref[0].argmax())]
    assert out.startswith(f"china.jpg: {top} (")
