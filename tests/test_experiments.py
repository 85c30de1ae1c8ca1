"""The experiments' machinery (shvit_torch.experiments), on constructed inputs with known answers:
head similarity and masking, the baselines' blocks, and MAC and memory counts against torch's
own counters. The training runs themselves are not part of the tests (``make experiments``)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import shvit_torch
from shvit_torch import experiments as E
from shvit_torch.data import Split
from shvit_torch.layers import SingleHeadAttention
from tests.helpers import assert_close, randomize


def one_hot_maps(keys: list[list[int]], n: int) -> torch.Tensor:
    """(B, heads, n, n) attention where every query of head h on image b looks at key keys[b][h]."""
    out = torch.zeros(len(keys), len(keys[0]), n, n)
    for b, row in enumerate(keys):
        for h, k in enumerate(row):
            out[b, h, :, k] = 1.0
    return out


def test_head_similarity_known_answers():
    n = 9
    same = one_hot_maps([[2, 2, 2]], n)
    assert_close("identical heads", E.head_similarity(same), torch.ones(3, 3))
    disjoint = one_hot_maps([[0, 1, 2]], n)
    assert_close("heads on different keys", E.head_similarity(disjoint), torch.eye(3))
    uniform_and_one_hot = torch.cat([torch.full((1, 1, n, n), 1 / n), one_hot_maps([[4]], n)], dim=1)
    sim = E.head_similarity(uniform_and_one_hot)
    assert abs(float(sim[0, 1]) - 1 / math.sqrt(n)) < 1e-6  # <u, o> / (|u| |o|) = (n / n) / (1 * sqrt(n))
    assert E.mean_off_diagonal(torch.tensor([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])) == pytest.approx(0.4)
    assert E.mean_off_diagonal(torch.ones(1, 1)) is None  # one head: no pair


def test_similarity_is_averaged_over_images_and_compared_across_images():
    # image 0: both heads on key 0; image 1: head 0 on key 1, head 1 on key 3 -> mean over images (1 + 0) / 2
    maps = one_hot_maps([[0, 0], [1, 3]], 4)
    assert_close("per-image average", E.head_similarity(maps), torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    # across images, head h of one image against head h' != h of the other: never the same key
    assert E.cross_image_similarity(maps) == pytest.approx(0.0)
    assert E.cross_image_similarity(one_hot_maps([[0, 0], [0, 0]], 4)) == pytest.approx(1.0)


class Toy(nn.Module):
    """Right exactly when head 0 of its attention layer is on: the input's first pixel is its label."""

    def __init__(self):
        super().__init__()
        self.attn = E.MultiHeadAttention(16, heads=2)

    def forward(self, x):
        y = x[:, 0, 0, 0].long()
        on = self.attn.head_mask[0]
        return F.one_hot(y, 4) * on + F.one_hot((y + 1) % 4, 4) * 0.5


def test_head_masking_known_answer_and_restores_the_heads():
    y = torch.arange(20) % 4
    x = torch.zeros(20, 3, 2, 2)
    x[:, 0, 0, 0] = y.float()
    model = Toy()
    result = E.head_masking(model, Split(x, y))
    assert result == {"attn": {"all": 1.0, "none": 0.0, "removed": [0.0, 1.0], "alone": [1.0, 0.0]}}
    assert model.attn.head_mask.tolist() == [1.0, 1.0]


def test_a_masked_head_is_zero_before_the_projection():
    torch.manual_seed(0)
    m = E.MultiHeadAttention(32, heads=4).eval()
    x = torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        full, _ = m.attention(x)  # (B, heads, dh, N)
        m.head_mask[2] = 0.0
        masked, _ = m.attention(x)
        expected = full.clone()
        expected[:, 2] = 0
        assert_close("head 2 masked", masked, expected)
        assert_close("forward with head 2 masked", m(x), m.proj(expected.reshape(x.shape)))


def test_one_head_over_all_channels_is_single_head_attention():
    """MultiHeadAttention with one head has SHSA's weights and math when SHSA attends to every channel."""
    torch.manual_seed(1)
    shsa = SingleHeadAttention(24, 16, 24).eval()
    for mod in shsa.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.normal_()
    mhsa = E.MultiHeadAttention(24, heads=1).eval()
    missing = mhsa.load_state_dict(shsa.state_dict(), strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 24, 4, 3)
    with torch.no_grad():
        assert_close("one-head MHSA vs SHSA(pdim = C)", mhsa(x), shsa(x))
        assert_close("attention maps", mhsa.attention(x)[1][:, 0], shsa.attention(x)[2])


def test_the_shvit_variant_is_the_librarys_shvit():
    """Net(SHVIT) has SHViT's weight names and shapes and gives its outputs (random weights and BN statistics)."""
    ref = shvit_torch.create(E.shvit_config(E.SHVIT)).eval()
    randomize(ref, 3)
    net = E.Net(E.SHVIT).eval()
    ours, theirs = net.state_dict(), ref.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    net.load_state_dict(theirs)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert_close("Net(SHVIT) vs shvit_torch.SHViT", net(x), ref(x))
        assert_close("folded", net.fuse()(x), ref(x))


