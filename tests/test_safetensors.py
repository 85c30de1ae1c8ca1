"""The numpy-only safetensors reader and writer (shvit_numpy.weights) against the ``safetensors``
package on the same files, and the NumPy model on float32, float16, bfloat16 and timm files.

Values read back must be bit-identical (np.array_equal); logits use TOL["float32"].
"""
import json
import struct

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import shvit_numpy
import shvit_torch
from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_numpy.weights import load_weights, read_safetensors, write_safetensors
from tests.helpers import assert_close, randomize

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 1, 1), num_classes=5)
RNG = np.random.default_rng(5)


def tensors_of(dtype: torch.dtype) -> dict:
    return {"a.weight": torch.from_numpy(RNG.standard_normal((3, 5, 1, 1)).astype(np.float32)).to(dtype),
            "b": torch.arange(7, dtype=torch.int64), "c.bias": torch.zeros(0, dtype=dtype),
            "d": torch.tensor(2.5, dtype=dtype), "e.mask": torch.tensor([True, False]),
            "f": torch.arange(6, dtype=torch.uint8).reshape(2, 3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_reader_matches_the_package(dtype, tmp_path):
    tensors = tensors_of(dtype)
    safetensors.torch.save_file(tensors, tmp_path / "t.safetensors", metadata={"k": "v", "shvit_note": "é"})
    ours, meta = read_safetensors(tmp_path / "t.safetensors")
    assert meta == {"k": "v", "shvit_note": "é"} and set(ours) == set(tensors)
    for k, t in tensors.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()  # bf16 widens exactly to float32
        assert ours[k].shape == tuple(t.shape) and ours[k].dtype == want.dtype, k
        assert np.array_equal(ours[k], want), k


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8, np.bool_])
def test_package_reads_what_we_write(dtype, tmp_path):
    arrays = {"x": RNG.standard_normal((4, 3)).astype(dtype), "y.z": np.zeros((2, 0), dtype), "v": np.ones(5, dtype)}
    write_safetensors(tmp_path / "o.safetensors", arrays, {"x": "1"})
    back = safetensors.numpy.load_file(tmp_path / "o.safetensors")
    assert set(back) == set(arrays) and all(np.array_equal(back[k], arrays[k]) and back[k].dtype == arrays[k].dtype for k in arrays)
    with safetensors.safe_open(tmp_path / "o.safetensors", "np") as f:
        assert f.metadata() == {"x": "1"}
    raw = (tmp_path / "o.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"x": "1"}  # data 8-byte aligned


def header_file(path, header: dict, body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)


@pytest.mark.parametrize("header,body,match", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "holds 2 values"),
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype C64"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed"),
    ([1, 2], b"", "not a JSON object"),
])
def test_malformed_headers_raise_library_error(header, body, match, tmp_path):
    header_file(tmp_path / "bad.safetensors", header, body)
    with pytest.raises(ShvitError, match=match):
        read_safetensors(tmp_path / "bad.safetensors")


def test_header_length_beyond_the_file(tmp_path):
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    with pytest.raises(ShvitError, match="header length"):
        read_safetensors(tmp_path / "h.safetensors")


# ---- weight files into the NumPy model -----------------------------------------------------------

def reference(tmp_path, seed=0):
    model = shvit_torch.create(SMALL).eval()
    randomize(model, seed)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load(dtype, tmp_path):
    """A timm-style file (state-dict names, no metadata, num_batches_tracked included) in 16 bits: the
    model is the one whose weights are those 16-bit values, widened exactly to float32."""
    model = reference(tmp_path, seed=6)
    half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    safetensors.torch.save_file(half, tmp_path / "h.safetensors")
    ref = shvit_torch.create(SMALL).eval()
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    x = np.random.default_rng(4).standard_normal((2, 3, 40, 33)).astype(np.float32)
    w = load_weights(tmp_path / "h.safetensors")
    assert w.config == SMALL and all(a.dtype == np.float32 for a in w.state.values())
    for fold in (True, False):
        assert_close(f"{dtype} file, fold={fold}", shvit_numpy.load(tmp_path / "h.safetensors", fold=fold)(x), logits(ref, x))


def test_canonical_file_carries_labels_and_resolution(tmp_path):
    model = reference(tmp_path, seed=7)
    shvit_torch.save(model, tmp_path / "m.safetensors", labels=list("vwxyz"), resolution=96)
    m = shvit_numpy.load(tmp_path / "m.safetensors")
    assert (m.config, m.labels, m.resolution) == (SMALL, list("vwxyz"), 96)
    x = np.random.default_rng(5).standard_normal((1, 3, 96, 96)).astype(np.float32)
    assert_close("canonical file", m(x), logits(model, x))


def test_legacy_torch_pickles_are_refused_with_a_hint(tmp_path):
    """Zip .pth files load without torch (tests/test_pth.py); the pre-1.6 pickle format does not."""
    (tmp_path / "m.pth").write_bytes(b"\x80\x02")
    with pytest.raises(ShvitError, match="legacy .non-zip. torch pickle.*python -m shvit_torch.convert"):
        shvit_numpy.load(tmp_path / "m.pth")


def test_torch_reader_takes_a_safetensors_file_whose_length_looks_like_a_pickle(tmp_path):
    """A header of 640 bytes is stored as 80 02 00 ..., a pickle's first two bytes: still safetensors."""
    import shvit_torch
    from shvit_numpy.pth import looks_like_torch

    model = shvit_torch.create(SHViTConfig(embed_dim=(8, 8, 8), partial_dim=(4, 4, 4), depth=(1, 1, 1), num_classes=3)).eval()
    path = tmp_path / "m.safetensors"
    shvit_torch.save(model, path)
    state, meta = read_safetensors(path)
    base = struct.unpack("<Q", path.read_bytes()[:8])[0]
    target = 640 + 65536 * ((base + 65535) // 65536)  # stored as 80 02 xx 00 ...
    for extra in range(target - base - 16, target - base + 16):  # the writer pads the header to 8 bytes
        write_safetensors(path, state, {**meta, "pad": "x" * extra})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02", "could not make a 640-byte header"
    assert not looks_like_torch(path)  # the one test, shared by shvit_torch.load and shvit_numpy
    assert shvit_torch.load(path).config == model.config
