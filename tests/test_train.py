"""The training program: it learns, writes files all three runtimes load, fine-tunes from the
authors' format, distils, runs under torchrun, survives a kill, stops on a non-finite loss, and
rejects bad data folders with one line.

Runs are tiny (32x32 digits, a few hundred images, one torch thread) and mostly in-process;
subprocesses only where the process itself is under test (a kill, torchrun, the CLI's exit).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shvit_numpy
import shvit_torch
from shvit_numpy.names import state_shapes
from shvit_torch import data, train
from tests.helpers import assert_close, authors_file, random_state

pytestmark = pytest.mark.xdist_group("train")
SMALL = train.DIGITS_CONFIG.replace(embed_dim=(16, 32, 48), partial_dim=(4, 8, 12), depth=(1, 1, 1))
QUICK = ["--resolution", "32", "--batch-size", "32", "--threads", "1", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """Two test workers share two cores: one torch thread each (two would mostly wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(*args) -> int:
    """The training program in this process; returns its exit status."""
    return train.main([str(a) for a in args])


def run_process(*args, env=None, prog=("-m", "shvit_torch.train")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prog, *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=300)


def error_line(stderr: str) -> str:
    """The program's error: exactly one line, and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


# ---- the pieces --------------------------------------------------------------------------------

def test_overfits_one_fixed_batch():
    torch.manual_seed(0)
    split = data.digits(32).train
    x, y = split.x[:16], split.y[:16]
    model = shvit_torch.create(SMALL).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    step = train.Step(model, model, opt, torch.device("cpu"), clip_grad=1.0)
    losses = [train.train_step(step, x, F.one_hot(y, 10).float())[0] for _ in range(60)]
    assert losses[0] > 1.5 and losses[-1] < 0.05, losses[::10]


def test_non_finite_loss_raises_before_the_weights_change():
    model = shvit_torch.create(SMALL).train()
    step = train.Step(model, model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    x = torch.zeros(4, 3, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(train.TrainingError, match="loss became nan"):
        train.train_step(step, x, F.one_hot(torch.arange(4), 10).float())
    after = model.state_dict()
    for k in ("patch_embed.0.c.weight", "head.l.weight"):
        assert torch.equal(after[k], before[k]), k


def test_augmentation_without_warps_is_the_identity_and_flips_mirror():
    x = data.digits(32).test.x[:6]
    still = dict(degrees=0.0, translate=0.0, scale=(1.0, 1.0))
    assert_close("no warp", data.augment(x, torch.Generator().manual_seed(0), **still), x, atol=1e-5)
    flipped = data.augment(x, torch.Generator().manual_seed(1), flip=True, **still)
    mirrored = [bool(torch.allclose(f, im.flip(-1), atol=1e-5)) for f, im in zip(flipped, x)]
    kept = [bool(torch.allclose(f, im, atol=1e-5)) for f, im in zip(flipped, x)]
    assert all(m != k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_mixup_and_cutmix_targets_weigh_the_images_as_mixed():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    mixed, target = data.mix(x, y, 8, 0.8, 0.0, torch.Generator().manual_seed(2))  # mixup: a blend, weighted as its target
    assert_close("mixup targets sum to one", target.sum(1), torch.ones(8))
    assert_close("mixup images", mixed, torch.einsum("ij,jchw->ichw", target, x), atol=1e-5)
    mixed, target = data.mix(x, y, 8, 0.0, 1.0, torch.Generator().manual_seed(3))  # cutmix: a pasted box
    assert_close("cutmix targets sum to one", target.sum(1), torch.ones(8))
    own = (mixed == x).all(1).flatten(1).float().mean(1)  # the share of each image's own pixels
    assert_close("cutmix: own pixels = own target", own, target.diagonal(), atol=1e-6)
    assert (own < 1).any()  # a box was pasted (an image drawn as its own partner keeps all its pixels)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [train.lr_factor(i, 100, 10, 2e-3, 1e-5) for i in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(f[10:], f[11:])) and f[100] == pytest.approx(1e-5 / 2e-3)


# ---- whole runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    assert run("--out", out, "--epochs", "4", "--limit", "400", "--warmup-epochs", "0.5", *QUICK) == 0
    return out


def test_short_run_learns_and_writes_everything(short_run):
    metrics = json.loads((short_run / "metrics.json").read_text())
    history = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert metrics["test_acc"] > 0.6 and history[-1]["train_loss"] < history[0]["train_loss"] - 0.5  # chance is 0.1
    assert (short_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = torch.load(short_run / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 4 and {"model", "optimizer", "scheduler"} <= set(ck)
    # the file holds the model that was evaluated: its accuracy, recomputed here, is the reported one
    model = shvit_torch.load(short_run / "model.safetensors")
    test = data.digits(32).test
    with torch.no_grad():
        acc = float((model(test.x[:400]).argmax(1) == test.y[:400]).float().mean())
    assert acc == pytest.approx(metrics["test_acc"], abs=1.01 / 400)  # batching may flip a near tie
    assert model.labels == [str(i) for i in range(10)] and model.resolution == 32


def test_trained_weights_give_torchs_logits_in_numpy(short_run):
    path = short_run / "model.safetensors"  # tinygrad: see the torchrun test (one tinygrad compile is enough)
    x = data.digits(32).test.x[:8].numpy()
    with torch.no_grad():
        ref = shvit_torch.load(path)(torch.from_numpy(x)).numpy()
    assert_close("numpy", shvit_numpy.load(path)(x), ref)


def digit_folders(root: Path, labels: dict[str, int], n_train: int = 12, n_val: int = 4) -> Path:
    """An ImageFolder tree of rendered digits: root/{train,val}/<name>/*.png."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for name, digit in labels.items():
        images = d.images[d.target == digit]
        for split, chosen in (("train", images[:n_train]), ("val", images[n_train:n_train + n_val])):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, pixels in enumerate(chosen):
                data.render_digit(pixels).save(root / split / name / f"{i}.png")
    return root


def test_fine_tune_from_the_authors_format_with_other_classes(tmp_path, capsys):
    cfg = SMALL.replace(num_classes=7)
    state = random_state(state_shapes(cfg), 3)
    authors_file(state, tmp_path / "shvit_authors.pth", training=True, two_d=True, fp16=True)
    folders = digit_folders(tmp_path / "d", {"one": 1, "seven": 7, "zero": 0})
    assert run("--out", tmp_path / "ft", "--data", folders, "--epochs", "1", "--init-from", tmp_path / "shvit_authors.pth",
               *QUICK, "--batch-size", "12", "--lr", "1e-9", "--min-lr", "0", "--weight-decay", "0") == 0
    assert f"initialised {len(state) - 2}/{len(state)} tensors" in capsys.readouterr().err  # all but the 7-class head
    tuned = shvit_torch.load(tmp_path / "ft" / "model.safetensors")
    assert tuned.config == cfg.replace(num_classes=3) and tuned.labels == ["one", "seven", "zero"]
    name = "stages.1.blocks.0.mixer.m.qkv.c.weight"  # came from the file (an lr of 1e-9 barely moves it)
    assert_close(name, tuned.state_dict()[name], state[name].astype(np.float16).astype(np.float32), atol=1e-6)


def test_distillation_and_ema(short_run, tmp_path):
    out = tmp_path / "student"
    assert run("--out", out, "--teacher", short_run / "model.safetensors", "--ema", "0.5", "--epochs", "1", "--limit", "64",
               *QUICK) == 0
    path = out / "model.safetensors"
    student = shvit_torch.load(path)
    assert student.config.distillation  # the second head, trained on the teacher's labels
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    name = "stages.0.blocks.0.conv.m.c.weight"  # the saved weights are the moving average, not the last step's
    assert torch.equal(student.state_dict()[name], ck["ema"]["module." + name])
    assert not torch.equal(student.state_dict()[name], ck["model"][name])
    x = data.digits(32).test.x[:4]
    with torch.no_grad():
        ref = student(x).numpy()  # eval mode: the mean of both heads
    assert_close("numpy, distilled", shvit_numpy.load(path)(x.numpy()), ref)


@pytest.mark.slow  # three processes that each import torch, and gloo's rendezvous
def test_torchrun_two_processes(tmp_path):
    """Two ranks, one step each: the shards' counts are summed and the file is the model every
    runtime loads (numpy gives torch's logits; tinygrad holds exactly the file's tensors, and its
    logits equal torch's for any weights: tests/test_tiny.py, tests/test_equivalence.py)."""
    import shvit_tiny

    r = run_process("--nproc_per_node", "2", "-m", "shvit_torch.train", "--out", tmp_path, "--epochs", "1", "--limit", "64",
                    *QUICK, prog=("-m", "torch.distributed.run"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    history = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert metrics["world_size"] == 2 and history["train_images"] == 64  # two shards of 32, counts summed
    path = tmp_path / "model.safetensors"
    x = data.digits(32).test.x[:8].numpy()
    with torch.no_grad():
        ref = shvit_torch.load(path)(torch.from_numpy(x)).numpy()
    assert_close("numpy after DDP", shvit_numpy.load(path)(x), ref)
    state = shvit_numpy.load_weights(path).state
    tiny_state = shvit_tiny.load(path, device="CPU", fold=False).state_dict()
    assert list(tiny_state) == list(state) and all(np.array_equal(np.asarray(tiny_state[k]), state[k]) for k in state)


def test_kill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    args = ["--epochs", "2", "--limit", "96", *QUICK]  # 3 steps per epoch
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    r = run_process("--out", broken, *args, env={train.KILL_ENV: "5"})  # dies in epoch 2, after its 2nd step
    assert r.returncode == 137 and not (broken / "model.safetensors").exists(), r.stderr
    saved = torch.load(broken / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1  # the last complete epoch
    assert not list(broken.glob(".*.tmp"))  # no half-written file left behind
    assert run("--out", whole, *args) == 0
    assert run("--out", broken, *args, "--resume") == 0
    assert "resumed after epoch 1" in capsys.readouterr().err
    resumed, uninterrupted = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (broken, whole))
    assert resumed[0] == saved["history"][0]
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in resumed] == \
        [{k: v for k, v in h.items() if k not in timing} for h in uninterrupted]
    a = shvit_numpy.load_weights(whole / "model.safetensors").state
    b = shvit_numpy.load_weights(broken / "model.safetensors").state
    assert all(np.array_equal(a[k], b[k]) for k in a), "the resumed run diverged from the uninterrupted one"


def test_a_run_that_diverges_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    args = ["--out", tmp_path, "--limit", "64", *QUICK]
    assert run(*args, "--epochs", "1") == 0
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for group in ck["optimizer"]["param_groups"]:  # as if the run had been started with a learning rate far too high
        group["lr"] = 1e12
    ck["scheduler"]["base_lrs"] = [1e12] * len(ck["scheduler"]["base_lrs"])
    torch.save(ck, tmp_path / "checkpoint.pt")
    good = (tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert run(*args, "--epochs", "3", "--resume", "--clip-grad", "0") == 1
    line = error_line(capsys.readouterr().err)
    assert "became" in line and "epoch 2" in line and "epoch 1) is kept" in line, line
    assert ((tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "model.safetensors").read_bytes()) == good


def test_bad_data_and_resume_give_one_line_and_exit_2(tmp_path, capsys):
    r = run_process("--out", tmp_path / "o", "--data", tmp_path / "nope")
    assert r.returncode == 2 and "no such directory" in error_line(r.stderr), r.stderr
    folders = digit_folders(tmp_path / "d", {"one": 1, "two": 2}, n_train=2, n_val=1)
    for image in (folders / "val" / "two").iterdir():
        image.unlink()
    cases = [
        (["--data", folders], "val/two holds no images"),
        (["--data", folders / "train" / "one" / "0.png"], "not a directory"),
        (["--resume"], "no checkpoint"),
    ]
    for extra, expected in cases:
        capsys.readouterr()
        assert run("--out", tmp_path / "o", *extra, *QUICK) == 2, extra
        assert expected in error_line(capsys.readouterr().err), extra
    (folders / "val" / "two").rmdir()
    (folders / "val" / "one").rename(folders / "val" / "uno")
    assert run("--out", tmp_path / "o", "--data", folders, *QUICK) == 2
    assert "lacks class folder 'one'" in error_line(capsys.readouterr().err)
