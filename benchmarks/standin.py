"""Importing timm where torchvision cannot load: an inert stand-in torchvision, for the bench only.

timm imports torchvision at start-up (its data transforms), and PyPI's torchvision wheels do not
load beside PyPI's CPU build of torch 2.13.0 (0.28.0 stops with "operator torchvision::nms does
not exist"; matching CPU wheels exist only on download.pytorch.org, which this project does not
use). timm's SHViT model code uses none of torchvision, so the bench can still time timm's
own model: when the real torchvision is missing or broken, ``import_timm`` puts a stand-in in
its place, in this process only. Every name in it exists, and calling anything raises, so a
use of torchvision cannot pass silently; a working torchvision is always preferred.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

NOTE = "torchvision replaced by an inert stand-in (PyPI's torchvision does not load beside this torch; timm's SHViT does not use it)"


class Inert:
    """Any attribute path of the stand-in: a class base, an empty iterable; calling it raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, key: str):
        if key.startswith("__"):  # introspection (inspect, pickle, typing) must see a plain object
            raise AttributeError(key)
        return Inert(f"{self._name}.{key}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} was called, but torchvision here is a stand-in ({NOTE})")

    def __mro_entries__(self, bases):
        return (object,)

    def __iter__(self):
        return iter(())


class StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torchvision`` and every ``torchvision.*`` as an empty package of Inert names."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def getattr_(key, prefix=spec.name):
            if key.startswith("__"):
                raise AttributeError(key)
            return Inert(f"{prefix}.{key}")

        module.__getattr__ = getattr_
        return module

    def exec_module(self, module):
        pass


def forget(prefix: str) -> None:
    """Drop a package and its submodules from sys.modules (after a failed import)."""
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def import_timm():
    """timm, and None or NOTE (whether it needed the stand-in). Raises what the import raised
    when timm itself is missing or fails for another reason."""
    try:
        timm = importlib.import_module("timm")
        return timm, NOTE if any(isinstance(f, StandIn) for f in sys.meta_path) else None
    except Exception as e:  # a missing torchvision: ModuleNotFoundError; a broken one: RuntimeError, OSError...
        if "torchvision" not in str(e):
            raise
    forget("timm")
    forget("torchvision")
    sys.meta_path.insert(0, StandIn())
    return importlib.import_module("timm"), NOTE
