r"""The entropic barycenter iterate as two fused Triton kernels per iteration (GPU).

Same iterate as :mod:`aggregator.fusion.sinkhorn_torch` and
:func:`aggregator.fusion.sinkhorn.sinkhorn_barycenter_1d` (POT's ``sinkhorn_log``), for all
tensors of a model at once, in the layout of :mod:`aggregator.fusion.sinkhorn_torch`
(segments in one (K, L) array, gaps between them, so a band never mixes two tensors).

Plain domain first: kernel ``_plain_u`` computes :math:`u = (a + 10^{-16}) / K v` over the
flattened array; ``_plain_v`` computes :math:`\log b = \sum_k \lambda_k \log (K u_k)` and
:math:`v_k = b / K u_k` on live points (K u recomputed, not stored), POT's stopping error at
check iterations and v's range. From the block where v would leave ``[1e-200, 1e200]``, the
same iterate continues in the log domain from :math:`G = \log v`:

.. math::
    f_k = \log a_k - \mathrm{LSE}_{|d| \le D_v}(G_{k,i+d} - d^2/\varepsilon), \qquad
    \ell_k = \mathrm{LSE}_{|d| \le D_u}(f_{k,i+d} - d^2/\varepsilon), \qquad
    \log b = \sum_k \lambda_k \ell_k, \qquad G_k = \log b - \ell_k,

with bands up to ``WINDOW_BAND``, kernel ``_lse_rows`` (row by row, twice: f, then l) and
``_log_update`` for the rest: each program exponentiates its window of ``WINDOW`` points once
against the window's maximum and sums the band from a private scratch row (one exponential per
point instead of one per term; a point whose band sum falls below ``e^LOG_TINY``, i.e. lies more
than ~667 nats beneath its window's maximum, is recomputed exactly). Wider bands: kernel
``_lse_f`` for :math:`f` and ``_lse_g`` for the rest (in place; each program touches its own
points only), each LSE exact in two passes (max, then sum of exponentials). No value can under-
or overflow on either path. Bands are sized from the range promised for the block and
checked at its end, as in the torch solver; the plain kernels unroll the inner band
(``|d| <= UNROLL``) so its loads are in flight together. A tensor is handed to the torch log
solver only if its potentials spread beyond the gaps.

Long blocks: a block spans up to ``LONG_CHECKS`` of POT's 10-iteration check periods (one
CUDA graph, one read-back), its errors kept per check; a segment that met the threshold at a
check inside the block has the block redone to end there, so stopping is POT's to the
iteration. Blocks double while the potentials' drift in the last block, extrapolated, stays
within half the band's margin; a block that breaks its promise is redone short. Measured on an
H200 (docs/benchmarks.md): the read-backs of 10-iteration blocks were ~60 % of a 1,000-iteration
MLP solve.

State cache: the aggregator fuses the same shapes every round, so the solver's tensors and their
captured CUDA graphs are kept (``CACHED_LAYOUTS`` layouts) and reset for the next solve.

On CPU tensors the kernels run in Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from aggregator.fusion.sinkhorn import band_halfwidth, log_kernel_bound
from aggregator.fusion.sinkhorn_fast import MARGIN, SegmentResult
from aggregator.fusion.sinkhorn_torch import (
    Layout,
    SegmentBlocks,
    SegmentProgress,
    layout,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with torch's Linux wheels
    triton = None

# Compiled for the GPU, or run by Triton's interpreter when TRITON_INTERPRET=1 was set before triton loaded.
_jit = triton.jit if triton is not None else (lambda fn: fn)

MAX_ROWS = 64  # K above this: the torch solvers (a program holds all K rows of its tile)
GAP_SPREAD = 1e6  # the gaps fit the band for potentials spread this far (else: the torch log solver)
LONG_CHECKS = 10  # a block spans up to this many of POT's check periods (10 iterations each)
UNROLL = 5  # plain kernels: band offsets |d| <= this are unrolled (compile-time), wider ones looped
CACHED_LAYOUTS = 2  # solver states (and their captured CUDA graphs) kept for the next fusion of the same shapes
CACHED_BYTES = 2**30  # a state holding more device memory than this is freed after its solve
WINDOW = 1024  # log kernels: points a program exponentiates once (its columns and the band on both sides)
WINDOW_BAND = 64  # log kernels: bands up to this use the windowed LSE (one exponential per point), wider the exact
# The plain kernels' range for v (the CPU solver's [1e-100, 1e100] guards against x86's slow subnormals, which a
# GPU does not have). Every value a kept block forms stays a normal double: with v in [1e-200, 1e200], a in
# [1e-16, 1] and kernel weights w_0 = 1 >= w_d summing to W < 1 + 2 sqrt(pi reg), K v lies in [1e-200, W 1e200],
# u = a / K v in [1e-216 / W, 1e200], K u in [1e-216 / W, W 1e200] and b, their weighted geometric mean, too
# (normal for any W < 1e90); a term w_d x that underflows is below 2^-1074 next to a sum of at least 1e-216 / W.
# Sums of positive terms keep their relative precision at any magnitude, so the plain iterate is as exact here as
# in the log domain; a block whose v leaves the range (or turns 0, inf or NaN) is redone, as before.
PLAIN_LO, PLAIN_HI = 1e-200, 1e200
LOG_TINY = -667.0  # windowed LSE: band sums below e^this (~1e-290, relative to the window's maximum) are recomputed


def available() -> bool:
    """Whether the Triton solver can run here (triton importable)."""
    return triton is not None


@_jit
def _lse_band(x_ptr, base, cols, rmask, cost_ptr, gap, length, D,  # pragma: no cover - compiled
              KP: tl.constexpr, BN: tl.constexpr):
    """LSE_{|d|<=D}(x[:, i+d] - c_d) on a (KP, BN) tile, exact in two passes (max, then sum of exponentials).

    Rows past K and points whose whole band is a gap give 0 (their callers mask them)."""
    m = tl.full((KP, BN), float("-inf"), tl.float64)
    for d in range(-D, D + 1):
        c = cols + d
        x = tl.load(x_ptr + base + c[None, :], mask=rmask[:, None] & ((c >= 0) & (c < length))[None, :],
                    other=float("-inf"))
        m = tl.maximum(m, x - tl.load(cost_ptr + (d + gap)))
    m = tl.where(m > float("-inf"), m, 0.0)
    s = tl.zeros((KP, BN), tl.float64)
    for d in range(-D, D + 1):
        c = cols + d
        x = tl.load(x_ptr + base + c[None, :], mask=rmask[:, None] & ((c >= 0) & (c < length))[None, :],
                    other=float("-inf"))
        s += tl.exp(x - tl.load(cost_ptr + (d + gap)) - m)
    s = tl.where(s > 0.0, s, 1.0)  # rows past K and points whose whole band is a gap (masked below)
    return m + tl.log(s)


@_jit
def _lse_f(g_ptr, loga_ptr, f_ptr, cost_ptr, gap, length, k_rows,  # pragma: no cover - compiled
           D, KP: tl.constexpr, BN: tl.constexpr):
    """f = log a - LSE_{|d|<=D}(G[:, i+d] - c_d) on one tile of BN points, all rows (c_d at cost[d + gap])."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.arange(0, KP)
    rmask = rows < k_rows
    here = rmask[:, None] & (cols < length)[None, :]
    base = rows[:, None] * length
    lse = _lse_band(g_ptr, base, cols, rmask, cost_ptr, gap, length, D, KP, BN)
    la = tl.load(loga_ptr + base + cols[None, :], mask=here, other=float("-inf"))
    f = tl.where(la > float("-inf"), la - lse, float("-inf"))
    tl.store(f_ptr + base + cols[None, :], f, mask=here)


