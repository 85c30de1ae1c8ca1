"""The layer tree, walked the same way in all three packages: no math here.

A model is a tree of plain containers: each layer's sub-layers are its attributes (or lists of
them), and the path of attribute names and list indices to a tensor IS its weight name
(``stages.1.blocks.0.mixer.m.qkv.c.weight``). shvit_numpy and shvit_tiny build their layers on
``Module``; shvit_torch's are ``torch.nn.Module``s, and ``walk`` follows their names just the same.
"""
from __future__ import annotations


class Module:
    """A plain container: its sub-layers are attributes (or lists), named like the weights.
    Calling a layer runs its ``forward``, as in torch."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def children(self):
        """(name, sub-layer or list of sub-layers) for each attribute that holds layers."""
        for name, value in vars(self).items():
            if isinstance(value, Module) or (isinstance(value, list) and value and isinstance(value[0], Module)):
                yield name, value


def fuse(module):
    """``module`` with BatchNorm folded for inference: its own ``fuse()`` where it has one (the
    folded layer it returns), else the same module with every sub-layer folded in place."""
    return module.fuse() if hasattr(module, "fuse") else fuse_children(module)


def fuse_children(module):
    """Replace, depth first, each sub-layer of ``module`` by ``fuse(sub-layer)``; returns ``module``."""
    for name, child in list(module.children()):
        setattr(module, name, [fuse(c) for c in child] if isinstance(child, list) else fuse(child))
    return module


def walk(obj, name: str | list[str]):
    """Follow a dotted weight name (or its parts): attribute names, and list indices for digits."""
    for part in name.split(".") if isinstance(name, str) else name:
        if part:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def assign(root, name: str, value) -> None:
    """Set the attribute a dotted weight name ends in: ``walk`` to its owner, then setattr."""
    *path, leaf = name.split(".")
    setattr(walk(root, path), leaf, value)


def leaves(module, kind, prefix: str = ""):
    """(dotted name, value) of every attribute of type ``kind`` in the tree, depth first:
    the weights (and BatchNorm statistics) a framework's tensors hold."""
    for name, value in vars(module).items():
        if isinstance(value, kind):
            yield prefix + name, value
        elif isinstance(value, list):
            yield from ((f"{prefix}{name}.{i}", v) for i, v in enumerate(value) if isinstance(v, kind))
    for name, child in module.children():
        for i, c in enumerate(child) if isinstance(child, list) else [(None, child)]:
            yield from leaves(c, kind, f"{prefix}{name}." + ("" if i is None else f"{i}."))
