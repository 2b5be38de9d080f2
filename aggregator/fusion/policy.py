r"""Fusion policies: which method the next fusion uses, decided from a ``PolicySpec``.

A policy is a small serializable value (``schemas.PolicySpec``, it travels in
``PolicyCommand``); ``decide`` is the one decision. ``hybrid`` uses its ``wb_method``
(default the entropic ``fedwb-sinkhorn``, reg 0.1) for the first ``switch_after``
fusions made under it, then FedAvg for good; with ``dispersion_below`` it switches
earlier, at the first fusion whose buffered models have

.. math::
    \mathrm{dispersion} = \frac{\sqrt{\sum_k \lambda_k \lVert W_k - \bar W \rVert^2}}
                               {\lVert \bar W \rVert}, \qquad
    \bar W = \sum_k \lambda_k W_k,

the weighted RMS distance of the models to their FedAvg, relative to its norm, over all
float tensors, below the threshold (the clients agree, so the barycenter has little to add).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aggregator.fusion.fedavg import normalize_weights
from schemas.messages import PolicySpec


@dataclass(frozen=True)
class Choice:
    """The method one fusion uses, its options, and why."""

    method: str
    options: dict[str, Any]
    reason: str

    @property
    def family(self) -> str:
        """``fedwb`` for any barycentric method, else the method itself (``fedavg``, ``median``, ...)."""
        return "fedwb" if self.method.startswith("fedwb") else self.method


@dataclass(frozen=True)
class PolicyState:
    """How many fusions the current policy has made, and whether hybrid has switched."""

    fusions: int = 0
    switched: bool = False

    def after_fusion(self, choice: Choice, spec: PolicySpec) -> PolicyState:
        switched = self.switched or (spec.name == "hybrid" and choice.method == "fedavg")
        return PolicyState(self.fusions + 1, switched)


def dispersion(models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> float:
    """Weighted relative dispersion of the models around their FedAvg (module docstring)."""
    lam = normalize_weights(weights, len(models))
    num = 0.0
    den = 0.0
    for name, first in models[0].items():
        if not first.is_floating_point():
            continue
        x = torch.stack([m[name].reshape(-1).to(torch.float64) for m in models])
        lam_t = torch.tensor(lam, dtype=torch.float64, device=x.device)[:, None]
        mean = (lam_t * x).sum(dim=0)
        num += float((lam_t * (x - mean) ** 2).sum())
        den += float((mean**2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def method_options(spec: PolicySpec) -> dict[str, Any]:
    """The ``fuse`` options a policy implies."""
    return {"reg": spec.reg, "stop_threshold": spec.stop_threshold, "max_iter": spec.max_iter,
            "solver": spec.solver, "biases": spec.biases, "trim_ratio": spec.trim_ratio,
            "byzantine": spec.byzantine}


def decide(spec: PolicySpec, state: PolicyState, dispersion_value: float | None = None) -> Choice:
    """The method of the next fusion under ``spec``, given what the policy did so far."""
    opts = method_options(spec)
    if spec.name != "hybrid":
        return Choice(spec.name, opts, f"policy {spec.name}")
    if state.switched:
        return Choice("fedavg", opts, "hybrid: switched to fedavg earlier")
    if spec.switch_after is not None and state.fusions >= spec.switch_after:
        return Choice("fedavg", opts, f"hybrid: {state.fusions} fusions >= switch_after "
                                      f"{spec.switch_after}")
    if (spec.dispersion_below is not None and dispersion_value is not None
            and dispersion_value < spec.dispersion_below):
        return Choice("fedavg", opts, f"hybrid: dispersion {dispersion_value:.3g} < "
                                      f"{spec.dispersion_below:g}")
    return Choice(spec.wb_method, opts, f"hybrid: fusion {state.fusions + 1} uses {spec.wb_method}")


def needs_dispersion(spec: PolicySpec, state: PolicyState) -> bool:
    """Whether ``decide`` would look at the dispersion for the next fusion."""
    return spec.name == "hybrid" and spec.dispersion_below is not None and not state.switched