@_jit
def _lse_g(f_ptr, g_ptr, cost_ptr, gap, lam_ptr, live_ptr, logb_ptr, err_ptr, rmin_ptr, rmax_ptr, length, k_rows,
           D, KP: tl.constexpr, BN: tl.constexpr, CHECK: tl.constexpr):  # pragma: no cover
    """l = LSE(f - c); log b = sum_k lam_k l_k; G = log b - l on live points; error and G's range."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.arange(0, KP)
    rmask = rows < k_rows
    lse = _lse_band(f_ptr, rows[:, None] * length, cols, rmask, cost_ptr, gap, length, D, KP, BN)
    _g_update(lse, g_ptr, lam_ptr, live_ptr, logb_ptr, err_ptr, rmin_ptr, rmax_ptr, length, k_rows, cols, rows,
              CHECK)


@_jit
def _log_update(ell_ptr, g_ptr, lam_ptr, live_ptr, logb_ptr, err_ptr, rmin_ptr, rmax_ptr, length, k_rows,
                KP: tl.constexpr, BN: tl.constexpr, CHECK: tl.constexpr):  # pragma: no cover - compiled
    """The rest of ``_lse_g`` from l = LSE(f - c) computed by ``_lse_rows`` (in ``ell``)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.arange(0, KP)
    here = (rows < k_rows)[:, None] & (cols < length)[None, :]
    lse = tl.load(ell_ptr + rows[:, None] * length + cols[None, :], mask=here, other=0.0)
    _g_update(lse, g_ptr, lam_ptr, live_ptr, logb_ptr, err_ptr, rmin_ptr, rmax_ptr, length, k_rows, cols, rows,
              CHECK)


