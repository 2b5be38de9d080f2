r"""Exact 2-Wasserstein barycenter of histograms on the grid ``0..n-1``.

Problem. Given K histograms :math:`a_k \in \Delta_n` on the grid :math:`x_i = i` with
cost :math:`c(i, j) = (i - j)^2` and weights :math:`\lambda_k \ge 0`,
:math:`\sum_k \lambda_k = 1`, find

.. math::
    b^\star = \arg\min_{b \in \Delta_n} \sum_k \lambda_k W_2^2(b, a_k).

In one dimension :math:`W_2^2(p, q) = \int_0^1 (F_p^{-1}(t) - F_q^{-1}(t))^2 dt`, so the
objective is :math:`\int_0^1 (F_b^{-1} - \bar Q)^2 dt` plus a constant, where

.. math::
    \bar Q(t) = \sum_k \lambda_k F_{a_k}^{-1}(t)

is the quantile function of the free-support barycenter [1]. Restricted to the grid,
the minimizer is obtained pointwise: :math:`F_b^{-1}(t) = \mathrm{round}(\bar Q(t))`,
which is non-decreasing because :math:`\bar Q` is. :math:`\bar Q` is piecewise constant
between the merged CDF breakpoints :math:`\{F_{a_k}(i)\}`; crossing a breakpoint of row
k moves that row's quantile one grid step up, i.e. adds :math:`\lambda_k` to
:math:`\bar Q`. So one merge of the K sorted CDFs, a running sum of weights and a
nearest-grid rounding give :math:`b^\star` exactly; this equals the fixed-support LP
barycenter (``ot.lp.barycenter`` with the same cost) in objective.

Cost: O(Kn log K) time with the compiled K-way merge used on CPU (numba), O(Kn log Kn)
with the one-sort path used on other devices; O(Kn) memory. CDFs are float64.

[1] Agueh, M., Carlier, G. (2011). Barycenters in the Wasserstein space. SIAM J. Math. Anal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

try:  # numba compiles the CPU merge; without it the sort path is used everywhere.
    import numba

    _njit = numba.njit(cache=True, nogil=True)
    _njit_parallel = numba.njit(cache=True, nogil=True, parallel=True)
except ImportError:  # pragma: no cover
    numba = None

    def _njit(f):  # type: ignore[no-redef]
        return f

    _njit_parallel = _njit


@_njit
def _nearest(x: float, n: int) -> int:
    i = int(x + 0.5)
    return 0 if i < 0 else (n - 1 if i > n - 1 else i)


@_njit
def _merge_chunk(cum, inv, lam, t0, t1, b, c, side_g, side_m):  # pragma: no cover - compiled
    r"""Merge the rows' breakpoints that fall in ``(t0, t1]`` and deposit their mass.

    ``cum[k]`` is row k's unnormalized CDF and ``inv[k]`` its inverse total, so
    :math:`F_k(i) = cum[k, i] \cdot inv[k]`. A small circular buffer keeps the K next
    breakpoints sorted: rows advance in turn, so a new breakpoint lands near the tail.
    Cells strictly inside this chunk's range of grid cells belong to it alone; its first
    and last cells go to ``side_g/side_m`` and are added after all chunks finish.
    """
    k_rows, n = cum.shape
    pos = np.empty(k_rows, np.int64)
    buf_t = np.empty(k_rows)
    buf_k = np.empty(k_rows, np.int64)
    x = 0.0
    for k in range(k_rows):
        lo, hi = 0, n - 1  # first i with F_k(i) > t0: the quantile just above t0
        while lo < hi:
            mid = (lo + hi) // 2
            if cum[k, mid] * inv[k] > t0:
                hi = mid
            else:
                lo = mid + 1
        pos[k] = lo
        x += lam[k] * lo
        t_next = cum[k, lo] * inv[k] if lo < n - 1 else np.inf
        j = k  # insertion sort of the initial breakpoints
        while j > 0 and buf_t[j - 1] > t_next:
            buf_t[j] = buf_t[j - 1]
            buf_k[j] = buf_k[j - 1]
            j -= 1
        buf_t[j] = t_next
        buf_k[j] = k
    head = 0
    x_err = 0.0
    t_prev = t0
    g_cur = _nearest(x, n)
    m_cur = 0.0
    first = True
    while True:
        t_ev = buf_t[head]
        if t_ev >= t1:
            break
        k = buf_k[head]
        m_cur += t_ev - t_prev
        t_prev = t_ev
        p = pos[k]
        q = p + 1
        while q < n - 1 and cum[k, q] <= cum[k, p]:  # zero bins are crossed in one step
            q += 1
        y = lam[k] * (q - p) - x_err  # Kahan: x stays exact to an ulp over 10^7 steps
        x_new = x + y
        x_err = (x_new - x) - y
        x = x_new
        pos[k] = q
        g_new = _nearest(x, n)
        if g_new != g_cur:
            if first:
                side_g[2 * c] = g_cur
                side_m[2 * c] = m_cur
                first = False
            else:
                b[g_cur] += m_cur
            g_cur = g_new
            m_cur = 0.0
        t_new = cum[k, q] * inv[k] if q < n - 1 else np.inf
        head += 1
        if head == k_rows:
            head = 0
        j = k_rows - 1  # logical tail; the popped slot is free there
        while j > 0:
            src = head + j - 1
            if src >= k_rows:
                src -= k_rows
            if buf_t[src] <= t_new:
                break
            dst = src + 1
            if dst >= k_rows:
                dst -= k_rows
            buf_t[dst] = buf_t[src]
            buf_k[dst] = buf_k[src]
            j -= 1
        dst = head + j
        if dst >= k_rows:
            dst -= k_rows
        buf_t[dst] = t_new
        buf_k[dst] = k
    m_cur += t1 - t_prev
    side_g[2 * c + 1] = g_cur
    side_m[2 * c + 1] = m_cur


@_njit_parallel
def _merge_barycenter(cum, lam, n_chunks):  # pragma: no cover - compiled
    """Barycenter from unnormalized CDF rows ``cum`` (K, n), in ``n_chunks`` parallel pieces."""
    k_rows, n = cum.shape
    inv = np.empty(k_rows)
    for k in range(k_rows):
        inv[k] = 1.0 / cum[k, n - 1]
    b = np.zeros(n)
    side_g = np.zeros(2 * n_chunks, np.int64)
    side_m = np.zeros(2 * n_chunks)
    for c in numba.prange(n_chunks):
        t0 = c / n_chunks
        t1 = 1.0 if c == n_chunks - 1 else (c + 1) / n_chunks
        _merge_chunk(cum, inv, lam, t0, t1, b, c, side_g, side_m)
    for j in range(2 * n_chunks):
        b[side_g[j]] += side_m[j]
    return b


@_njit_parallel
def _shifted_cumsum(w):  # pragma: no cover - compiled
    r"""Per row: :math:`m_k = \min W_k` and the running sum of :math:`W_k - m_k` (float64)."""
    k_rows, n = w.shape
    cum = np.empty((k_rows, n))
    mins = np.empty(k_rows)
    for k in numba.prange(k_rows):
        mn = w[k, 0]
        for i in range(n):
            if w[k, i] < mn:
                mn = w[k, i]
        mins[k] = mn
        acc = 0.0
        base = np.float64(mn)
        for i in range(n):
            acc += np.float64(w[k, i]) - base
            cum[k, i] = acc
    return cum, mins


def _n_chunks(size: int) -> int:
    if numba is None or size < 200_000:
        return 1
    return 4 * numba.get_num_threads()


def _cumsum_blocked(v: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Prefix sums with error ~sqrt(len) ulps instead of len: sums within blocks, then of blocks."""
    n = v.numel()
    pad = (-n) % block
    blocks = torch.cat([v, v.new_zeros(pad)]).reshape(-1, block)
    inner = torch.cumsum(blocks, dim=1)
    offsets = torch.cumsum(inner[:, -1], dim=0) - inner[:, -1]
    return (inner + offsets[:, None]).reshape(-1)[:n]


