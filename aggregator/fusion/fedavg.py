"""FedAvg and the weight normalization every fusion rule shares."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


def normalize_weights(weights: Sequence[float] | torch.Tensor, k: int) -> list[float]:
    r"""Normalize non-negative fusion weights to :math:`\lambda_k = w_k / \sum_j w_j`.

    Raises ``ValueError`` when the count differs from ``k``, a weight is negative or not
    finite, or all weights are zero (a zero total is an error, not a division by zero).
    """
    values = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(values) != k:
        raise ValueError(f"got {len(values)} weights for {k} models")
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"fusion weights must be finite and non-negative, got {bad[0]!r}")
    top = max(values, default=0.0)
    if top <= 0:
        raise ValueError("fusion weights sum to zero: nothing to fuse")
    scaled = [w / top for w in values]  # in [0, 1]: the sum cannot overflow, however large the weights
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def fedavg_tensor(tensors: Iterable[torch.Tensor], lam: Sequence[float]) -> torch.Tensor:
    r"""Weighted mean :math:`W = \sum_k \lambda_k W_k` (``lam`` already normalized).

    Accumulates in the inputs' dtype for float32/float64 (what a plain weighted sum costs)
    and in float32 for half-precision inputs; returns the inputs' dtype. ``tensors`` may be
    a generator: each is added and dropped before the next is read.
    """
    it = iter(tensors)
    first = next(it)
    dtype = first.dtype
    acc_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    acc = first.to(acc_dtype) * lam[0]
    del first
    n = 1
    for t, w in zip(it, lam[1:], strict=False):
        acc.add_(t.to(acc_dtype), alpha=w)
        n += 1
    if n != len(lam):
        raise ValueError(f"got {n} tensors for {len(lam)} weights")
    return acc.to(dtype)


def server_step(old: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    r"""The server's step towards a round's fusion: :math:`W \leftarrow W_{old} + \eta (W_{fused} - W_{old})`.

    ``lr`` (:math:`\eta`) = 1 is plain FedAvg (the fusion replaces the model); smaller values make
    the global model an exponential moving average of the rounds' fusions (FedOpt's server
    learning rate, Reddi et al. 2021), damping swings between versions. Integer tensors take
    the fusion's value.
    """
    if lr == 1.0:
        return fused
    out = {}
    for name, new in fused.items():
        prev = old.get(name)
        if prev is None or not new.is_floating_point():
            out[name] = new
        else:
            out[name] = (prev.to(torch.float64) + lr * (new.to(torch.float64) - prev.to(torch.float64))).to(new.dtype)
    return out
