r"""``fuse``: combine K models (``dict[str, Tensor]``) into one, tensor by tensor.

Methods
-------
``fedavg``
    :math:`W = \sum_k \lambda_k W_k`.
``fedwb`` (exact) and ``fedwb-sinkhorn`` (entropic, ``reg``)
    Algorithm 1 of Heterogeneous Federated RL Using Wasserstein Barycenters
    (arXiv 2506.15825), with its sign right. For each float tensor, flattened to length
    n: :math:`m_k = \min W_k`, :math:`S_k = W_k - m_k`, :math:`s_k = \sum_i S_{ki}`,
    :math:`a_k = S_k / s_k` (a histogram on ``0..n-1``), :math:`b` the barycenter of the
    :math:`a_k` with weights :math:`\lambda_k`, and

    .. math::
        W = b \sum_k \lambda_k s_k + \sum_k \lambda_k m_k .

    So :math:`\sum_i W_i = \sum_k \lambda_k \sum_i W_{ki}` (the weighted-mean sum is
    kept; for the entropic variant only up to its convergence error, since POT's ``b``
    is not renormalized unless ``renormalize=True``) and shifting every model by c
    shifts the result by c.

``fedwb-sinkhorn`` is solved for all tensors of a model together (``solver``: ``auto`` =
the compiled plain-domain solver on CPU, ``triton`` (fused log-domain kernels, CUDA
graphs) on a GPU, ``plain-torch`` elsewhere; ``log`` the log-domain one in torch;
``pot-plain`` the authors' dense POT call; ``wide`` the compiled solver with an exponent per
value, from the start), see ``sinkhorn_fast``, ``sinkhorn_torch``, ``sinkhorn_triton`` and
``sinkhorn_wide``. A tensor whose scalings leave the plain solvers' range continues the same
iterate in ``sinkhorn_wide`` on CPU (in the log domain elsewhere); the report names it.
Model-level methods (``fedwb-neurons``) come from ``registry``; their options
(``chain``, ``transport``, ``neuron_reg``, ``neuron_iters``) pass through.

What each rule does to a model: the barycenter transports mass between *index
positions*, which are unrelated weights. The exact barycenter therefore moves mass
between neighbouring weights and can land far from every client (43-94 % from FedAvg
in DESIGN.md's measurement); the entropic one with the paper's ``reg = 0.1`` has a
kernel close to the identity and behaves close to a normalized weighted geometric mean
(about 7 % from FedAvg); larger ``reg`` blurs the tensor.

Tensors that are not distributions:

* integer and bool tensors (step counters, masks): the newest model's value
  (``newest``, default the last model given -- pass models in arrival order);
* float tensors with fewer than 2 elements: FedAvg;
* 1-D float tensors (biases): FedWB, or FedAvg with ``biases="fedavg"``;
* a model whose tensor is constant (:math:`s_k = 0`) has no shape: it contributes its
  :math:`m_k` and :math:`s_k = 0` to the rescaling but not to the barycenter; when all
  are constant the result is :math:`\sum_k \lambda_k m_k` (FedAvg).

The computation runs on ``device`` (default: the inputs'), in float64 for the CDFs, and
the result has the inputs' dtype and device.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from aggregator.fusion import barycenter as _bary
from aggregator.fusion import neurons as _neurons  # noqa: F401 - registers fedwb-neurons
from aggregator.fusion import registry
from aggregator.fusion import robust as _robust  # noqa: F401 - registers median, trimmed-mean, krum
from aggregator.fusion import sinkhorn_fast as _fast
from aggregator.fusion import sinkhorn_torch as _torch_solver
from aggregator.fusion import sinkhorn_triton as _triton_solver
from aggregator.fusion import sinkhorn_wide as _wide
from aggregator.fusion.fedavg import fedavg_tensor, normalize_weights
from aggregator.fusion.sinkhorn import sinkhorn_barycenter_1d
from schemas.chunks import tensor_device, tensor_meta

PER_TENSOR = ("fedavg", "fedwb", "fedwb-sinkhorn")
# passed to registered (model-level) methods
MODEL_LEVEL_OPTIONS = {"chain", "transport", "neuron_reg", "neuron_iters", "trim_ratio", "byzantine"}
METHODS = PER_TENSOR + registry.names()
SOLVERS = ("auto", "plain", "plain-torch", "triton", "log", "pot-plain", "wide")
POT_PLAIN_MAX_N = 8192  # POT needs the dense n x n cost matrix: 512 MiB at this size
Model = Mapping[str, torch.Tensor]


@dataclass
class FusionReport:
    """What a fusion did: the method, how each tensor was treated, solver diagnostics."""

    method: str
    seconds: float = 0.0
    rules: dict[str, int] = field(default_factory=dict)
    sinkhorn_iterations: int = 0
    sinkhorn_error: float = 0.0
    sinkhorn_converged: bool = True
    sinkhorn_solver: str = ""
    model_level: dict[str, Any] = field(default_factory=dict)  # what a model-level method reported
    sinkhorn_escaped: list[str] = field(default_factory=list)
    sinkhorn_escaped_to: str = ""  # "wide" or "log": where the escaped tensors continued
    pot_plain_non_finite: list[str] = field(default_factory=list)
    device: str = "cpu"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "seconds": round(self.seconds, 6),
                               "rules": dict(self.rules), "device": self.device}
        if self.model_level:
            out[self.method] = dict(self.model_level)
        if self.method == "fedwb-sinkhorn":
            out.update(sinkhorn_iterations=self.sinkhorn_iterations,
                       sinkhorn_error=self.sinkhorn_error,
                       sinkhorn_converged=self.sinkhorn_converged,
                       sinkhorn_solver=self.sinkhorn_solver)
            if self.pot_plain_non_finite:
                out["pot_plain_non_finite"] = list(self.pot_plain_non_finite)
            if self.sinkhorn_escaped:
                reason = ("potentials spread wider than the Triton layout's gaps" if self.sinkhorn_solver == "triton"
                          else "values left the plain range [1e-100, 1e100]")
                handover = {"tensors": list(self.sinkhorn_escaped), "reason": reason}
                if self.sinkhorn_escaped_to == "wide":
                    out["sinkhorn_wide_range"] = handover  # same iterate, compiled, an exponent per value
                else:
                    out["sinkhorn_log_domain"] = handover
        return out


def check_models(models: Sequence[Model]) -> list[str]:
    """Keys of the models; ``ValueError`` unless all have the same keys, shapes, dtypes."""
    if len(models) == 0:
        raise ValueError("nothing to fuse: no models")
    keys = list(models[0].keys())
    for idx, m in enumerate(models[1:], start=1):
        if set(m.keys()) != set(keys):
            diff = sorted(set(m.keys()) ^ set(keys))
            raise ValueError(f"model {idx} has different tensors than model 0: {diff[:5]}")
        for name in keys:
            (sa, da), (sb, db) = tensor_meta(models[0], name), tensor_meta(m, name)
            if sa != sb or da != db:
                raise ValueError(f"tensor {name!r}: model {idx} has {db}{list(sb)}, model 0 has {da}{list(sa)}")
    return keys


@dataclass
class _Prepared:
    """One tensor's FedWB inputs: histograms of the non-constant models and the rescaling."""

    name: str
    hists: torch.Tensor | None  # (K', n) float64, rows a_k = S_k / s_k of the models with s_k > 0
    sub_lam: torch.Tensor | None  # (K',) weights of those rows, normalized
    scale: float  # sum_k lambda_k s_k
    shift: float  # sum_k lambda_k m_k
    n: int


