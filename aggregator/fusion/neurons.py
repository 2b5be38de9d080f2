r"""``fedwb-neurons``: a Wasserstein barycenter over neurons, for models that did not start from one model.

Hidden units of a layer can be permuted without changing the network, so averaging
weight :math:`i` of one model with weight :math:`i` of another is arbitrary unless the
models share an initialization. Here each hidden layer :math:`l` of model :math:`k` is a
uniform measure over its units, unit :math:`j` being the vector of its incoming weights
(and bias) :math:`x^k_{l,j}`. Layer by layer, every model is aligned to the running
barycenter :math:`B` by optimal transport,

.. math::
    T^k_l = \arg\min_{T \in U(\frac{1}{n}\mathbf 1, \frac{1}{n}\mathbf 1)}
            \sum_{ij} T_{ij} \lVert B_{l,i} - \tilde x^k_{l,j} \rVert^2, \qquad
    \tilde x^k_{l} = x^k_{l} \,(n\,T^k_{l-1})^\top \ \text{(inputs aligned first)},

and the aligned layer is :math:`n\,T^k_l \tilde x^k_l`; then
:math:`B \leftarrow \sum_k \lambda_k \,\mathrm{aligned}_k`, and alignment and averaging
alternate until the alignments stop changing (a free-support barycenter over neurons,
as OTFusion [1] and Wasserstein-barycenter model fusion [2]). The output layer's units
are never permuted (only its inputs are aligned). ``transport="exact"`` uses ``ot.emd``
(a permutation for equal sizes), ``"entropic"`` ``ot.sinkhorn`` with ``reg`` relative to
the median cost (a soft alignment).

From a shared initialization the alignments are the identity, so the result is FedAvg.
Which tensors form the chain comes from the task (``LayerChain``), never from guessing
on names; a model with float tensors outside its chain, or no chain, is fused by FedAvg
and the report says why.

[1] Singh, S. P., Jaggi, M. (2020). Model fusion via optimal transport. NeurIPS.
[2] Akash, A. K., Li, S., Garcia Trillos, N. (2022). Wasserstein barycenter-based model
    fusion and linear mode connectivity of neural networks. arXiv 2210.06671.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aggregator.fusion.fedavg import fedavg_tensor
from aggregator.fusion.registry import register

Model = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Layer:
    """One layer of a chain: its weight (units first), its bias, and how many inputs each
    unit of the previous layer feeds (``in_block``: 1 for Linear after Linear, H*W for a
    Linear after a flattened Conv2d with H x W outputs per channel)."""

    weight: str
    bias: str | None = None
    in_block: int = 1


LayerChain = Sequence[Layer]


def chain_from_spec(spec: Sequence[Any] | None) -> list[Layer] | None:
    """A chain from plain data (``[["net.0.weight", "net.0.bias"], ...]`` or dicts), as tasks declare it."""
    if spec is None:
        return None
    out = []
    for item in spec:
        if isinstance(item, Layer):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(Layer(item["weight"], item.get("bias"), int(item.get("in_block", 1))))
        else:
            weight, *rest = item
            out.append(Layer(weight, rest[0] if rest else None, int(rest[1]) if len(rest) > 1 else 1))
    return out


def chain_problem(model: Model, chain: LayerChain | None) -> str | None:
    """Why ``model`` cannot be aligned along ``chain`` (``None`` when it can)."""
    if not chain:
        return "the task declares no layer chain"
    names = {layer.weight for layer in chain} | {layer.bias for layer in chain if layer.bias}
    missing = sorted(n for n in names if n not in model)
    if missing:
        return f"chain tensors missing from the model: {missing[:3]}"
    outside = sorted(n for n, t in model.items() if t.is_floating_point() and n not in names)
    if outside:
        return f"float tensors outside the declared chain: {outside[:3]}"
    prev_units = None
    for layer in chain:
        w = model[layer.weight]
        if w.ndim < 2:
            return f"{layer.weight} is not a layer weight (shape {list(w.shape)})"
        if layer.bias and model[layer.bias].shape != (w.shape[0],):
            return f"{layer.bias} does not match {layer.weight}'s {w.shape[0]} units"
        if prev_units is not None and w.shape[1] != prev_units * layer.in_block:
            return f"{layer.weight} has {w.shape[1]} inputs, expected {prev_units} x {layer.in_block}"
        prev_units = w.shape[0]
    return None


def _unit_features(w: torch.Tensor, b: torch.Tensor | None, t_in: torch.Tensor | None, in_block: int) -> torch.Tensor:
    """Incoming weights of every unit, inputs aligned by ``t_in`` (n_prev x n_prev, rows: barycenter units)."""
    n_out, n_in = w.shape[0], w.shape[1]
    x = w.reshape(n_out, n_in, -1)  # (units, inputs, kernel)
    if t_in is not None:
        x = x.reshape(n_out, t_in.shape[1], in_block, -1)
        x = torch.einsum("ij,ojbk->oibk", t_in, x).reshape(n_out, n_in, -1)
    feats = x.reshape(n_out, -1)
    return feats if b is None else torch.cat([feats, b[:, None]], dim=1)


def _split(feats: torch.Tensor, shape: torch.Size, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if has_bias:
        return feats[:, :-1].reshape(shape), feats[:, -1]
    return feats.reshape(shape), None


def _transport(target: torch.Tensor, source: torch.Tensor, transport: str, reg: float) -> torch.Tensor:
    """n T: the OT plan between target units (rows) and source units (cols), uniform, scaled by n."""
    import ot

    cost = torch.cdist(target, source).pow(2).numpy()
    n = cost.shape[0]
    u = np.full(n, 1.0 / n)
    if transport == "exact":
        plan = ot.emd(u, u, cost)
    else:
        scale = float(np.median(cost)) or 1.0
        with warnings.catch_warnings():  # an unconverged plan is still a soft alignment; its marginals are close
            warnings.simplefilter("ignore")
            plan = ot.sinkhorn(u, u, cost / scale, reg, numItermax=1000, stopThr=1e-9)
        if not np.all(np.isfinite(plan)):  # the plain iteration under/overflowed: the log-domain one
            plan = ot.sinkhorn(u, u, cost / scale, reg, method="sinkhorn_log", numItermax=1000, stopThr=1e-9)
    return torch.from_numpy(plan * n)


def _align(model: Model, bary: dict[str, torch.Tensor], chain: LayerChain, transport: str,
           reg: float) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """``model`` with every hidden layer's units matched to ``bary``'s; also the plans used."""
    out = {n: t.to(torch.float64) for n, t in model.items()}
    t_prev: torch.Tensor | None = None
    plans = []
    for idx, layer in enumerate(chain):
        w = out[layer.weight]
        b = out[layer.bias] if layer.bias else None
        feats = _unit_features(w, b, t_prev, layer.in_block)
        if idx < len(chain) - 1:  # hidden layer: permute its units to the barycenter's
            target = _unit_features(bary[layer.weight], bary[layer.bias] if layer.bias else None, None, 1)
            t_prev = _transport(target, feats, transport, reg)
            plans.append(t_prev)
            feats = t_prev @ feats
        out[layer.weight], new_b = _split(feats, w.shape, layer.bias is not None)
        if layer.bias:
            out[layer.bias] = new_b
    return out, plans


def _start_index(models: Sequence[Model], lam: Sequence[float]) -> int:
    """The model the barycenter starts from: the heaviest; among equally heavy ones, the one with the
    largest squared norm of its float tensors (a key of the content, not of the position, so the fused
    model does not depend on the order in which the updates arrived)."""
    top = max(lam)
    heaviest = [k for k, w in enumerate(lam) if w == top]
    if len(heaviest) == 1:
        return heaviest[0]
    norm2 = {k: sum(float(t.double().square().sum()) for t in models[k].values() if t.is_floating_point())
             for k in heaviest}
    return max(heaviest, key=lambda k: norm2[k])


def fedwb_neurons(models: Sequence[Model], lam: Sequence[float], *, chain: LayerChain | None,
                  transport: str = "exact", reg: float = 0.05, max_iter: int = 10,
                  newest: int = -1) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fuse ``models`` (normalized weights ``lam``) by the barycenter over neurons (module docstring).

    Returns the fused model (inputs' dtypes) and a report: ``iterations``, ``transport``,
    whether the alignments were all the identity, or ``fallback`` with the reason.
    """
    if transport not in ("exact", "entropic"):
        raise ValueError(f"unknown neuron transport {transport!r}: use exact or entropic")
    first = models[0]
    problem = chain_problem(first, chain)
    if problem is not None:
        fused = {n: (fedavg_tensor([m[n] for m in models], lam) if t.is_floating_point()
                     else models[newest][n].clone()) for n, t in first.items()}
        return fused, {"fallback": "fedavg", "reason": problem}
    chain = list(chain)
    tol = 1e-9 if transport == "exact" else 1e-4  # soft plans move a little with every barycenter
    start = _start_index(models, lam)
    bary = {n: t.to(torch.float64).clone() for n, t in models[start].items()}
    prev_plans: list[list[torch.Tensor]] | None = None
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        aligned, plans = zip(*(_align(m, bary, chain, transport, reg) for m in models), strict=True)
        bary = {n: sum(lam[k] * aligned[k][n] for k in range(len(models))) for n in bary
                if first[n].is_floating_point()}
        stable = prev_plans is not None and all(
            torch.allclose(p, q, atol=tol) for ps, qs in zip(plans, prev_plans, strict=True)
            for p, q in zip(ps, qs, strict=True))
        prev_plans = list(plans)
        if stable:  # the alignments (hence the average) no longer change
            break
    identity = all(torch.allclose(p, torch.eye(p.shape[0], dtype=p.dtype), atol=1e-9)
                   for ps in prev_plans or [] for p in ps)
    out = {}
    for n, t in first.items():
        out[n] = bary[n].to(t.dtype) if t.is_floating_point() else models[newest][n].clone()
    return out, {"iterations": iterations, "transport": transport, "identity_alignment": identity}


@register("fedwb-neurons")
def _fedwb_neurons_method(models: Sequence[Model], lam: list[float],
                          options: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return fedwb_neurons(models, lam, chain=chain_from_spec(options.get("chain")),
                         transport=options.get("transport", "exact"), reg=options.get("neuron_reg", 0.05),
                         max_iter=options.get("neuron_iters", 10), newest=options.get("newest", -1))
