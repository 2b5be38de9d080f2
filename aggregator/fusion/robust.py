r"""Bounded influence and robust rules: what keeps one client from taking the model.

Two bounds the aggregator applies to every round before any fusion rule (on by default):

* **Weight-share cap.** Normalized weights :math:`\lambda_k` are capped at ``cap`` and the
  excess is handed to the uncapped updates in proportion to their weights (water filling),
  so :math:`\lambda_k \le \text{cap}` and :math:`\sum_k \lambda_k = 1`. With fewer than
  :math:`1/\text{cap}` updates no such weights exist; the cap is then :math:`1/K` (equal
  weights).
* **Norm clipping against the round's median.** With :math:`\Delta_k = W_k - W_g` (float
  tensors, :math:`W_g` the current global model) and :math:`\rho` the lower median of the
  :math:`\lVert\Delta_k\rVert` (plus the previous round's :math:`\rho` when fewer than 3 updates
  are fused, so one or two updates cannot set their own bound), each update becomes
  :math:`W_g + \Delta_k \min(1, c\rho / \lVert\Delta_k\rVert)`. A convex combination of the
  clipped updates then moves the model by at most :math:`c\rho`, and one update's own part of
  that move is at most :math:`\text{cap} \cdot c\rho`.

Robust rules, registered as fusion methods (the ones Flower users know):
``median`` (coordinate-wise median, unweighted), ``trimmed-mean`` (drop the
``trim_ratio`` fraction of largest and smallest values per coordinate, average the rest)
and ``krum`` (Blanchard et al. 2017: the model whose summed squared distance to its
:math:`K - f - 2` nearest neighbours is smallest, :math:`f` = ``byzantine``). Integer
tensors take the newest model's value, as everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aggregator.fusion.fedavg import normalize_weights
from aggregator.fusion.registry import register

Model = Mapping[str, torch.Tensor]


def cap_shares(lam: Sequence[float], cap: float) -> tuple[list[float], list[int]]:
    """Water-fill normalized weights ``lam`` under ``cap``; returns the shares and the indices lowered."""
    if not 0 < cap <= 1:
        raise ValueError(f"share cap must be in (0, 1], got {cap!r}")
    k = len(lam)
    cap = max(cap, 1.0 / k)
    shares = [float(x) for x in lam]
    capped: set[int] = set()
    while True:
        over = [i for i, s in enumerate(shares) if i not in capped and s > cap * (1 + 1e-12)]
        if not over:
            break
        capped.update(over)
        free = [i for i in range(k) if i not in capped]
        rest = 1.0 - cap * len(capped)
        total = math.fsum(shares[i] for i in free)
        for i in capped:
            shares[i] = cap
        for i in free:
            shares[i] = rest * shares[i] / total if total > 0 else rest / len(free)
    return shares, [i for i in range(k) if shares[i] < lam[i] * (1 - 1e-12)]


NORM_SLICE = 1 << 20  # elements per float64 slice: the norm's temporaries stay a few MB for any tensor


def delta_norm(model: Model, reference: Model) -> float:
    r""":math:`\lVert W_k - W_g \rVert_2` over the float tensors (in float64, a slice at a time)."""
    total = 0.0
    for name, ref in reference.items():
        if ref.is_floating_point():
            a, b = model[name].reshape(-1), ref.reshape(-1)
            for i in range(0, b.numel(), NORM_SLICE):
                d = a[i:i + NORM_SLICE].double() - b[i:i + NORM_SLICE].double()
                total += float(torch.dot(d, d))
    return math.sqrt(total)


@dataclass
class Clipping:
    """What ``clip_to_median`` did: the bound, each update's norm, and which were scaled."""

    reference: float
    bound: float
    norms: list[float] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)