def _prepare(name: str, rows: torch.Tensor, lam_t: torch.Tensor) -> _Prepared:
    """Min-shift and normalize the K flattened tensors ``rows`` (K, n) into histograms."""
    x = rows.to(torch.float64)
    mins = x.amin(dim=1)
    shifted = x - mins[:, None]
    totals = shifted.sum(dim=1)
    scale, shift = float((lam_t * totals).sum()), float((lam_t * mins).sum())
    keep = totals > 0
    if not bool(keep.any()):
        return _Prepared(name, None, None, scale, shift, rows.shape[1])
    sub_lam = lam_t[keep] / lam_t[keep].sum()
    return _Prepared(name, shifted[keep] / totals[keep, None], sub_lam, scale, shift, rows.shape[1])


def _finish(p: _Prepared, b: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """:math:`W = b \\sum_k \\lambda_k s_k + \\sum_k \\lambda_k m_k` (the shift alone when all are constant)."""
    if b is None:
        return torch.full((p.n,), p.shift, dtype=torch.float64, device=device)
    return b.to(torch.float64).mul(p.scale).add_(p.shift)


def _fedwb_exact(rows: torch.Tensor, lam: list[float]) -> torch.Tensor:
    """Exact FedWB of the K flattened tensors ``rows`` (K, n); returns float64 (n,)."""
    lam_t = torch.tensor(lam, dtype=torch.float64, device=rows.device)
    if rows.device.type == "cpu" and _bary.numba is not None:  # one fused pass: minima and running sums
        src = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
        cum, mins_np = _bary._shifted_cumsum(np.ascontiguousarray(src.numpy()))
        mins, totals = torch.from_numpy(mins_np.astype(np.float64)), torch.from_numpy(cum[:, -1].copy())
        scale, shift = float((lam_t * totals).sum()), float((lam_t * mins).sum())
        keep = totals > 0
        if not bool(keep.any()):
            return torch.full((rows.shape[1],), shift, dtype=torch.float64)
        sub_lam = lam_t[keep] / lam_t[keep].sum()
        kept = np.ascontiguousarray(cum[keep.numpy()])
        b = torch.from_numpy(_bary._merge_barycenter(kept, sub_lam.numpy(), _bary._n_chunks(kept.size)))
        return b.mul_(scale).add_(shift)
    p = _prepare("", rows, lam_t)
    b = None if p.hists is None else _bary.barycenter_1d(p.hists, p.sub_lam)
    return _finish(p, b, rows.device)


def pick_solver(solver: str, device: torch.device, k_rows: int = 0) -> str:
    """The entropic solver that runs for ``solver`` on ``device`` with ``k_rows`` models.

    ``auto``: the compiled plain-domain solver on CPU, the Triton one on CUDA, the torch plain
    one elsewhere. A named solver that cannot run here gives way to the same iterate where it
    can: ``plain`` and ``wide`` are CPU-only; ``triton`` needs CUDA (or Triton's interpreter) and K rows that
    fit one of its tiles.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown entropic solver {solver!r}: use one of {', '.join(SOLVERS)}")
    if solver == "auto":
        if device.type == "cpu" and _fast.available():
            return "plain"
        solver = "triton" if device.type == "cuda" and _triton_solver.available() else "plain-torch"
    if solver in ("plain", "wide") and (device.type != "cpu" or not _fast.available()):
        solver = "plain-torch"  # the compiled kernels are CPU-only; same iterate on the device
    if solver == "triton" and k_rows > _triton_solver.MAX_ROWS:
        solver = "plain-torch"  # a Triton program holds all K rows of its tile
    if solver == "triton" and not _triton_solver.runs_on(device):
        solver = "plain" if device.type == "cpu" and _fast.available() else "plain-torch"  # same iterate
    return solver


def _pot_plain(hists: torch.Tensor, lam: torch.Tensor, *, reg: float, stop_threshold: float,
               max_iter: int) -> tuple[torch.Tensor, bool]:
    """The authors' exact call: POT's plain (not log-domain) Sinkhorn barycenter on the dense cost.

    ``ot.bregman.barycenter(A, M, reg, weights)`` with method "sinkhorn" overflows at small
    ``reg``; its result is returned as is, with ``False`` when it is not finite (reported per
    tensor, never silenced). For studies only: O(n^2) memory, CPU.
    """
    import ot

    n = hists.shape[1]
    if n > POT_PLAIN_MAX_N:
        raise ValueError(f"solver pot-plain needs an n x n cost matrix: tensor of {n} weights is over "
                         f"{POT_PLAIN_MAX_N}; use solver plain or log")
    grid = np.arange(n, dtype=np.float64)
    cost = (grid[:, None] - grid[None, :]) ** 2
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        b = ot.bregman.barycenter(hists.cpu().numpy().T, cost, reg, weights=lam.cpu().numpy(), method="sinkhorn",
                                  numItermax=max_iter, stopThr=stop_threshold)
    b = torch.from_numpy(np.asarray(b, dtype=np.float64))
    return b, bool(torch.isfinite(b).all())


def _continue_wide(hists: torch.Tensor, lam: torch.Tensor, v: torch.Tensor, start: int,
                   kw: dict[str, Any]) -> tuple[torch.Tensor, tuple[int, float, bool]]:
    """The entropic iterate from scalings ``v`` at iteration ``start`` with ``sinkhorn_wide`` (CPU)."""
    res = _wide.wide_barycenter(hists.cpu().numpy(), lam.cpu().numpy(), v.cpu().numpy(), start, **kw)
    return torch.from_numpy(res.b), (res.iterations, res.error, res.converged)


def _fedwb_sinkhorn_all(prepared: list[_Prepared], opts: dict[str, Any], report: FusionReport,
                        device: torch.device) -> dict[str, torch.Tensor]:
    """Entropic FedWB of every prepared tensor: one solve per group of tensors with the same rows."""
    k_rows = max((p.hists.shape[0] for p in prepared if p.hists is not None), default=0)
    solver = pick_solver(opts["solver"], device, k_rows)
    report.sinkhorn_solver = solver
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[_Prepared]] = {}
    for p in prepared:
        if p.hists is None:
            out[p.name] = _finish(p, None, device)
        else:
            groups.setdefault(tuple(p.sub_lam.tolist()), []).append(p)
    kw = {"reg": opts["reg"], "stop_threshold": opts["stop_threshold"], "max_iter": opts["max_iter"]}
    for members in groups.values():
        lam = members[0].sub_lam
        if solver == "pot-plain":
            bs, infos = [], []
            for p in members:
                b, ok = _pot_plain(p.hists, lam, **kw)
                if not ok:
                    report.pot_plain_non_finite.append(p.name)
                bs.append(b)
                infos.append((opts["max_iter"], math.nan, False))
        elif solver == "log":
            results = [sinkhorn_barycenter_1d(p.hists, lam, warn=False, **kw) for p in members]
            bs = [b for b, _ in results]
            infos = [(i.iterations, i.error, i.converged) for _, i in results]
        elif solver == "wide":
            bs, infos = [], []
            for p in members:
                b, info = _continue_wide(p.hists, lam, torch.ones_like(p.hists, dtype=torch.float64), 0, kw)
                bs.append(b)
                infos.append(info)
        else:
            if solver == "plain":
                raw, segs, vs = _fast.plain_barycenters([p.hists.cpu().numpy() for p in members],
                                                        lam.cpu().numpy(), **kw)
                bs = [torch.from_numpy(b) for b in raw]
                vs = [None if v is None else torch.from_numpy(v) for v in vs]
            elif solver == "triton":
                bs, segs, vs = _triton_solver.barycenters_triton([p.hists for p in members], lam, **kw)
            else:
                bs, segs, vs = _torch_solver.plain_barycenters_torch([p.hists for p in members], lam, **kw)
            infos = []
            for idx, (p, seg, v) in enumerate(zip(members, segs, vs, strict=True)):
                if v is not None:  # values left the plain range: continue the same iterate without that range
                    report.sinkhorn_escaped.append(p.name)
                    if device.type == "cpu" and _wide.available():
                        report.sinkhorn_escaped_to = "wide"
                        bs[idx], info = _continue_wide(p.hists, lam, v, seg.escaped_at, kw)
                        infos.append(info)
                        continue
                    report.sinkhorn_escaped_to = "log"
                    bs[idx], log_info = sinkhorn_barycenter_1d(p.hists, lam, warn=False,
                                                               log_v0=torch.log(v.to(device)),
                                                               start=seg.escaped_at, **kw)
                    infos.append((log_info.iterations, log_info.error, log_info.converged))
                else:
                    infos.append((seg.iterations, seg.error, seg.converged))
        for p, b, (iterations, error, converged) in zip(members, bs, infos, strict=True):
            if opts["renormalize"]:
                b = b / b.sum()
            report.sinkhorn_iterations = max(report.sinkhorn_iterations, iterations)
            report.sinkhorn_error = max(report.sinkhorn_error, error)
            report.sinkhorn_converged = report.sinkhorn_converged and converged
            out[p.name] = _finish(p, b.to(device), device)
    if not report.sinkhorn_converged and opts["warn"]:
        warnings.warn(f"entropic barycenter did not converge in {opts['max_iter']} iterations "
                      f"(error {report.sinkhorn_error:.3g} > {opts['stop_threshold']:g}); raise max_iter or reg",
                      RuntimeWarning, stacklevel=3)
    return out


def fuse_with_report(models: Sequence[Model], weights: Sequence[float] | torch.Tensor,
                     method: str = "fedavg", *, reg: float = 0.1, stop_threshold: float = 1e-4,
                     max_iter: int = 1000, biases: Literal["fedwb", "fedavg"] = "fedwb",
                     newest: int | None = None, device: str | torch.device | None = None,
                     warn: bool = True, renormalize: bool = False, solver: str = "auto",
                     **method_options: Any) -> tuple[dict[str, torch.Tensor], FusionReport]:
    """``fuse`` that also returns a ``FusionReport`` (rules used, solver iterations, time)."""
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}: use one of {', '.join(METHODS)}")
    if biases not in ("fedwb", "fedavg"):
        raise ValueError(f"biases must be 'fedwb' or 'fedavg', got {biases!r}")
    unknown = sorted(set(method_options) - MODEL_LEVEL_OPTIONS)
    if unknown:
        raise ValueError(f"unknown fusion option {unknown[0]!r}")
    if not (reg > 0 and math.isfinite(reg)):
        raise ValueError(f"reg must be positive and finite, got {reg!r}")
    keys = check_models(models)
    lam = normalize_weights(weights, len(models))
    newest_idx = len(models) - 1 if newest is None else newest
    if not -len(models) <= newest_idx < len(models):
        raise ValueError(f"newest={newest} is out of range for {len(models)} models")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not (stop_threshold >= 0 and math.isfinite(stop_threshold)):
        raise ValueError(f"stop_threshold must be non-negative and finite, got {stop_threshold!r}")
    pick_solver(solver, torch.device("cpu"))  # validates the name
    opts = {"reg": reg, "stop_threshold": stop_threshold, "max_iter": max_iter, "warn": warn,
            "renormalize": renormalize, "solver": solver}
    start = time.perf_counter()
    report = FusionReport(method=method)
    model_level = registry.get(method)
    if model_level is not None:  # e.g. fedwb-neurons: the whole model at once
        fused, info = model_level(models, lam, {**method_options, "newest": newest_idx})
        report.model_level = info
        report.rules = {"fedavg" if "fallback" in info else method: len(keys)}
        report.seconds = time.perf_counter() - start
        return fused, report
    out: dict[str, torch.Tensor] = {}
    pending: list[_Prepared] = []  # entropic tensors, solved together after the loop
    target = torch.device("cpu")
    for name in keys:
        shape, dtype = tensor_meta(models[0], name)  # a file-backed model is read only for the math below
        home = tensor_device(models[0], name)
        target = torch.device(device) if device is not None else home
        report.device = str(target)
        if not (dtype.is_floating_point or dtype.is_complex):
            rule, fused = "newest", models[newest_idx][name].clone()
        elif method == "fedavg" or math.prod(shape) < 2 or (len(shape) <= 1 and biases == "fedavg"):
            rule = "fedavg"  # one model's tensor at a time: K file-backed updates cost one tensor, not K
            fused = fedavg_tensor((m[name].to(target) for m in models), lam).to(home)
        else:
            rule = method
            rows = torch.stack([m[name].reshape(-1).to(target) for m in models])
            if method == "fedwb":
                fused = _fedwb_exact(rows, lam)
            else:
                pending.append(_prepare(name, rows, torch.tensor(lam, dtype=torch.float64, device=target)))
                fused = None
        report.rules[rule] = report.rules.get(rule, 0) + 1
        out[name] = fused
    if pending:
        for name, fused in _fedwb_sinkhorn_all(pending, opts, report, target).items():
            first = models[0][name]
            out[name] = fused.to(dtype=first.dtype, device=first.device).reshape(first.shape)
    for name in keys:
        shape, dtype = tensor_meta(models[0], name)  # without reading a file-backed model again
        if out[name].dtype != dtype or tuple(out[name].shape) != shape:  # exact FedWB results (float64, flat)
            first = models[0][name]
            out[name] = out[name].to(dtype=first.dtype, device=first.device).reshape(first.shape)
    report.seconds = time.perf_counter() - start
    return out, report


def fuse(models: Sequence[Model], weights: Sequence[float] | torch.Tensor,
         method: str = "fedavg", **options: Any) -> dict[str, torch.Tensor]:
    """Fuse ``models`` with non-negative ``weights`` (normalized inside) by ``method``.

    ``method``: ``"fedavg"``, ``"fedwb"`` (exact barycenter) or ``"fedwb-sinkhorn"``
    (entropic; options ``reg`` = 0.1, ``stop_threshold`` = 1e-4, ``max_iter`` = 1000).
    ``renormalize`` rescales the entropic barycenter to unit mass; off by default, as
    POT and the paper, so an unconverged ``b`` (mass ``1 - e``) scales the tensor by ``1 - e``.
    Other options: ``biases`` ("fedwb" | "fedavg"), ``newest`` (index of the newest
    model, for integer tensors), ``device`` (where to compute). See the module docstring.
    """
    fused, _ = fuse_with_report(models, weights, method, **options)
    return fused
