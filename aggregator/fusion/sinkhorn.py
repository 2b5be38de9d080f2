r"""Entropic 2-Wasserstein barycenter on a 1-D grid without any n x n matrix.

Problem (the paper's variant, as POT's ``ot.bregman.barycenter``): for histograms
:math:`a_k` on the grid ``0..n-1``, cost :math:`M_{ij} = (i-j)^2` (unnormalized) and
regularization :math:`\varepsilon` (``reg``),

.. math::
    b = \arg\min_b \sum_k \lambda_k \, \mathrm{OT}_\varepsilon(b, a_k), \qquad
    \mathrm{OT}_\varepsilon(b, a) = \min_{P \in U(b, a)} \langle P, M \rangle
        - \varepsilon H(P),

solved by iterative Bregman projections [1] in the log domain, step for step as POT's
``_barycenter_sinkhorn_log``:

.. math::
    f_k = \log a_k - \mathrm{LSE}_j(-M_{ij}/\varepsilon + G_{kj}), \quad
    \ell_k = \mathrm{LSE}_i(-M_{ij}/\varepsilon + f_{ki}), \quad
    \log b = \sum_k \lambda_k \ell_k, \quad G_k = \log b - \ell_k.

The Gibbs kernel :math:`K_{ij} = e^{-(i-j)^2/\varepsilon}` is a Gaussian convolution,
so each log-sum-exp is a band convolution: the terms with :math:`|i-j| > D` are left
out, where the half-width :math:`D` is sized from the spread of the potentials,

.. math::
    (D+1)^2 \ge \varepsilon\,(\max g - \min g + \log 2n + 40),

which bounds the neglected mass by :math:`e^{-40}` relative to the term :math:`j = i`
(every output is at least :math:`e^{g_i}`). When potentials spread (mass must travel
far), the band widens by itself. Memory is O(Kn); time O(K n D) per iteration.

Stopping: as POT, every 10th iteration (at ``ii % 10 == 1``) the error
:math:`\sum_i \mathrm{std}_k(e^{G_{ki} + \ell_{ki}})` is compared with ``stop_threshold``.

[1] Benamou, J.-D., Carlier, G., Cuturi, M., Nenna, L., Peyre, G. (2015). Iterative
    Bregman projections for regularized transportation problems. SIAM J. Sci. Comput.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOG_FLOOR = 1e-16  # POT adds this to A before the log
_FAST_SPREAD = 600.0  # exp(-600) is still a normal float64


@dataclass(frozen=True)
class SinkhornInfo:
    """What one entropic barycenter computation did."""

    iterations: int
    error: float
    converged: bool
    band: int


def band_halfwidth(reg: float, spread: float, n: int) -> int:
    """Half-width D of the kernel band that keeps the left-out mass below e^-40."""
    need = reg * (max(spread, 0.0) + math.log(2 * n) + 40.0)
    return int(min(n - 1, max(0, math.ceil(math.sqrt(need)) - 1)))


def log_kernel_bound(reg: float) -> float:
    r"""An upper bound on the log of the kernel's total weight :math:`\sum_d e^{-d^2/\varepsilon}`."""
    return math.log(1 + 2 * math.sqrt(math.pi * reg)) + 1.0


def log_gauss_conv(g: torch.Tensor, reg: float) -> tuple[torch.Tensor, int]:
    r"""Row-wise :math:`\mathrm{LSE}_j(g_j - (i-j)^2/\varepsilon)` for a (K, n) float64 tensor."""
    n = g.shape[1]
    hi = g.amax(dim=1, keepdim=True)
    spread = float((hi - g.amin(dim=1, keepdim=True)).max())
    band = band_halfwidth(reg, spread, n)
    if spread <= _FAST_SPREAD:
        e = torch.exp(g - hi)
        acc = e.clone()
        for d in range(1, band + 1):
            w = math.exp(-d * d / reg)
            if w == 0.0:
                break
            acc[:, d:].add_(e[:, :-d], alpha=w)
            acc[:, :-d].add_(e[:, d:], alpha=w)
        return torch.log(acc).add_(hi), band
    # Potentials too spread for one reference: exact two-pass LSE over the band.
    m = g.clone()
    for d in range(1, band + 1):
        c = d * d / reg
        torch.maximum(m[:, d:], g[:, :-d] - c, out=m[:, d:])
        torch.maximum(m[:, :-d], g[:, d:] - c, out=m[:, :-d])
    acc = torch.exp(g - m)
    for d in range(1, band + 1):
        c = d * d / reg
        acc[:, d:] += torch.exp(g[:, :-d] - c - m[:, d:])
        acc[:, :-d] += torch.exp(g[:, d:] - c - m[:, :-d])
    return torch.log(acc).add_(m), band


def sinkhorn_barycenter_1d(hists: torch.Tensor, weights: Sequence[float] | torch.Tensor, *,
                           reg: float = 0.1, stop_threshold: float = 1e-4, max_iter: int = 1000,
                           warn: bool = True, log_v0: torch.Tensor | None = None,
                           start: int = 0) -> tuple[torch.Tensor, SinkhornInfo]:
    r"""Entropic barycenter of the rows of ``hists`` (K, n) on the grid ``0..n-1``.

    ``reg`` is :math:`\varepsilon` in units of the unnormalized cost :math:`(i-j)^2`;
    ``stop_threshold`` and ``max_iter`` are POT's ``stopThr`` and ``numItermax``.
    Returns :math:`b = \exp(\sum_k \lambda_k \ell_k)` (not renormalized, as POT) in the
    dtype and device of ``hists``, and a ``SinkhornInfo``. Warns when not converged:
    raise ``max_iter`` or ``reg``. ``log_v0`` (K, n) and ``start`` continue an iterate
    from :math:`G = \log v` at iteration ``start`` (the plain-domain solver hands over
    this way when its values leave its range).
    """
    if not isinstance(hists, torch.Tensor) or hists.ndim != 2:
        raise ValueError("hists must be a (K, n) tensor")
    if not (reg > 0 and math.isfinite(reg)):
        raise ValueError(f"reg must be positive and finite, got {reg!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    k_rows, n = hists.shape
    lam = torch.as_tensor(weights, dtype=torch.float64, device=hists.device).reshape(-1)
    if lam.numel() != k_rows or bool((lam < 0).any()) or float(lam.sum()) <= 0:
        raise ValueError("weights must be K non-negative numbers, not all zero")
    lam = (lam / lam.sum())[:, None]
    a = hists.detach().to(torch.float64)
    log_a = torch.log(a + LOG_FLOOR)
    g = torch.zeros_like(log_a) if log_v0 is None else log_v0.to(log_a)
    err, band, converged = math.inf, 0, False
    ii = start
    log_bar = g[0]
    for ii in range(start, max_iter):
        conv_g, b1 = log_gauss_conv(g, reg)
        f = log_a - conv_g
        log_ku, b2 = log_gauss_conv(f, reg)
        band = max(band, b1, b2)
        log_bar = (lam * log_ku).sum(dim=0)
        if ii % 10 == 1:
            err = float(torch.exp(g + log_ku).std(dim=0, unbiased=False).sum())
            if err < stop_threshold:
                converged = True
                break
        g = log_bar[None, :] - log_ku
    if not converged and warn:
        warnings.warn(f"entropic barycenter did not converge in {max_iter} iterations "
                      f"(error {err:.3g} > {stop_threshold:g}); raise max_iter or reg",
                      RuntimeWarning, stacklevel=2)
    info = SinkhornInfo(iterations=ii + 1, error=err, converged=converged, band=band)
    return torch.exp(log_bar).to(hists.dtype), info
