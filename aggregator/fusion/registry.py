"""The fusion registry: a method is a name and a function ``(models, lam, options) -> (model, info)``.

``models`` are state dicts with the same tensors, ``lam`` the normalized weights, ``options``
the keyword options ``fuse_with_report`` was given (``chain``, ``transport``, ...); ``info`` is
a JSON-able dict that lands in the fusion report. Per-tensor rules (``fedavg``, ``fedwb``,
``fedwb-sinkhorn``) live in ``fuse``; model-level ones register here, one module each
(``neurons`` registers ``fedwb-neurons``). A new method is one new module and its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Model = Mapping[str, torch.Tensor]
FusionFn = Callable[[Sequence[Model], list[float], dict[str, Any]], tuple[dict[str, torch.Tensor], dict[str, Any]]]

_METHODS: dict[str, FusionFn] = {}


def register(name: str) -> Callable[[FusionFn], FusionFn]:
    """Decorator: make ``fn`` the model-level fusion method ``name``."""
    def deco(fn: FusionFn) -> FusionFn:
        if name in _METHODS:
            raise ValueError(f"fusion method {name!r} is registered twice")
        _METHODS[name] = fn
        return fn
    return deco


def get(name: str) -> FusionFn | None:
    """The model-level method ``name``, or ``None`` (a per-tensor rule or unknown)."""
    return _METHODS.get(name)


def names() -> tuple[str, ...]:
    """Registered model-level methods."""
    return tuple(_METHODS)