@_jit
def _g_update(lse, g_ptr, lam_ptr, live_ptr, logb_ptr, err_ptr, rmin_ptr, rmax_ptr, length, k_rows, cols, rows,
              CHECK: tl.constexpr):  # pragma: no cover - compiled
    """From l = ``lse`` (KP, BN): log b = sum_k lam_k l_k; POT's error (at checks); G = log b - l on live
    points; G's running range."""
    rmask = rows < k_rows
    cmask = cols < length
    here = rmask[:, None] & cmask[None, :]
    base = rows[:, None] * length
    live = tl.load(live_ptr + cols, mask=cmask, other=0.0) > 0.0
    ok = here & live[None, :]
    ell = tl.where(ok, lse, 0.0)
    lam = tl.load(lam_ptr + rows, mask=rmask, other=0.0)
    logb = tl.sum(lam[:, None] * ell, axis=0)
    g_old = tl.load(g_ptr + base + cols[None, :], mask=ok, other=0.0)
    if CHECK:
        x = tl.where(ok, tl.exp(g_old + ell), 0.0)
        mean = tl.sum(x, axis=0) / k_rows
        dev = tl.where(ok, x - mean[None, :], 0.0)
        tl.store(err_ptr + cols, tl.sqrt(tl.sum(dev * dev, axis=0) / k_rows), mask=cmask & live)
    g_new = logb[None, :] - ell
    tl.store(g_ptr + base + cols[None, :], g_new, mask=ok)
    tl.store(logb_ptr + cols, logb, mask=cmask & live)
    lo = tl.min(tl.where(ok, g_new, float("inf")), axis=0)
    hi = tl.max(tl.where(ok, g_new, float("-inf")), axis=0)
    run_lo = tl.load(rmin_ptr + cols, mask=cmask, other=float("inf"))
    run_hi = tl.load(rmax_ptr + cols, mask=cmask, other=float("-inf"))
    tl.store(rmin_ptr + cols, tl.minimum(run_lo, lo), mask=cmask & live)
    tl.store(rmax_ptr + cols, tl.maximum(run_hi, hi), mask=cmask & live)


@_jit
def _band_sum(x_ptr, row0, cols, lim, w_ptr, gap, D, DS: tl.constexpr, BN: tl.constexpr):  # pragma: no cover
    """sum_{|d|<=D} w_|d| x[row0 + i + d] for ``0 <= i + d < lim`` (0 elsewhere), w_d at w[gap + d].

    The inner band |d| <= DS is unrolled (all its loads in flight at once); the rest, if any, is a
    loop over symmetric pairs, so compiled variants stay few and registers bounded."""
    acc = tl.zeros((BN,), tl.float64)
    for i in tl.static_range(2 * DS + 1):
        j = cols + (i - DS)
        acc += tl.load(w_ptr + (i - DS + gap)) * tl.load(x_ptr + row0 + j, mask=(j >= 0) & (j < lim), other=0.0)
    for d in range(DS + 1, D + 1):
        lo, hi = cols - d, cols + d
        acc += tl.load(w_ptr + (d + gap)) * (tl.load(x_ptr + row0 + lo, mask=(lo >= 0) & (lo < lim), other=0.0)
                                             + tl.load(x_ptr + row0 + hi, mask=(hi >= 0) & (hi < lim), other=0.0))
    return acc


