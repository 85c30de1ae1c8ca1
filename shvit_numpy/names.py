"""Weight names: the one list all three runtimes load by, and the mapping of foreign formats.

The canonical names are timm's state-dict names (``patch_embed.0.c.weight``,
``stages.1.blocks.0.mixer.m.qkv.c.weight``), so timm's files load without mapping. The
authors' release files use other names for the same tensors; ``authors_to_canonical`` is the
one place that maps them. Everything here works on plain arrays (anything with ``.shape``)
and imports only numpy.
"""
from __future__ import annotations

import re

import numpy as np

from .config import VARIANTS, SHViTConfig, se_channels
from .errors import ShvitError

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _conv_bn(prefix: str, cin: int, cout: int, k: int = 1, groups: int = 1) -> dict:
    """A convolution without bias followed by BatchNorm2d: ``{prefix}.c`` and ``{prefix}.bn``."""
    out = {f"{prefix}.c.weight": (cout, cin // groups, k, k)}
    out.update({f"{prefix}.bn.{p}": (cout,) for p in BN_PARAMS})
    return out


def _dw(prefix: str, c: int) -> dict:
    return _conv_bn(prefix, c, c, 3, groups=c)


def _ffn(prefix: str, c: int) -> dict:
    return {**_conv_bn(f"{prefix}.pw1", c, 2 * c), **_conv_bn(f"{prefix}.pw2", 2 * c, c)}


def _patch_merging(prefix: str, c: int, c_out: int) -> dict:
    hid, rd = 4 * c, se_channels(4 * c)
    return {
        **_conv_bn(f"{prefix}.conv1", c, hid),
        **_conv_bn(f"{prefix}.conv2", hid, hid, 3, groups=hid),
        f"{prefix}.se.fc1.weight": (rd, hid, 1, 1), f"{prefix}.se.fc1.bias": (rd,),
        f"{prefix}.se.fc2.weight": (hid, rd, 1, 1), f"{prefix}.se.fc2.bias": (hid,),
        **_conv_bn(f"{prefix}.conv3", hid, c_out),
    }


def _block(prefix: str, c: int, pdim: int, qk: int, kind: str) -> dict:
    out = _dw(f"{prefix}.conv.m", c)
    if kind == "s":
        out[f"{prefix}.mixer.m.pre_norm.weight"] = (pdim,)
        out[f"{prefix}.mixer.m.pre_norm.bias"] = (pdim,)
        out.update(_conv_bn(f"{prefix}.mixer.m.qkv", pdim, 2 * qk + pdim))
        out.update(_conv_bn(f"{prefix}.mixer.m.proj.1", c, c))
    out.update(_ffn(f"{prefix}.ffn.m", c))
    return out


def _head(prefix: str, c: int, classes: int) -> dict:
    out = {f"{prefix}.bn.{p}": (c,) for p in BN_PARAMS}
    out.update({f"{prefix}.l.weight": (classes, c), f"{prefix}.l.bias": (classes,)})
    return out


def state_shapes(cfg: SHViTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an unfolded model, canonical name -> shape, in the model's order.

    ``num_batches_tracked`` counters are not weights and are not listed.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    dims = (cfg.in_chans,) + cfg.stem_dims
    for i in range(4):  # patch_embed.{0,2,4,6}: ReLUs sit at the odd indices
        shapes.update(_conv_bn(f"patch_embed.{2 * i}", dims[i], dims[i + 1], 3))
    for s in range(3):
        c = cfg.embed_dim[s]
        if s > 0:  # the downsample between stage s-1 and stage s
            prev, p = cfg.embed_dim[s - 1], f"stages.{s}.downsample"
            shapes.update(_dw(f"{p}.0.m", prev))
            shapes.update(_ffn(f"{p}.1.m", prev))
            shapes.update(_patch_merging(f"{p}.2", prev, c))
            shapes.update(_dw(f"{p}.3.m", c))
            shapes.update(_ffn(f"{p}.4.m", c))
        for j in range(cfg.depth[s]):
            shapes.update(_block(f"stages.{s}.blocks.{j}", c, cfg.partial_dim[s], cfg.qk_dim[s], cfg.types[s]))
    shapes.update(_head("head", cfg.embed_dim[2], cfg.num_classes))
    if cfg.distillation:
        shapes.update(_head("head_dist", cfg.embed_dim[2], cfg.num_classes))
    return shapes


# ---------------------------------------------------------------------------------------------
# The authors' names <-> canonical (timm) names. This is the only place foreign names live.
# authors: blocks1.{j}              canonical: stages.0.blocks.{j}
#          blocksK.0.0 / blocksK.0.1           stages.{K-1}.downsample.0 / .1
#          blocksK.1                           stages.{K-1}.downsample.2   (PatchMerging)
#          blocksK.2.0 / blocksK.2.1           stages.{K-1}.downsample.3 / .4
#          blocksK.{j>=3}                      stages.{K-1}.blocks.{j-3}
_AUTHORS_DOWNSAMPLE = {"0.0": 0, "0.1": 1, "1": 2, "2.0": 3, "2.1": 4}
_CANONICAL_DOWNSAMPLE = {v: k for k, v in _AUTHORS_DOWNSAMPLE.items()}


def authors_to_canonical(key: str) -> str:
    m = re.match(r"blocks1\.(\d+)\.(.*)", key)
    if m:
        return f"stages.0.blocks.{m[1]}.{m[2]}"
    m = re.match(r"blocks([23])\.(\d+)\.(.*)", key)
    if not m:
        return key  # stem and head keep their names
    s, j, rest = int(m[1]) - 1, int(m[2]), m[3]
    if j >= 3:
        return f"stages.{s}.blocks.{j - 3}.{rest}"
    if j == 1:
        return f"stages.{s}.downsample.2.{rest}"
    sub, rest = rest.split(".", 1)
    return f"stages.{s}.downsample.{_AUTHORS_DOWNSAMPLE[f'{j}.{sub}']}.{rest}"


def canonical_to_authors(key: str) -> str:
    m = re.match(r"stages\.(\d)\.(blocks|downsample)\.(\d+)\.(.*)", key)
    if not m:
        return key
    s, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    if s == 0:
        return f"blocks1.{j}.{rest}"
    if kind == "blocks":
        return f"blocks{s + 1}.{j + 3}.{rest}"
    return f"blocks{s + 1}.{_CANONICAL_DOWNSAMPLE[j]}.{rest}"


def detect_format(keys) -> str:
    """'authors' (``blocks1``/``blocks2``/``blocks3``) or 'canonical' (timm's ``stages``)."""
    keys = list(keys)
    if any(re.match(r"blocks[123]\.", k) for k in keys):
        return "authors"
    if any(k.startswith(("stages.", "patch_embed.")) for k in keys):
        return "canonical"
    raise ShvitError("the file holds no SHViT weights (no 'patch_embed.*', 'stages.*' or 'blocks1.*' tensors)")


def unwrap_checkpoint(obj) -> dict:
    """The state dict inside a loaded ``.pth``: the authors' ``{'model': ...}``, ``{'state_dict': ...}``
    or a bare state dict. The authors evaluate ``model`` (not ``model_ema``)."""
    if not isinstance(obj, dict):
        raise ShvitError(f"the file holds a {type(obj).__name__}, expected a state dict or a dict with a 'model' entry")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def to_canonical(state: dict) -> dict[str, np.ndarray]:
    """Any accepted state dict (numpy arrays) -> canonical names, float32, 4-D 1x1 kernels.

    Drops ``num_batches_tracked`` and a DistributedDataParallel ``module.`` prefix.
    """
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if detect_format(state) == "authors":
        state = {authors_to_canonical(k): v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        a = np.asarray(v)
        if a.dtype.kind not in "fiu":
            raise ShvitError(f"tensor {k!r} has dtype {a.dtype}, expected a floating-point tensor")
        a = a.astype(np.float32)
        if a.ndim == 2 and (k.endswith(".c.weight") or re.search(r"\.se\.fc[12]\.weight$", k)):
            a = a[:, :, None, None]  # some release files store 1x1 kernels as [out, in]
        out[k] = np.ascontiguousarray(a)
    return out


def infer_config(shapes: dict) -> SHViTConfig:
    """Read the configuration back from canonical tensor shapes (``name -> shape``)."""
    shapes = {k: tuple(v) for k, v in shapes.items()}

    def need(key):
        if key not in shapes:
            raise ShvitError(f"missing tensor {key!r}: cannot infer the model's configuration")
        return shapes[key]

    in_chans = need("patch_embed.0.c.weight")[1]
    embed = [need("patch_embed.6.c.weight")[0]]
    embed += [need(f"stages.{s}.downsample.2.conv3.c.weight")[0] for s in (1, 2)]
    depth, types, pdim, qk = [], [], [], []
    for s in range(3):
        blocks = {int(m[1]) for k in shapes if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", k))}
        depth.append(len(blocks))
        norm = shapes.get(f"stages.{s}.blocks.0.mixer.m.pre_norm.weight")
        if norm is None:  # no attention in this stage (or no blocks): pdim and qk are unused
            types.append("i" if s == 0 or blocks else "s")
            pdim.append(max(1, embed[s] // 4))
            qk.append(16)
        else:
            types.append("s")
            pdim.append(norm[0])
            qk.append((need(f"stages.{s}.blocks.0.mixer.m.qkv.c.weight")[0] - norm[0]) // 2)
    cfg = SHViTConfig(
        embed_dim=tuple(embed), partial_dim=tuple(pdim), depth=tuple(depth), qk_dim=tuple(qk),
        types=tuple(types), num_classes=need("head.l.weight")[0],
        distillation="head_dist.l.weight" in shapes, in_chans=in_chans,
    )
    # A stage without attention leaves pdim/qk undetermined: prefer a named variant's values.
    for v in VARIANTS.values():
        candidate = v.replace(num_classes=cfg.num_classes, distillation=cfg.distillation, in_chans=in_chans)
        if state_shapes(candidate) == state_shapes(cfg):
            return candidate
    return cfg


def check_state(state: dict, cfg: SHViTConfig) -> None:
    """Raise ``ShvitError`` naming the first missing, unknown or mis-shaped tensor."""
    expected = state_shapes(cfg)
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShvitError(f"missing tensor {missing[0]!r}{more} for this configuration")
    unknown = [k for k in state if k not in expected]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ShvitError(f"unknown tensor {unknown[0]!r}{more}: not part of an SHViT with this configuration")
    for k, shape in expected.items():
        found = tuple(state[k].shape)
        if found != shape:
            raise ShvitError(f"tensor {k!r} has shape {list(found)}, expected {list(shape)}")