def _sort_barycenter(a: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Same result by one sort of all K(n-1) breakpoints (fast on GPUs)."""
    k_rows, n = a.shape
    cdf = torch.cumsum(a, dim=1)
    cdf = cdf / cdf[:, -1:]
    t = cdf[:, :-1].reshape(-1)
    step = lam.repeat_interleave(n - 1)
    t_sorted, order = torch.sort(t, stable=True)
    x = _cumsum_blocked(step[order])
    zero = torch.zeros(1, dtype=a.dtype, device=a.device)
    one = torch.ones(1, dtype=a.dtype, device=a.device)
    mass = torch.diff(torch.cat([zero, t_sorted, one])).clamp_min_(0.0)
    at = torch.cat([zero, x])
    idx = torch.floor(at + 0.5).clamp_(0, n - 1).long()
    return torch.zeros(n, dtype=a.dtype, device=a.device).scatter_add_(0, idx, mass)


def _check_hists(hists: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    if not isinstance(hists, torch.Tensor) or hists.ndim != 2:
        raise ValueError("hists must be a (K, n) tensor")
    k_rows, n = hists.shape
    if k_rows < 1 or n < 1:
        raise ValueError(f"hists must be non-empty, got shape {tuple(hists.shape)}")
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).cpu()
    if w.numel() != k_rows:
        raise ValueError(f"got {w.numel()} weights for {k_rows} histograms")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def barycenter_1d(hists: torch.Tensor, weights: Sequence[float] | torch.Tensor, *,
                  method: str = "auto") -> torch.Tensor:
    r"""Exact :math:`W_2` barycenter of the rows of ``hists`` on the grid ``0..n-1``.

    Parameters
    ----------
    hists : (K, n) tensor
        Non-negative histograms; each row is normalized to unit mass (float64).
    weights : (K,) sequence
        Barycentric weights :math:`\lambda_k \ge 0`, normalized inside.
    method : {"auto", "merge", "sort"}
        ``merge``: compiled K-way merge on CPU; ``sort``: one torch sort on the tensors'
        device; ``auto``: merge for CPU tensors, sort elsewhere.

    Returns
    -------
    b : (n,) tensor with the dtype and device of ``hists``, non-negative, summing to 1.
    """
    lam = _check_hists(hists, weights)
    a = hists.detach().to(torch.float64).clamp_min(0.0)
    mass = a.sum(dim=1, keepdim=True)
    if bool((mass <= 0).any()) or not bool(torch.isfinite(mass).all()):
        raise ValueError("every histogram needs positive, finite mass")
    a = a / mass
    if method == "auto":
        method = "merge" if a.device.type == "cpu" and numba is not None else "sort"
    if method == "merge":
        cum = np.cumsum(a.cpu().numpy(), axis=1)
        b = torch.from_numpy(_merge_barycenter(cum, lam.numpy(), _n_chunks(cum.size))).to(a.device)
    elif method == "sort":
        b = _sort_barycenter(a, lam.to(a.device))
    else:
        raise ValueError(f"unknown barycenter method {method!r}: use auto, merge or sort")
    return b.to(hists.dtype)


def barycenter_objective(b: torch.Tensor, hists: torch.Tensor,
                         weights: Sequence[float] | torch.Tensor) -> float:
    r""":math:`\sum_k \lambda_k W_2^2(b, a_k)` on the grid, via quantile functions."""
    lam = _check_hists(hists, weights)
    rows = torch.cat([b.reshape(1, -1), hists]).to(torch.float64).cpu()
    rows = rows / rows.sum(dim=1, keepdim=True)
    cdf = torch.cumsum(rows, dim=1)
    cdf = cdf / cdf[:, -1:]
    ts = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), cdf.reshape(-1)]).clamp(0, 1))
    mid = (ts[:-1] + ts[1:]) / 2
    width = ts[1:] - ts[:-1]
    quant = torch.stack([torch.searchsorted(c.contiguous(), mid) for c in cdf]).to(torch.float64)
    quant = quant.clamp_max(rows.shape[1] - 1)
    sq = (quant[1:] - quant[0]) ** 2
    return float((lam[:, None] * sq * width[None]).sum())
