r"""The entropic barycenter iterate as two fused Triton kernels per iteration (GPU).

Same iterate as :mod:`aggregator.fusion.sinkhorn_torch` and
:func:`aggregator.fusion.sinkhorn.sinkhorn_barycenter_1d` (POT's ``sinkhorn_log``), for all
tensors of a model at once, in the layout of :mod:`aggregator.fusion.sinkhorn_torch`
(segments in one (K, L) array, gaps between them, so a band never mixes two tensors).

Plain domain first: kernel ``_plain_u`` computes :math:`u = (a + 10^{-16}) / K v` over the
flattened array; ``_plain_v`` computes :math:`\log b = \sum_k \lambda_k \log (K u_k)` and
:math:`v_k = b / K u_k` on live points (K u recomputed, not stored), POT's stopping error at
check iterations and v's range. From the block where v would leave ``[1e-100, 1e100]``, the
same iterate continues in the log domain from :math:`G = \log v`:

.. math::
    f_k = \log a_k - \mathrm{LSE}_{|d| \le D_v}(G_{k,i+d} - d^2/\varepsilon), \qquad
    \ell_k = \mathrm{LSE}_{|d| \le D_u}(f_{k,i+d} - d^2/\varepsilon), \qquad
    \log b = \sum_k \lambda_k \ell_k, \qquad G_k = \log b - \ell_k,

kernel ``_lse_f`` for :math:`f` and ``_lse_g`` for the rest (in place; each program touches
its own points only), each LSE exact in two passes (max, then sum of exponentials), so no
value can under- or overflow there. Blocks, bands (sized from the range promised for the
block and checked at its end), stopping and CUDA graphs are those of the torch solver; a
tensor is handed to the torch log solver only if its potentials spread beyond the gaps.

On CPU tensors the kernels run in Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import math

import torch

from aggregator.fusion.sinkhorn import band_halfwidth, log_kernel_bound
from aggregator.fusion.sinkhorn_fast import MARGIN, RANGE_HI, RANGE_LO, SegmentResult
from aggregator.fusion.sinkhorn_torch import (
    Layout,
    SegmentBlocks,
    SegmentProgress,
    block_steps,
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
    cmask = cols < length
    here = rmask[:, None] & cmask[None, :]
    base = rows[:, None] * length
    lse = _lse_band(f_ptr, base, cols, rmask, cost_ptr, gap, length, D, KP, BN)
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
def _plain_u(v_ptr, a1_ptr, gapf_ptr, w_ptr, u_ptr, gap, length, total, D,  # pragma: no cover - compiled
             BN: tl.constexpr):
    """u = a / (K v) over the flattened (K, L) array (rows end and start with gaps of zeros, D <= gap)."""
    idx = tl.program_id(0) * BN + tl.arange(0, BN)
    inside = idx < total
    acc = tl.zeros((BN,), tl.float64)
    for d in range(-D, D + 1):
        j = idx + d
        acc += tl.load(w_ptr + (d + gap)) * tl.load(v_ptr + j, mask=(j >= 0) & (j < total), other=0.0)
    acc += tl.load(gapf_ptr + idx % length, mask=inside, other=1.0)
    tl.store(u_ptr + idx, tl.load(a1_ptr + idx, mask=inside, other=0.0) / acc, mask=inside)


@_jit
def _plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, BN: tl.constexpr):  # pragma: no cover - compiled
    """(K u_k)_i on one tile of columns, plus 1 in gaps (so gaps never divide by 0 or take log 0)."""
    acc = tl.zeros((BN,), tl.float64)
    for d in range(-D, D + 1):
        j = cols + d
        acc += tl.load(w_ptr + (d + gap)) * tl.load(u_ptr + k * length + j, mask=(j >= 0) & (j < length), other=0.0)
    return acc + gapf


@_jit
def _plain_v(u_ptr, v_ptr, w_ptr, gapf_ptr, lam_ptr, live_ptr, b_ptr, err_ptr, rmin_ptr, rmax_ptr, lmin_ptr,
             lmax_ptr, gap, length, k_rows, D, BN: tl.constexpr, CHECK: tl.constexpr):  # pragma: no cover
    """log b = sum_k lam_k log (K u_k); v_k = b / (K u_k) on live points; POT's error; v's range (K u recomputed)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cm = cols < length
    gapf = tl.load(gapf_ptr + cols, mask=cm, other=1.0)
    live = (tl.load(live_ptr + cols, mask=cm, other=0.0) > 0.0) & cm
    logb = tl.zeros((BN,), tl.float64)
    for k in range(k_rows):
        logb += tl.load(lam_ptr + k) * tl.log(_plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, BN))
    b = tl.exp(logb)
    if CHECK:  # std over k of v_k (K u_k), two passes as torch.std
        mean = tl.zeros((BN,), tl.float64)
        for k in range(k_rows):
            ku = _plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, BN)
            mean += tl.load(v_ptr + k * length + cols, mask=cm, other=0.0) * ku
        mean = mean / k_rows
        var = tl.zeros((BN,), tl.float64)
        for k in range(k_rows):
            ku = _plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, BN)
            dev = tl.load(v_ptr + k * length + cols, mask=cm, other=0.0) * ku - mean
            var += dev * dev
        tl.store(err_ptr + cols, tl.sqrt(var / k_rows), mask=live)
    lo = tl.full((BN,), float("inf"), tl.float64)
    hi = tl.zeros((BN,), tl.float64)
    for k in range(k_rows):
        vn = b / _plain_ku(u_ptr, w_ptr, gapf, cols, length, k, gap, D, BN)
        tl.store(v_ptr + k * length + cols, vn, mask=live)
        lo = tl.minimum(lo, vn)
        hi = tl.maximum(hi, vn)
    tl.store(b_ptr + cols, b, mask=live)
    tl.store(rmin_ptr + cols, tl.minimum(tl.load(rmin_ptr + cols, mask=cm, other=0.0), lo), mask=live)
    tl.store(rmax_ptr + cols, tl.maximum(tl.load(rmax_ptr + cols, mask=cm, other=0.0), hi), mask=live)
    tl.store(lmin_ptr + cols, lo, mask=live)
    tl.store(lmax_ptr + cols, hi, mask=live)


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
        self.v = lay.realf.expand(k_rows, -1).clone()  # plain state: v = e^G, b
        self.b = torch.zeros(length, dtype=torch.float64, device=dev)
        self.g = torch.empty_like(self.v)  # log state: G, log b (filled at the switch)
        self.logb = torch.zeros_like(self.b)
        super().__init__(lay, (self.v, self.b, self.g, self.logb), graphs)
        self.k_rows, self.length, self.gap = k_rows, length, lay.gap
        self.loga = torch.where(lay.realf > 0, torch.log(lay.a1), -math.inf)
        self.work = torch.empty_like(self.v)  # u (plain) or f (log)
        offsets = torch.arange(-lay.gap, lay.gap + 1, dtype=torch.float64, device=dev)
        self.cost = offsets * offsets / reg
        self.w = torch.exp(-self.cost)
        self.lam = lam.to(device=dev, dtype=torch.float64).contiguous()
        self.kp = max(2, triton.next_power_of_2(k_rows))
        self.bn = max(16, min(256, 2048 // self.kp))

    def _block(self, log: bool, steps: int, dv: int, du: int, check: bool) -> None:
        if log:
            self.run_min.fill_(math.inf)
            self.run_max.fill_(-math.inf)
        else:
            self.run_min.fill_(math.inf)
            self.run_max.fill_(0.0)
        total = self.k_rows * self.length
        for j in range(steps):
            last_check = check and j == steps - 1
            if log:
                grid = (triton.cdiv(self.length, self.bn),)
                _lse_f[grid](self.g, self.loga, self.work, self.cost, self.gap, self.length, self.k_rows,
                             D=dv, KP=self.kp, BN=self.bn)
                _lse_g[grid](self.work, self.g, self.cost, self.gap, self.lam, self.livef, self.logb, self.err_pt,
                             self.run_min, self.run_max, self.length, self.k_rows,
                             D=du, KP=self.kp, BN=self.bn, CHECK=last_check)
            else:
                _plain_u[(triton.cdiv(total, 1024),)](self.v, self.lay.a1, self.lay.gapf, self.w, self.work, self.gap,
                                                      self.length, total, D=dv, BN=1024)
                _plain_v[(triton.cdiv(self.length, 256),)](
                    self.work, self.v, self.w, self.lay.gapf, self.lam, self.livef, self.b, self.err_pt, self.run_min,
                    self.run_max, self.last_min, self.last_max, self.gap, self.length, self.k_rows, D=du, BN=256,
                    CHECK=last_check)
        if log:
            self.last_min.copy_(self.run_min)
            self.last_max.copy_(self.run_max)

    def to_log(self) -> None:
        """Continue from the plain state in the log domain: G = log v, log b = log b (same iterate)."""
        self.g.copy_(torch.where(self.lay.realf > 0, torch.log(self.v), -math.inf))
        self.logb.copy_(torch.log(self.b))


def barycenters_triton(hists: list[torch.Tensor], lam: torch.Tensor, *, reg: float, stop_threshold: float,
                       max_iter: int, graphs: bool | None = None
                       ) -> tuple[list[torch.Tensor], list[SegmentResult], list[torch.Tensor | None]]:
    r"""Entropic barycenters of several (K, n_s) histogram stacks with the fused kernels.

    Plain-domain kernels while v stays inside ``[1e-100, 1e100]``; from the block where it
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
    log_wsum = log_kernel_bound(reg)
    lay = layout(hists, reg, GAP_SPREAD)
    blocks = _Blocks(lay, lam, reg, use_graphs)
    n_seg, n_max = len(hists), max(lay.sizes)
    prog = SegmentProgress(n_seg)
    ii, band_used, log_mode = 0, 0, False
    full = math.log2(RANGE_HI / RANGE_LO)
    margin = float(MARGIN)  # binary orders v (plain) or G / ln 2 (log) may move within a block
    x_lo = x_hi = 1.0  # range of v (plain) or G (log) on live points
    while any(prog.live) and ii < max_iter:
        steps, check = block_steps(ii, max_iter)
        if log_mode:
            lo, hi = x_lo - margin * math.log(2.0), x_hi + margin * math.log(2.0)
            spread = hi - lo
        else:
            reach = 2.0 ** min(margin, full)
            lo, hi = max(RANGE_LO, x_lo / reach), min(RANGE_HI, x_hi * reach)
            spread = math.log(hi / lo)
        dv = band_halfwidth(reg, spread, n_max)
        du = band_halfwidth(reg, spread + lay.spread_a + log_wsum, n_max)
        if max(dv, du) > lay.gap:  # potentials spread beyond the gaps: the torch log solver continues
            for s, g in enumerate(lay.segments(blocks.g)):
                if prog.live[s]:
                    prog.hand_back(s, ii, torch.exp(g))
            break
        band_used = max(band_used, dv, du)
        blocks.snapshot()
        blocks.run(log_mode, steps, dv, du, check)
        seg_bad, seg_err, new_lo, new_hi = blocks.block_stats(lo, hi)
        if any(prog.live[s] and seg_bad[s] > 0 for s in range(n_seg)):  # the band's promise broke: redo
            blocks.restore()
            if not log_mode and lo <= RANGE_LO and hi >= RANGE_HI:  # v would leave the plain range
                blocks.to_log()
                log_mode, margin = True, float(MARGIN)
                x_lo, x_hi = math.log(x_lo), math.log(x_hi)
            else:
                margin *= 4
            continue
        ii += steps
        if prog.record(ii, check, seg_err, stop_threshold):
            blocks.set_live(prog.live)
        if new_lo <= new_hi and (log_mode or new_lo > 0):
            x_lo, x_hi = new_lo, new_hi
    return lay.segments(torch.exp(blocks.logb) if log_mode else blocks.b), prog.results(band_used), prog.v_saved
