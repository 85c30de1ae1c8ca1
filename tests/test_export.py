"""shvit_torch.export: the folded model as ONNX, run by ONNX Runtime, against the torch logits.

Random weights and random BatchNorm statistics (``randomize``), so a folding or export bug
shows in the logits; dynamic batch, height and width are exercised at sizes other than the
traced one; the CLI's bad flags and bad files end as one line and exit status 2.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

import shvit_torch
from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_torch.export import INPUT, OUTPUT, export_onnx, main
from tests.helpers import assert_close, random_model_file, randomize

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), types=("i", "s", "s"), num_classes=7)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_logits(sess, x):
    return sess.run([OUTPUT], {INPUT: x})[0]


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def batch(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random model, its canonical weight file, and its ONNX export (dynamic axes)."""
    d = tmp_path_factory.mktemp("export")
    model = random_model_file(SMALL, 11, d / "small.safetensors")
    export_onnx(model, d / "small.onnx", resolution=64)
    return model, d


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 64, 64), (5, 3, 45, 38), (3, 3, 17, 96)])
def test_ort_reproduces_torch_at_any_batch_and_size(small, shape):
    """Traced at (2, 3, 64, 64); batch, height and width are free axes of the file."""
    model, d = small
    x = batch(shape, seed=sum(shape))
    assert_close(f"ORT logits {shape}", ort_logits(session(d / "small.onnx"), x), torch_logits(model, x), dtype=np.float32)


def test_graph_is_folded_and_axes_are_dynamic(small):
    model, d = small
    graph = onnx.load(str(d / "small.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops and "Softmax" in ops
    dims = [dim.dim_param or dim.dim_value for dim in graph.input[0].type.tensor_type.shape.dim]
    assert [graph.input[0].name, graph.output[0].name] == [INPUT, OUTPUT]
    assert dims == ["batch", 3, "height", "width"]
    assert not model.fused and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_s1_at_224_and_distilled_model(tmp_path):
    """The real S1 (1000 classes) and a distilled model (the mean of both heads)."""
    for name, cfg, res, seed in [("s1", "s1", 224, 12), ("distilled", SMALL.replace(distillation=True), 48, 13)]:
        model = shvit_torch.create(cfg).eval()
        randomize(model, seed=seed)
        export_onnx(model, tmp_path / f"{name}.onnx", resolution=res)
        x = batch((2, 3, res, res), seed=seed)
        assert_close(f"{name} ORT logits", ort_logits(session(tmp_path / f"{name}.onnx"), x), torch_logits(model, x))


def test_static_export_rejects_other_shapes(small, tmp_path):
    model, _ = small
    export_onnx(model, tmp_path / "static.onnx", resolution=32, dynamic=False)
    sess = session(tmp_path / "static.onnx")
    x = batch((2, 3, 32, 32))
    assert_close("static ORT logits", ort_logits(sess, x), torch_logits(model, x))
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        ort_logits(sess, batch((2, 3, 40, 32)))


def test_api_rejects_bad_opset_and_leaves_no_file(small, tmp_path):
    model, _ = small
    with pytest.raises(ShvitError, match="opset 9"):
        export_onnx(model, tmp_path / "m.onnx", opset=9)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_verified_file(small, tmp_path, capsys):
    model, d = small
    out = tmp_path / "cli.onnx"
    assert main(["--format", "onnx", "--weights", str(d / "small.safetensors"), "--out", str(out), "--opset", "18"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "opset 18" in text and "reproduces the torch logits" in text
    assert onnx.load(str(out)).opset_import[0].version == 18
    x = batch((3, 3, 50, 70), seed=5)
    assert_close("CLI export ORT logits", ort_logits(session(out), x), torch_logits(model, x))


@pytest.fixture(scope="module")
def truncated(small, tmp_path_factory):
    _, d = small
    path = tmp_path_factory.mktemp("bad") / "cut.safetensors"
    path.write_bytes((d / "small.safetensors").read_bytes()[:500])
    return path


@pytest.mark.parametrize("args,match", [
    (["--format", "tflite"], "invalid choice: 'tflite'"),
    (["--format", "onnx", "--out", "{out}"], "--weights"),
    (["--format", "onnx", "--weights", "{w}"], "--out"),
    (["--format", "onnx", "--weights", "/nonexistent/w.safetensors", "--out", "{out}"], "weight file not found"),
    (["--format", "onnx", "--weights", "{cut}", "--out", "{out}"], "truncated"),
    (["--format", "onnx", "--weights", "{w}", "--out", "{dir}/model.txt"], "must end in .onnx"),
    (["--format", "onnx", "--weights", "{w}", "--out", "{out}", "--opset", "9"], "opset 9 is not supported"),
    (["--format", "onnx", "--weights", "{w}", "--out", "{out}", "--opset", "x"], "invalid int value"),
    (["--format", "onnx", "--weights", "{w}", "--out", "{out}", "--resolution", "0"], "--resolution must be >= 1"),
])
def test_cli_bad_flags_and_files_one_line_exit_2(small, truncated, tmp_path, capsys, args, match):
    _, d = small
    subst = {"{w}": str(d / "small.safetensors"), "{cut}": str(truncated), "{out}": str(tmp_path / "m.onnx"), "{dir}": str(tmp_path)}
    argv = [subst.get(a, a.replace("{dir}", str(tmp_path))) for a in args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and match in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file


def test_module_entry_point_fails_cleanly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "shvit_torch.export", "--format", "onnx", "--weights", str(tmp_path / "none.safetensors"),
                        "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"python -m shvit_torch.export: error: weight file not found: {tmp_path / 'none.safetensors'}"], r.stderr