@_jit
def _plain_u(v_ptr, a1_ptr, gapf_ptr, w_ptr, u_ptr, gap, length, total, D,  # pragma: no cover - compiled
             DS: tl.constexpr, BN: tl.constexpr):
    """u = a / (K v) over the flattened (K, L) array (rows end and start with gaps of zeros, D <= gap)."""
    idx = tl.program_id(0) * BN + tl.arange(0, BN)
    inside = idx < total
    acc = _band_sum(v_ptr, 0, idx, total, w_ptr, gap, D, DS, BN)
    acc += tl.load(gapf_ptr + idx % length, mask=inside, other=1.0)
    tl.store(u_ptr + idx, tl.load(a1_ptr + idx, mask=inside, other=0.0) / acc, mask=inside)


@_jit
def _plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, DS: tl.constexpr, BN: tl.constexpr):  # pragma: no cover
    """(K u_k)_i on one tile of columns, plus 1 in gaps (so gaps never divide by 0 or take log 0)."""
    return _band_sum(u_ptr, k * length, cols, length, w_ptr, gap, D, DS, BN) + gapf


@_jit
def _plain_v(u_ptr, v_ptr, w_ptr, gapf_ptr, lam_ptr, live_ptr, b_ptr, err_ptr, rmin_ptr, rmax_ptr, lmin_ptr,
             lmax_ptr, gap, length, k_rows, D, DS: tl.constexpr, BN: tl.constexpr,
             CHECK: tl.constexpr):  # pragma: no cover - compiled
    """log b = sum_k lam_k log (K u_k); v_k = b / (K u_k) on live points; POT's error; v's range.

    Row by row: K u_k is recomputed in each pass (from L1/L2) rather than held for all rows."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cm = cols < length
    gapf = tl.load(gapf_ptr + cols, mask=cm, other=1.0)
    live = (tl.load(live_ptr + cols, mask=cm, other=0.0) > 0.0) & cm
    logb = tl.zeros((BN,), tl.float64)
    for k in range(k_rows):
        logb += tl.load(lam_ptr + k) * tl.log(_plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, DS, BN))
    b = tl.exp(logb)
    if CHECK:  # std over k of v_k (K u_k), two passes as torch.std
        mean = tl.zeros((BN,), tl.float64)
        for k in range(k_rows):
            ku = _plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, DS, BN)
            mean += tl.load(v_ptr + k * length + cols, mask=cm, other=0.0) * ku
        mean = mean / k_rows
        var = tl.zeros((BN,), tl.float64)
        for k in range(k_rows):
            ku = _plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, DS, BN)
            dev = tl.load(v_ptr + k * length + cols, mask=cm, other=0.0) * ku - mean
            var += dev * dev
        tl.store(err_ptr + cols, tl.sqrt(var / k_rows), mask=live)
    lo = tl.full((BN,), float("inf"), tl.float64)
    hi = tl.zeros((BN,), tl.float64)
    for k in range(k_rows):
        vn = b / _plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, DS, BN)
        tl.store(v_ptr + k * length + cols, vn, mask=live)
        lo = tl.minimum(lo, vn)
        hi = tl.maximum(hi, vn)
    tl.store(b_ptr + cols, b, mask=live)
    tl.store(rmin_ptr + cols, tl.minimum(tl.load(rmin_ptr + cols, mask=cm, other=0.0), lo), mask=live)
    tl.store(rmax_ptr + cols, tl.maximum(tl.load(rmax_ptr + cols, mask=cm, other=0.0), hi), mask=live)
    tl.store(lmin_ptr + cols, lo, mask=live)
    tl.store(lmax_ptr + cols, hi, mask=live)


@_jit
def _lse_window(x_ptr, row0, scr_ptr, cnt_ptr, c0, length, w_ptr, cost_ptr, gap, D,
                DS: tl.constexpr, BW: tl.constexpr, LOG_TINY: tl.constexpr):  # pragma: no cover - compiled
    r"""LSE_{|d|<=D}(x[row0 + c + d] - c_d) for the window's columns c = c0 - D + p, p < BW (valid for
    D <= p < BW - D), with one exponential per point instead of one per term.

    With r the window's maximum, :math:`e = e^{x - r} \le 1` goes to a private scratch row and
    :math:`\mathrm{LSE} = r + \log \sum_d w_d e_{c+d}` (:math:`w_d = e^{-c_d}`). Every term that
    underflows is below :math:`2^{-1074} w_d`, so wherever the sum is at least ``e^LOG_TINY`` it is the
    exact LSE to rounding; points below that (far beneath the window's maximum) are recomputed by
    ``_lse_band``'s two exact passes. Points whose whole band is -inf give 0, as there."""
    p = tl.arange(0, BW)
    c = c0 - D + p
    x = tl.load(x_ptr + row0 + c, mask=(c >= 0) & (c < length), other=float("-inf"))
    r = tl.max(x, axis=0)
    r = tl.where(r > float("-inf"), r, 0.0)
    tl.store(scr_ptr + p, tl.exp(x - r))
    tl.store(cnt_ptr + p, tl.cumsum((x > float("-inf")).to(tl.int32), axis=0))
    tl.debug_barrier()  # the scratch row is read at other threads' points
    s = _band_sum(scr_ptr, 0, p, BW, w_ptr, gap, D, DS, BW)
    n_fin = (tl.load(cnt_ptr + p + D, mask=p + D < BW, other=0)
             - tl.load(cnt_ptr + p - D - 1, mask=p - D - 1 >= 0, other=0))
    log_s = tl.log(tl.where(s > 0.0, s, 1.0))
    lse = tl.where(n_fin > 0, r + log_s, 0.0)
    bad = (n_fin > 0) & ((s == 0.0) | (log_s < LOG_TINY)) & (p >= D) & (p < BW - D) & (c < length)
    if tl.max(bad.to(tl.int32), axis=0) > 0:  # the window as a one-row tile of the exact kernels' LSE
        exact = _lse_band(x_ptr, tl.full((1, 1), row0, tl.int32), c, tl.full((1,), 1, tl.int1), cost_ptr, gap,
                          length, D, 1, BW)
        lse = tl.where(bad, tl.reshape(exact, (BW,)), lse)
    return lse


@_jit
def _lse_rows(x_ptr, loga_ptr, out_ptr, scr_ptr, cnt_ptr, w_ptr, cost_ptr, gap, length, span, D,
              DS: tl.constexpr, BW: tl.constexpr, SUB_A: tl.constexpr, LOG_TINY: tl.constexpr):  # pragma: no cover
    """Program (t, k): columns [t span, (t + 1) span) of row k (span = BW - 2D): f = log a - LSE(G - c)
    (``SUB_A``: -inf where a = 0) or l = LSE(f - c)."""
    t, k = tl.program_id(0), tl.program_id(1)
    slot = (k * tl.num_programs(0) + t) * BW
    c0 = t * span
    lse = _lse_window(x_ptr, k * length, scr_ptr + slot, cnt_ptr + slot, c0, length, w_ptr, cost_ptr, gap, D,
                      DS, BW, LOG_TINY)
    p = tl.arange(0, BW)
    c = c0 - D + p
    mine = (p >= D) & (p < BW - D) & (c < length)
    if SUB_A:
        la = tl.load(loga_ptr + k * length + c, mask=mine, other=float("-inf"))
        lse = tl.where(la > float("-inf"), la - lse, float("-inf"))
    tl.store(out_ptr + k * length + c, lse, mask=mine)


def runs_on(device: torch.device) -> bool:
    """CUDA tensors, or CPU ones under Triton's interpreter (tests)."""
    return triton is not None and (device.type == "cuda" or bool(triton.knobs.runtime.interpret))


def _check_device(device: torch.device) -> None:
    if not runs_on(device):
        raise ValueError("the Triton solver runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1 "
                         "(set before triton is imported): use solver plain or log")


class _Blocks(SegmentBlocks):
    """Both states in the padded layout: plain (v, b) and log (G, log b), and their blocks of launches."""

    def __init__(self, lay: Layout, lam: torch.Tensor, reg: float, graphs: bool) -> None:
        k_rows, length = lay.a1.shape
        dev = lay.a1.device
        self.v = torch.empty(k_rows, length, dtype=torch.float64, device=dev)  # plain state: v = e^G, b
        self.b = torch.empty(length, dtype=torch.float64, device=dev)
        self.g = torch.empty_like(self.v)  # log state: G, log b (filled at the switch)
        self.logb = torch.empty_like(self.b)
        super().__init__(lay, (self.v, self.b, self.g, self.logb), graphs)
        self.k_rows, self.length, self.gap = k_rows, length, lay.gap
        self.loga = torch.empty_like(self.v)
        self.work = torch.empty_like(self.v)  # u (plain) or f (log)
        offsets = torch.arange(-lay.gap, lay.gap + 1, dtype=torch.float64, device=dev)
        self.cost = offsets * offsets / reg
        self.w = torch.exp(-self.cost)
        self.lam = torch.empty(k_rows, dtype=torch.float64, device=dev)
        self.kp = max(2, triton.next_power_of_2(k_rows))
        self.bn = max(16, min(256, 2048 // self.kp))
        self.err_all = torch.zeros(LONG_CHECKS, length, dtype=torch.float64, device=dev)  # POT's error per check
        self.log_extra: tuple[torch.Tensor, ...] = ()  # made at the first switch to the log domain
        self.reset(lay, lam)

    def reset(self, lay: Layout, lam: torch.Tensor) -> None:
        """Start a solve of ``lay``'s histograms (the layout these tensors were made for, or one of the same
        shapes: their captured graphs stay valid)."""
        self.lay.a1.copy_(lay.a1)
        self.lay.spread_a = lay.spread_a
        self.loga.copy_(torch.where(lay.realf > 0, torch.log(lay.a1), -math.inf))
        self.lam.copy_(lam.to(device=self.lam.device, dtype=torch.float64))
        self.v.copy_(lay.realf.expand(self.k_rows, -1))
        self.b.zero_()
        self.logb.zero_()
        self.livef.copy_(lay.realf)
        self.active = (self.v, self.b)  # what a block changes: the plain state, or the log state after to_log

    def _block(self, log: bool, steps: int, dv: int, du: int, first_check: int) -> None:
        """``steps`` iterations; POT's error at steps ``first_check``, +10, ... into rows 0, 1, ... of ``err_all``."""
        self.run_min.fill_(math.inf)
        self.run_max.fill_(-math.inf if log else 0.0)
        total = self.k_rows * self.length
        for j in range(steps):
            check = j >= first_check and (j - first_check) % 10 == 0
            err = self.err_all[(j - first_check) // 10 if check else 0]
            if log and max(dv, du) <= WINDOW_BAND:
                self._log_windowed(dv, du, check, err)
            elif log:
                grid = (triton.cdiv(self.length, self.bn),)
                _lse_f[grid](self.g, self.loga, self.work, self.cost, self.gap, self.length, self.k_rows,
                             D=dv, KP=self.kp, BN=self.bn)
                _lse_g[grid](self.work, self.g, self.cost, self.gap, self.lam, self.livef, self.logb, err,
                             self.run_min, self.run_max, self.length, self.k_rows,
                             D=du, KP=self.kp, BN=self.bn, CHECK=check)
            else:
                _plain_u[(triton.cdiv(total, 1024),)](self.v, self.lay.a1, self.lay.gapf, self.w, self.work, self.gap,
                                                      self.length, total, dv, DS=min(dv, UNROLL), BN=1024)
                _plain_v[(triton.cdiv(self.length, 256),)](
                    self.work, self.v, self.w, self.lay.gapf, self.lam, self.livef, self.b, err, self.run_min,
                    self.run_max, self.last_min, self.last_max, self.gap, self.length, self.k_rows, du,
                    DS=min(du, UNROLL), BN=256, CHECK=check)
        if log:
            self.last_min.copy_(self.run_min)
            self.last_max.copy_(self.run_max)

    def _log_windowed(self, dv: int, du: int, check: bool, err: torch.Tensor) -> None:
        """One log-domain iteration with the windowed LSE: f = log a - LSE(G - c), l = LSE(f - c), row by row;
        then log b, G, the error and the range over all rows."""
        for d, src, dst, sub_a in ((dv, self.g, self.work, True), (du, self.work, self.ell, False)):
            span = WINDOW - 2 * d
            _lse_rows[(triton.cdiv(self.length, span), self.k_rows)](
                src, self.loga, dst, self.scratch, self.counts, self.w, self.cost, self.gap, self.length, span, d,
                DS=min(d, UNROLL), BW=WINDOW, SUB_A=sub_a, LOG_TINY=LOG_TINY)
        _log_update[(triton.cdiv(self.length, self.bn),)](
            self.ell, self.g, self.lam, self.livef, self.logb, err, self.run_min, self.run_max, self.length,
            self.k_rows, KP=self.kp, BN=self.bn, CHECK=check)

    def held_bytes(self) -> int:
        """Device memory of this state's arrays (its CUDA graphs' pool aside)."""
        return 8 * self.k_rows * self.length * 8 + sum(t.numel() * t.element_size() for t in self.log_extra)

    def to_log(self) -> None:
        """Continue from the plain state in the log domain: G = log v, log b = log b (same iterate)."""
        if not self.log_extra:  # l and the windowed LSE's scratch rows, sized for the widest windowed band
            slots = self.k_rows * triton.cdiv(self.length, WINDOW - 2 * WINDOW_BAND) * WINDOW
            self.ell = torch.empty_like(self.v)
            self.scratch = torch.empty(slots, dtype=torch.float64, device=self.v.device)
            self.counts = torch.empty(slots, dtype=torch.int32, device=self.v.device)
            self.log_extra = (self.ell, self.scratch, self.counts)
        self.g.copy_(torch.where(self.lay.realf > 0, torch.log(self.v), -math.inf))
        self.logb.copy_(torch.log(self.b))
        self.active = (self.g, self.logb)


_cache: OrderedDict[tuple, _Blocks] = OrderedDict()
_cache_lock = threading.Lock()


def _take_blocks(lay: Layout, lam: torch.Tensor, reg: float, graphs: bool) -> tuple[tuple, _Blocks]:
    """The solver state for ``lay``: a cached one of the same shapes (reset; graphs already captured) or a new one.

    Each round the aggregator fuses the same architecture, so capturing the CUDA graphs (and
    launching every kernel once from Python to do it) is paid once, not per fusion. An entry is
    taken out of the cache while in use, so two concurrent solves never share tensors."""
    key = (tuple(lay.a1.shape), tuple(lay.sizes), lay.gap, float(reg), str(lay.a1.device), graphs)
    with _cache_lock:
        blocks = _cache.pop(key, None)
    if blocks is None:
        return key, _Blocks(lay, lam, reg, graphs)
    blocks.reset(lay, lam)
    return key, blocks


def _give_back(key: tuple, blocks: _Blocks) -> None:
    """Keep ``blocks`` for the next solve of its shapes, unless it is too big to hold on to between fusions."""
    if blocks.held_bytes() > CACHED_BYTES:
        return
    with _cache_lock:
        _cache[key] = blocks
        while len(_cache) > CACHED_LAYOUTS:
            _cache.popitem(last=False)


def barycenters_triton(hists: list[torch.Tensor], lam: torch.Tensor, *, reg: float, stop_threshold: float,
                       max_iter: int, graphs: bool | None = None
                       ) -> tuple[list[torch.Tensor], list[SegmentResult], list[torch.Tensor | None]]:
    r"""Entropic barycenters of several (K, n_s) histogram stacks with the fused kernels.

    Plain-domain kernels while v stays inside ``[PLAIN_LO, PLAIN_HI]``; from the block where it
    would not, log-domain kernels from the same iterate (:math:`G = \log v`). ``lam`` (K,)
    are the normalized weights. Returns, per stack, the barycenter :math:`b` (n_s,), a
    ``SegmentResult`` and ``None``, except that a segment whose potentials spread beyond
    what the gaps allow is handed back with its :math:`v = e^G` and ``escaped_at`` for the
    torch log solver to continue.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("the Triton entropic solver needs triton (it comes with torch on Linux)")
    if hists[0].shape[0] > MAX_ROWS:
        raise ValueError(f"the Triton solver holds at most {MAX_ROWS} rows per tile, got {hists[0].shape[0]}")
    device = hists[0].device
    _check_device(device)
    use_graphs = device.type == "cuda" if graphs is None else graphs
    key, blocks = _take_blocks(layout(hists, reg, GAP_SPREAD), lam, reg, use_graphs)
    try:
        return _solve(blocks, reg, stop_threshold, max_iter)
    finally:
        _give_back(key, blocks)


def _solve(blocks: _Blocks, reg: float, stop_threshold: float, max_iter: int
           ) -> tuple[list[torch.Tensor], list[SegmentResult], list[torch.Tensor | None]]:
    """The block loop of :func:`barycenters_triton` on a (fresh or reset) solver state."""
    lay = blocks.lay
    log_wsum = log_kernel_bound(reg)
    n_seg, n_max = len(lay.sizes), max(lay.sizes)
    prog = SegmentProgress(n_seg)
    ii, band_used, log_mode = 0, 0, False
    log2_lo, log2_hi = math.log2(PLAIN_LO), math.log2(PLAIN_HI)
    margin = float(MARGIN)  # binary orders v (plain) or G / ln 2 (log) may move within a block
    x_lo = x_hi = 1.0  # range of v (plain) or G (log) on live points
    periods, cap = 1, max_iter  # check periods per block (doubles while blocks succeed); where blocks must end
    while any(prog.live) and ii < max_iter:
        first = (1 - ii) % 10  # POT checks at iterations 1, 11, 21, ...: the block's first check step
        steps = min(first + 1 + 10 * (periods - 1), cap - ii)
        n_checks = 0 if first >= steps else (steps - 1 - first) // 10 + 1
        if log_mode:
            lo, hi = x_lo - margin * math.log(2.0), x_hi + margin * math.log(2.0)
            spread = hi - lo
        else:
            l_lo, l_hi = max(log2_lo, math.log2(x_lo) - margin), min(log2_hi, math.log2(x_hi) + margin)
            lo, hi = 2.0 ** l_lo, 2.0 ** l_hi  # in binary orders first: 2^margin alone may overflow
            spread = (l_hi - l_lo) * math.log(2.0)
        dv = band_halfwidth(reg, spread, n_max)
        du = band_halfwidth(reg, spread + lay.spread_a + log_wsum, n_max)
        if max(dv, du) > lay.gap:  # potentials spread beyond the gaps: the torch log solver continues
            for s, g in enumerate(lay.segments(blocks.g)):
                if prog.live[s]:
                    prog.hand_back(s, ii, torch.exp(g))
            break
        band_used = max(band_used, dv, du)
        blocks.snapshot()
        blocks.run(log_mode, steps, dv, du, first)
        seg_bad, seg_errs, new_lo, new_hi = blocks.block_stats(lo, hi, blocks.err_all[:n_checks])
        if any(prog.live[s] and seg_bad[s] > 0 for s in range(n_seg)):  # the band's promise broke: redo
            blocks.restore()
            if periods > 1:  # first as a short block, with the same band
                periods = 1
            elif not log_mode and l_lo <= log2_lo and l_hi >= log2_hi:  # v would leave the plain range
                blocks.to_log()
                log_mode, margin = True, float(MARGIN)
                x_lo, x_hi = math.log(x_lo), math.log(x_hi)
            else:
                margin *= 4
            continue
        stop_at = _first_stop(seg_errs, prog.live, stop_threshold)
        if stop_at >= 0 and first + 10 * stop_at + 1 < steps:  # a segment stopped inside the block: redo to there
            blocks.restore()
            cap = ii + first + 10 * stop_at + 1
            continue
        ii += steps
        cap = max_iter
        if prog.record(ii, n_checks > 0, seg_errs[-1] if n_checks else [], stop_threshold):
            blocks.set_live(prog.live)
        if new_lo <= new_hi and (log_mode or new_lo > 0):
            if log_mode:
                moved = max(abs(new_lo - x_lo), abs(new_hi - x_hi)) / math.log(2.0)
            else:
                moved = max(abs(math.log2(new_lo / x_lo)), abs(math.log2(new_hi / x_hi)))
            periods = next_periods(periods, moved / steps, margin)
            x_lo, x_hi = new_lo, new_hi
    return lay.segments(torch.exp(blocks.logb) if log_mode else blocks.b), prog.results(band_used), prog.v_saved


def next_periods(periods: int, drift: float, margin: float) -> int:
    """Check periods in the next block: twice the last, at most ``LONG_CHECKS``, and few enough that the
    range, drifting ``drift`` binary orders per iteration as in the last block, uses at most half the
    block's ``margin`` (a block that leaves its margin is redone, so a steady drift must not outrun it)."""
    fits = LONG_CHECKS if drift <= 0 else int(margin / (2 * 10 * drift))
    return max(1, min(2 * periods, LONG_CHECKS, fits))


def _first_stop(seg_errs: list[list[float]], live: list[bool], stop_threshold: float) -> int:
    """The first check (index into ``seg_errs``) at which a live segment's error is below the threshold, or -1."""
    for c, errs in enumerate(seg_errs):
        if any(alive and e < stop_threshold for alive, e in zip(live, errs, strict=True)):
            return c
    return -1
