r"""The log-domain entropic barycenter iterate as two fused Triton kernels per iteration (GPU).

Same iterate as :func:`aggregator.fusion.sinkhorn.sinkhorn_barycenter_1d` (POT's
``sinkhorn_log``), for all tensors of a model at once, in the layout of
:mod:`aggregator.fusion.sinkhorn_torch` (segments in one (K, L) array, gaps between them;
here the gaps hold :math:`-\infty`, so a band never mixes two tensors):

.. math::
    f_k = \log a_k - \mathrm{LSE}_{|d| \le D_v}(G_{k,i+d} - d^2/\varepsilon), \qquad
    \ell_k = \mathrm{LSE}_{|d| \le D_u}(f_{k,i+d} - d^2/\varepsilon), \qquad
    \log b = \sum_k \lambda_k \ell_k, \qquad G_k = \log b - \ell_k.

Kernel A computes :math:`f` from :math:`G` for a tile of points and all K rows; kernel B
computes :math:`\ell`, :math:`\log b`, the new :math:`G` (in place; each program touches its
own points only), POT's stopping error :math:`\sum_i \mathrm{std}_k(e^{G_{ki} + \ell_{ki}})`
at check iterations and the running range of :math:`G` over the block. Each LSE is exact
two-pass (max, then sum of exponentials), so no value can under- or overflow and nothing is
ever handed over: on a GPU the exponentials cost less than the memory traffic that the
plain domain would save. Blocks, bands (sized from the range of G promised for the block and
checked at its end), stopping and CUDA graphs are those of the torch solver.

On CPU tensors the kernels run in Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import math

import torch

from aggregator.fusion.sinkhorn import band_halfwidth
from aggregator.fusion.sinkhorn_fast import LOG_FLOOR, MARGIN, RANGE_HI, RANGE_LO, SegmentResult
from aggregator.fusion.sinkhorn_torch import GraphBlocks, block_steps, record_block

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


class _Blocks(GraphBlocks):
    """Both states in the padded layout: plain (v, b) and log (G, log b), and their blocks of launches."""

    def __init__(self, hists: list[torch.Tensor], lam: torch.Tensor, reg: float, gap: int, graphs: bool) -> None:
        super().__init__(graphs)
        dev = hists[0].device
        self.k_rows = hists[0].shape[0]
        self.sizes = [int(h.shape[1]) for h in hists]
        self.starts, pos = [], gap
        for n in self.sizes:
            self.starts.append(pos)
            pos += n + gap
        self.length, self.gap = pos, gap
        self.a1 = torch.zeros((self.k_rows, pos), dtype=torch.float64, device=dev)
        self.seg_idx = torch.zeros(pos, dtype=torch.int64, device=dev)
        self.realf = torch.zeros(pos, dtype=torch.float64, device=dev)
        for s, (st, h) in enumerate(zip(self.starts, hists, strict=True)):
            self.a1[:, st:st + h.shape[1]] = h.to(torch.float64) + LOG_FLOOR
            self.seg_idx[st:st + h.shape[1]] = s
            self.realf[st:st + h.shape[1]] = 1.0
        self.gapf = 1.0 - self.realf
        self.loga = torch.where(self.realf > 0, torch.log(self.a1), -math.inf)
        self.v = self.realf.expand(self.k_rows, -1).clone()  # plain state: v = e^G, b
        self.b = torch.zeros(pos, dtype=torch.float64, device=dev)
        self.g = torch.empty_like(self.v)  # log state: G, log b (filled at the switch)
        self.logb = torch.zeros_like(self.b)
        self.work = torch.empty_like(self.v)  # u (plain) or f (log)
        self.state = (self.v, self.b, self.g, self.logb)
        self.saved = [torch.empty_like(t) for t in self.state]
        self.livef = self.realf.clone()
        self.err_pt = torch.zeros_like(self.b)
        self.run_min, self.run_max = torch.empty_like(self.b), torch.empty_like(self.b)
        self.last_min, self.last_max = torch.empty_like(self.b), torch.empty_like(self.b)
        offsets = torch.arange(-gap, gap + 1, dtype=torch.float64, device=dev)
        self.cost = offsets * offsets / reg
        self.w = torch.exp(-self.cost)
        self.lam = lam.to(device=dev, dtype=torch.float64).contiguous()
        self.kp = max(2, triton.next_power_of_2(self.k_rows))
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
                _plain_u[(triton.cdiv(total, 1024),)](self.v, self.a1, self.gapf, self.w, self.work, self.gap,
                                                      self.length, total, D=dv, BN=1024)
                _plain_v[(triton.cdiv(self.length, 256),)](
                    self.work, self.v, self.w, self.gapf, self.lam, self.livef, self.b, self.err_pt, self.run_min,
                    self.run_max, self.last_min, self.last_max, self.gap, self.length, self.k_rows, D=du, BN=256,
                    CHECK=last_check)
        if log:
            self.last_min.copy_(self.run_min)
            self.last_max.copy_(self.run_max)

    def snapshot(self) -> None:
        for t, s in zip(self.state, self.saved, strict=True):
            s.copy_(t)

    def restore(self) -> None:
        for t, s in zip(self.state, self.saved, strict=True):
            t.copy_(s)

    def to_log(self) -> None:
        """Continue from the plain state in the log domain: G = log v, log b = log b (same iterate)."""
        self.g.copy_(torch.where(self.realf > 0, torch.log(self.v), -math.inf))
        self.logb.copy_(torch.log(self.b))

    def block_stats(self, n_seg: int, lo: float, hi: float) -> tuple[list[float], list[float], float, float]:
        """One read-back: per segment (left [lo, hi] or NaN on a live point, error sum), the live range at the end."""
        live = self.livef
        outside = ((self.run_min < lo) | (self.run_max > hi) | torch.isnan(self.run_min)
                   | torch.isnan(self.run_max)).to(torch.float64) * live
        seg_bad = torch.zeros(n_seg, dtype=torch.float64, device=live.device).index_add_(0, self.seg_idx, outside)
        seg_err = torch.zeros(n_seg, dtype=torch.float64, device=live.device).index_add_(
            0, self.seg_idx, self.err_pt * live)
        vmin = torch.where(live > 0, self.last_min, math.inf).amin().reshape(1)
        vmax = torch.where(live > 0, self.last_max, -math.inf).amax().reshape(1)
        host = torch.cat([seg_bad, seg_err, vmin, vmax]).tolist()
        return host[:n_seg], host[n_seg:2 * n_seg], host[-2], host[-1]

    def set_live(self, live: list[bool]) -> None:
        flags = torch.tensor(live, dtype=torch.float64, device=self.livef.device)
        self.livef.copy_(flags[self.seg_idx] * self.realf)


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
    lo_a = min(float(h.min()) for h in hists) + LOG_FLOOR
    hi_a = max(float(h.max()) for h in hists) + LOG_FLOOR
    spread_a = math.log(hi_a / lo_a)
    log_wsum = math.log(1 + 2 * math.sqrt(math.pi * reg)) + 1.0
    n_max = max(int(h.shape[1]) for h in hists)
    gap = max(band_halfwidth(reg, GAP_SPREAD + spread_a + log_wsum, n_max), 1)
    blocks = _Blocks(hists, lam, reg, gap, use_graphs)
    n_seg = len(hists)
    live = [True] * n_seg
    it, err, conv, escaped = [0] * n_seg, [math.inf] * n_seg, [False] * n_seg, [-1] * n_seg
    v_saved: list[torch.Tensor | None] = [None] * n_seg
    ii, band_used, log_mode = 0, 0, False
    full = math.log2(RANGE_HI / RANGE_LO)
    margin = float(MARGIN)  # binary orders v (plain) or G / ln 2 (log) may move within a block
    x_lo = x_hi = 1.0  # range of v (plain) or G (log) on live points
    while any(live) and ii < max_iter:
        steps, check = block_steps(ii, max_iter)
        if log_mode:
            lo, hi = x_lo - margin * math.log(2.0), x_hi + margin * math.log(2.0)
            spread = hi - lo
        else:
            reach = 2.0 ** min(margin, full)
            lo, hi = max(RANGE_LO, x_lo / reach), min(RANGE_HI, x_hi * reach)
            spread = math.log(hi / lo)
        dv = band_halfwidth(reg, spread, n_max)
        du = band_halfwidth(reg, spread + spread_a + log_wsum, n_max)
        if max(dv, du) > gap:  # potentials spread beyond the gaps: the torch log solver continues
            for s in range(n_seg):
                if live[s]:
                    st = blocks.starts[s]
                    v_saved[s] = torch.exp(blocks.g[:, st:st + blocks.sizes[s]])
                    live[s], escaped[s], it[s] = False, ii, ii
            break
        band_used = max(band_used, dv, du)
        blocks.snapshot()
        blocks.run(log_mode, steps, dv, du, check)
        seg_bad, seg_err, new_lo, new_hi = blocks.block_stats(n_seg, lo, hi)
        if any(live[s] and seg_bad[s] > 0 for s in range(n_seg)):  # the band's promise broke: redo
            blocks.restore()
            if not log_mode and lo <= RANGE_LO and hi >= RANGE_HI:  # v would leave the plain range
                blocks.to_log()
                log_mode, margin = True, float(MARGIN)
                x_lo, x_hi = math.log(x_lo), math.log(x_hi)
            else:
                margin *= 4
            continue
        ii += steps
        if record_block(live, it, err, conv, seg_err, ii, check, stop_threshold):
            blocks.set_live(live)
        if new_lo <= new_hi and (log_mode or new_lo > 0):
            x_lo, x_hi = new_lo, new_hi
    out = torch.exp(blocks.logb) if log_mode else blocks.b
    bs = [out[st:st + n].clone() for st, n in zip(blocks.starts, blocks.sizes, strict=True)]
    results = [SegmentResult(iterations=it[s], error=err[s], converged=conv[s], band=band_used,
                             escaped_at=escaped[s]) for s in range(n_seg)]
    return bs, results, v_saved
