"""The PyTorch model against the spec: names, shapes, parameter and MAC counts, folding, API."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import shvit_torch
from shvit_numpy.config import RESOLUTION, VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_numpy.names import authors_to_canonical, canonical_to_authors, infer_config, state_shapes
from tests.helpers import assert_close, randomize

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), types=("i", "s", "s"), num_classes=7)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_names_and_shapes_match_spec(variant):
    model = shvit_torch.create(variant)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sd == state_shapes(model.config)
    assert list(sd) == list(state_shapes(model.config))  # same order too
    assert infer_config(sd) == model.config


def test_canonical_names_are_timms_and_authors_names_follow_the_spec():
    names = set(state_shapes(VARIANTS["s1"]))
    for k in ["patch_embed.0.c.weight", "patch_embed.6.bn.running_var", "stages.0.blocks.1.ffn.m.pw2.bn.weight",
              "stages.1.downsample.2.se.fc1.weight", "stages.1.blocks.0.mixer.m.qkv.c.weight",
              "stages.2.blocks.4.mixer.m.proj.1.c.weight", "stages.2.downsample.4.m.pw1.c.weight", "head.l.bias"]:
        assert k in names, k
    authors = {canonical_to_authors(k) for k in names}
    for k in ["blocks1.1.conv.m.c.weight", "blocks2.0.0.m.c.weight", "blocks2.0.1.m.pw1.bn.weight",
              "blocks2.1.conv1.c.weight", "blocks2.1.se.fc2.bias", "blocks2.2.0.m.bn.weight", "blocks2.2.1.m.pw2.c.weight",
              "blocks2.3.mixer.m.pre_norm.weight", "blocks3.7.mixer.m.proj.1.c.weight", "blocks3.1.conv3.bn.bias"]:
        assert k in authors, k
    assert {authors_to_canonical(k) for k in authors} == names


@pytest.mark.parametrize("variant,params,folded", [("s1", 6_330_808, 6_308_660), ("s2", 11_483_072, None)])
def test_parameter_counts(variant, params, folded):
    model = shvit_torch.create(variant)
    assert sum(p.numel() for p in model.parameters()) == params
    if folded is not None:
        assert sum(p.numel() for p in model.fuse().parameters()) == folded


@pytest.mark.parametrize("variant,paper_macs", [("s1", 241e6), ("s2", 366e6), ("s3", 601e6), ("s4", 986e6)])
def test_macs_match_paper(variant, paper_macs):
    """torch's own flop counter (2 FLOPs per multiply-accumulate) on the folded model."""
    model = shvit_torch.create(variant).eval().fuse()
    r = RESOLUTION[variant]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, r, r))
    macs = counter.get_total_flops() / 2
    assert abs(macs - paper_macs) / paper_macs < 0.005, f"{variant}: {macs / 1e6:.2f}M MACs vs paper {paper_macs / 1e6:.0f}M"


@pytest.mark.parametrize("cfg,shape", [(VARIANTS["s1"], (2, 3, 97, 131)), (SMALL, (3, 3, 33, 18)),
                                       (SMALL.replace(distillation=True), (2, 3, 64, 64))])
def test_fuse_equals_eval_model(cfg, shape):
    model = shvit_torch.create(cfg).eval()
    randomize(model, seed=3)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    fused = model.fuse()
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)) for m in fused.modules())
    with torch.no_grad():
        assert_close("fused logits", fused(x), model(x))
        assert_close("fused features", fused.forward_features(x), model.forward_features(x))


def test_fuse_is_a_copy_and_changes_logits_if_bn_stats_are_wrong():
    """Guard on the test above: random BN statistics matter, so folding them wrongly would show."""
    model = shvit_torch.create(SMALL).eval()
    randomize(model, seed=4)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ref = model(x)
        fused = model.fuse()
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched
        model.stages[1].blocks[0].mixer.m.qkv.bn.running_var.mul_(4)
        assert not torch.allclose(model(x), ref, atol=1e-3)
        assert_close("fused after editing the original", fused(x), ref)


def test_forward_intermediates_strides_and_ceil_sizes():
    model = shvit_torch.create(SMALL).eval()
    feats = model.forward_intermediates(torch.randn(1, 3, 97, 50))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 7, 4), (1, 24, 4, 2), (1, 40, 2, 1)]


def test_training_mode_distillation_returns_both_heads_and_eval_their_mean():
    model = shvit_torch.create(SMALL, distillation=True)
    randomize(model, seed=5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    y, y_dist = model(x)
    assert y.shape == y_dist.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert_close("eval distilled", model(x), (model.head(feats) + model.head_dist(feats)) / 2)


def test_stochastic_depth_only_in_training():
    model = shvit_torch.create(SMALL, drop_path_rate=0.5)
    randomize(model, seed=6)
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # branches dropped at random per sample
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_reset_classifier():
    model = shvit_torch.create("s1")
    model.reset_classifier(10)
    assert model.config.num_classes == 10 and model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert state_shapes(model.config)["head.l.weight"] == (10, 320)


def test_train_mode_batchnorm_uses_batch_statistics():
    model = shvit_torch.create(SMALL)
    randomize(model, seed=7)
    before = model.patch_embed[0].bn.running_mean.clone()
    model.train()(torch.randn(4, 3, 32, 32))
    assert not torch.equal(before, model.patch_embed[0].bn.running_mean)


def test_bad_config_raises_library_error():
    with pytest.raises(ShvitError, match="partial_dim"):
        shvit_torch.create(SMALL.replace(partial_dim=(4, 30, 12)))
    with pytest.raises(ShvitError, match="unknown variant"):
        shvit_torch.create("s9")