@pytest.mark.parametrize("name", ["shvit", "conv4", "mhsa", "pdim-1"])  # the other pdims differ from shvit only in pdim
def test_macs_match_torchs_flop_counter(name):
    model = E.Net(E.VARIANTS[name]).eval().fuse()
    x = torch.randn(1, 3, 64, 96)  # 4x6 tokens in stage 2 of the 16x16-stem variants
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert E.count_macs(model, x) == counter.get_total_flops() // 2
    assert counter.get_total_flops() % 2 == 0


def test_memory_meter_on_a_chain_with_known_lifetimes():
    """conv -> relu -> conv: the first output dies once relu's exists, so the peak is the larger
    of (conv1 + relu) and (relu + conv2) outputs; written is all three; weights and input not counted."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    o1, o2, o3 = 8 * 256 * 4, 8 * 256 * 4, 4 * 256 * 4
    assert E.activation_memory(chain, x) == {"peak_bytes": max(o1 + o2, o2 + o3), "written_bytes": o1 + o2 + o3}


@pytest.mark.parametrize("name", ["shvit", "conv4", "mhsa"])
def test_memory_against_forward_hooks(name):
    """Every layer's output and its input (both alive while it runs) fit under the measured peak,
    and every layer output (distinct storages, from hooks) is counted in the bytes written."""
    model = E.Net(E.VARIANTS[name]).eval().fuse()
    x = torch.randn(1, 3, 64, 64)
    seen, pairs = {}, []

    def hook(m, inputs, out):
        for t in (*inputs, out):
            if t.data_ptr() != x.data_ptr():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        pairs.append(sum(t.untyped_storage().nbytes() for t in {*inputs, out} if t.data_ptr() != x.data_ptr()))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    mem = E.activation_memory(model, x)
    for h in handles:
        h.remove()
    assert max(pairs) <= mem["peak_bytes"] <= mem["written_bytes"]
    assert sum(seen.values()) <= mem["written_bytes"]
    assert mem["written_bytes"] < 4 * sum(seen.values())  # the rest: attention's maps, adds, splits


def test_conclusions_follow_the_numbers():
    def row(accs, macs, peak, written, ms, per_s):
        return {"test_acc": E.summarize(accs), "macs": macs, "peak_bytes": peak, "written_bytes": written, "params": 1,
                "latency_ms": {"median": ms}, "images_per_s": {"batch": 32, "median": per_s}, "label": "x"}

    good = E.conclude("macro", {"shvit": row([0.80, 0.82], 4, 1, 10, 2.0, 300), "conv4": row([0.81, 0.83], 6, 5, 50, 3.0, 100)})
    assert [c["verdict"] for c in good] == ["supports"] * 3
    bad = E.conclude("macro", {"shvit": row([0.60, 0.61], 4, 6, 10, 2.0, 100), "conv4": row([0.81, 0.83], 6, 5, 50, 1.0, 100)})
    assert [c["verdict"] for c in bad] == ["does not show at this scale"] * 3
    assert "0.605 vs 0.820" in bad[0]["evidence"]


def test_cli_lists_and_rejects_unknown_names(capsys):
    assert E.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in E.EXPERIMENTS) and "conv4" in out
    with pytest.raises(SystemExit) as e:
        E.main(["macros"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'macros'" in err and "macro, heads, partial" in err


def test_variants_are_what_the_experiments_say():
    shvit, conv4 = E.VARIANTS["shvit"], E.VARIANTS["conv4"]
    assert (shvit.stride, len(shvit.dims), conv4.stride, len(conv4.dims)) == (16, 3, 4, 4)
    assert conv4.kinds == ("i", "i", "s", "s")  # depthwise conv early, attention late (paper Fig. 2)
    ratios = [E.VARIANTS[v].pdim[2] / E.DIMS[2] for v in ("pdim-1/8", "shvit", "pdim-1/2", "pdim-1")]
    assert ratios == pytest.approx([1 / 8, 1 / 4.67, 1 / 2, 1], abs=0.01)
    assert SimpleNamespace(**E.VARIANTS["mhsa"].__dict__).heads[1:] == (4, 6)


def test_the_demo_times_only_shapes_it_has_already_run():
    """make demo's speed column: every batch shape (a last, smaller batch has its own, and tinygrad
    compiles each shape on its first call) runs once before the clock starts."""
    import numpy as np

    from shvit_torch.demo import timed

    calls = []

    def fn(x):
        calls.append(len(x))
        return x[:, :2, 0, 0] * 2

    x = np.random.default_rng(0).normal(size=(250, 3, 2, 2)).astype(np.float32)
    out, speed, first = timed(fn, x, batch=100)
    assert calls[:2] == [50, 100] and set(calls[2:]) <= set(calls[:2])  # warm-up, then only warmed shapes
    assert calls[2:] == [100, 100, 50] and speed > 0 and first >= 0
    np.testing.assert_array_equal(out, x[:, :2, 0, 0] * 2)