def clip_to_median(models: Sequence[Model], reference: Model, factor: float,
                   previous: float | None = None) -> tuple[list[dict[str, torch.Tensor]], Clipping]:
    """Scale each update's delta to at most ``factor`` times the round's lower-median delta norm."""
    if not factor > 0:
        raise ValueError(f"clip factor must be positive, got {factor!r}")
    norms = [delta_norm(m, reference) for m in models]
    pool = sorted(norms + ([previous] if previous is not None and len(norms) < 3 else []))
    rho = pool[(len(pool) - 1) // 2]  # lower median: the larger of two never sets the bound
    bound = factor * rho
    out: list[dict[str, torch.Tensor]] = []
    clipped: list[int] = []
    for idx, (m, norm) in enumerate(zip(models, norms, strict=True)):
        if norm <= bound or norm == 0.0:
            out.append(_as_model(m))
            continue
        clipped.append(idx)
        scale = bound / norm
        out.append({n: (ref + (m[n].to(ref.dtype) - ref) * scale).to(m[n].dtype) if ref.is_floating_point()
                    else m[n] for n, ref in reference.items()})
    return out, Clipping(rho, bound, norms, clipped)


def _as_model(m: Model) -> Model:
    """A shallow copy of an in-memory model; a file-backed one (a chunked update, read one tensor
    at a time) is passed on as it is: copying it into a dict would read every tensor at once."""
    return dict(m) if isinstance(m, dict) else m


def _per_float_tensor(models: Sequence[Model], newest: int, rule: Any) -> dict[str, torch.Tensor]:
    """Apply ``rule`` to the stacked (K, ...) float tensors; integer tensors take the newest model's."""
    out = {}
    for name, first in models[0].items():
        if first.is_floating_point():
            stacked = torch.stack([m[name].to(torch.float64) for m in models])
            out[name] = rule(stacked).to(first.dtype)
        else:
            out[name] = models[newest][name].clone()
    return out


def coordinate_median(models: Sequence[Model], newest: int = -1) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (the mean of the two middle values for an even K)."""
    return _per_float_tensor(models, newest, lambda x: torch.quantile(x.reshape(len(models), -1), 0.5, dim=0)
                             .reshape(x.shape[1:]))


def trimmed_mean(models: Sequence[Model], trim_ratio: float = 0.2, newest: int = -1) -> dict[str, torch.Tensor]:
    r"""Per coordinate: sort the K values, drop :math:`\lfloor \beta K \rfloor` from each end, average the rest."""
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
    cut = int(trim_ratio * len(models))

    def rule(x: torch.Tensor) -> torch.Tensor:
        ordered = torch.sort(x, dim=0).values
        return ordered[cut:len(models) - cut].mean(dim=0)

    return _per_float_tensor(models, newest, rule)


def krum_index(models: Sequence[Model], byzantine: int | None = None) -> tuple[int, list[float]]:
    """Krum's choice and every model's score (sum of squared distances to its K - f - 2 nearest)."""
    k = len(models)
    f = max(0, (k - 3) // 2) if byzantine is None else byzantine
    if k < 2 * f + 3 and k > 2:
        raise ValueError(f"krum with byzantine={f} needs at least {2 * f + 3} models, got {k}")
    flat = torch.stack([torch.cat([t.reshape(-1).to(torch.float64) for t in m.values() if t.is_floating_point()])
                        for m in models])
    dist = torch.cdist(flat, flat) ** 2
    near = max(1, k - f - 2)
    scores = []
    for i in range(k):
        others = torch.cat([dist[i, :i], dist[i, i + 1:]])
        scores.append(float(torch.sort(others).values[:near].sum()) if len(others) else 0.0)
    return int(min(range(k), key=scores.__getitem__)), scores


@register("median")
def _median_method(models: Sequence[Model], lam: list[float],
                   options: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return coordinate_median(models, options.get("newest", -1)), {"models": len(models)}


@register("trimmed-mean")
def _trimmed_mean_method(models: Sequence[Model], lam: list[float],
                         options: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ratio = options.get("trim_ratio", 0.2)
    fused = trimmed_mean(models, ratio, options.get("newest", -1))
    return fused, {"models": len(models), "trim_ratio": ratio, "trimmed_each_side": int(ratio * len(models))}


@register("krum")
def _krum_method(models: Sequence[Model], lam: list[float],
                 options: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    chosen, scores = krum_index(models, options.get("byzantine"))
    fused = {n: t.clone() for n, t in models[chosen].items()}
    return fused, {"chosen": chosen, "scores": [round(s, 6) for s in scores]}


def bound_influence(models: Sequence[Model], weights: Sequence[float], reference: Model, *, share_cap: float,
                    clip_factor: float, previous: float | None = None
                    ) -> tuple[list[dict[str, torch.Tensor]], list[float], dict[str, Any]]:
    """Both default bounds of one round: clip each delta, then cap each weight share.

    Returns the models to fuse, their normalized weights, and a JSON-able report
    (indices of the clipped and capped updates, the clipping reference and bound).
    """
    lam = normalize_weights(weights, len(models))
    report: dict[str, Any] = {"share_cap": round(share_cap, 6)}
    out = [_as_model(m) for m in models]
    if clip_factor > 0 and reference:
        out, clip = clip_to_median(models, reference, clip_factor, previous)
        report.update(clip_reference=clip.reference, clip_bound=clip.bound, clipped=clip.clipped,
                      max_norm=max(clip.norms, default=0.0))
    shares, capped = cap_shares(lam, share_cap)
    report["capped"] = capped
    return out, shares, report
