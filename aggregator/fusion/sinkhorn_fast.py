r"""The entropic barycenter iterate of :mod:`aggregator.fusion.sinkhorn`, fast, for all tensors at once.

Same problem and same iterate as POT's ``ot.bregman.barycenter(method="sinkhorn_log")``,
computed in the *plain* domain with scalings :math:`v_k = e^{G_k}`:

.. math::
    u_k = \frac{a_k + 10^{-16}}{K v_k}, \qquad
    \log b = \sum_k \lambda_k \log (K u_k), \qquad
    v_k \leftarrow \frac{b}{K u_k},

where :math:`(Kx)_i = \sum_{|d| \le D} e^{-d^2/\varepsilon} x_{i+d}` is a band stencil on
the grid (the Gibbs kernel of the cost :math:`(i-j)^2`, truncated where the left-out mass
is below :math:`e^{-40}` relative to the kept diagonal term; :math:`D` is sized from the
spread :math:`\log(\max x / \min x)` of the stencil's input, as in the log-domain solver,
so it widens by itself when mass must travel far, or, where smaller, from the steepest step
of :math:`\log x` between neighbours, promised for a block and checked on every value read;
see ``_iterate``). Per grid point and iteration this is
two short stencils, a division and a half (``b / K u`` takes one division for two rows) and, per
group of rows with equal weight, one logarithm of the product of their mantissas (a
vectorizable log, below; rows multiplied in pairs first), instead of the log domain's
2(2D+1) exponentials; the exponential of :math:`\log b` is shared by the K rows. Every
tensor of a model is one *segment* of a (K, N) array, cut into tiles.

Blocks (overlapped tiling): a tile copies its v and a with a halo of ``nsteps (Dv + Du)``
points and runs up to 10 iterations privately, each shrinking its exact region by the two
bands, so no tile waits for another and a, v cross memory once per block instead of once
per iteration. The bands of a block are sized for v staying within ``MARGIN`` binary
orders of its range at the block's start; every tile checks that promise (integer min/max
of float exponents); a block that breaks it is redone one iteration at a time, with bands
from the actual range. Blocks end at POT's check iterations.

Stopping is POT's: every 10th iteration (``ii % 10 == 1``) the error
:math:`\sum_i \mathrm{std}_k(v_{ki} (K u_k)_i)` of a segment is compared with
``stop_threshold``; a segment that stops keeps the :math:`b` of that iteration.

Range: the plain domain is used while every v stays inside ``[1e-100, 1e100]`` (then u
and K u stay far from under- and overflow too, and nothing is subnormal). A segment whose
values leave that range at iteration ``ii`` is handed back with its last good v, and the
caller continues it in the log domain from the same iterate (``escaped_at``): same
numbers, slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aggregator.fusion.sinkhorn import band_halfwidth, log_kernel_bound  # the same bounds, one definition

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; without it the torch solver runs
    numba = None

LOG_FLOOR = 1e-16
RANGE_LO, RANGE_HI = 1e-100, 1e100  # plain-domain values must stay inside
# The same range as biased float64 exponents, checked with integer min/max (they vectorize):
# 2^(e - 1023) <= x < 2^(e - 1022), so these bounds keep x inside [RANGE_LO, RANGE_HI].
EXP_LO = 1023 + math.ceil(math.log2(RANGE_LO))
EXP_HI = 1022 + math.floor(math.log2(RANGE_HI))
TILE = 2048  # grid points per tile: K rows of its buffers (with the halo) stay in L2
BLOCK = 10  # iterations per tile pass (POT checks every 10th iteration; blocks end there)
NO_PROMISE = 1 << 20  # no slope promise for a block: a step no exponent difference reaches
SLOPE_MARGIN = 2  # binary orders the steepest step of log v may grow within a block before it is redone
UNIFORM_ITERATIONS = 50  # after a tile broke its slope promise, one promise per segment for this long
MARGIN = 20  # binary orders v may move within a block before the band must be re-sized
GROUP_MAX = 512  # rows per shared log: a product of 512 mantissas in [1, 2) stays finite
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_INV_LN2 = 1.4426950408889634


def available() -> bool:
    """Whether the compiled solver can run here (numba importable)."""
    return numba is not None


@dataclass(frozen=True)
class SegmentResult:
    """What the compiled solver did to one segment (one tensor)."""

    iterations: int
    error: float
    converged: bool
    band: int
    escaped_at: int  # -1, or the iteration at which values left the plain range
    slope_redone: int = 0  # blocks redone with spread bands after v grew steeper than its slope promise


if numba is not None:
    @intrinsic
    def _f2i(typingctx, x):  # pragma: no cover - compiled
        if x != types.float64:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(64))

        return types.int64(types.float64), codegen

    @intrinsic
    def _i2f(typingctx, x):  # pragma: no cover - compiled
        if x != types.int64:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.DoubleType())

        return types.float64(types.int64), codegen

    _jit_inline = numba.njit(inline="always", error_model="numpy", cache=True)
    _jit = numba.njit(error_model="numpy", cache=True, nogil=True)
    # The tile kernel: reductions (min/max, sums) may be reordered and a*b+c fused, which
    # changes results in the last bits only; no value is NaN or infinite there (inputs are
    # finite and every value is checked against the plain range before it is used again).
    _jit_tile = numba.njit(error_model="numpy", cache=True, nogil=True,
                           fastmath={"nnan", "ninf", "nsz", "contract", "reassoc"})
    _jit_parallel = numba.njit(error_model="numpy", cache=True, nogil=True, parallel=True)

    @_jit_inline
    def _vlog(x):  # pragma: no cover - compiled
        """log(x) for normal positive x, within 1 ulp (fdlibm's polynomial), written to vectorize."""
        bits = _f2i(x) + (0x3FF0000000000000 - 0x3FE6A09E667F3BCD)  # mantissa split at sqrt(1/2)
        e = (bits >> 52) - 1023
        m = _i2f((bits & 0x000FFFFFFFFFFFFF) + 0x3FE6A09E667F3BCD)
        f = m - 1.0
        s = f / (2.0 + f)
        z = s * s
        w = z * z
        t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01))
        t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01
                                                                                + w * 1.479819860511658591e-01)))
        hfsq = 0.5 * f * f
        ef = float(e)
        return ef * _LN2_HI - ((hfsq - (s * (hfsq + t2 + t1) + ef * _LN2_LO)) - f)

    @_jit_inline
    def _vexp(x):  # pragma: no cover - compiled
        """exp(x) for |x| < 700, within 2 ulp (degree-13 Taylor on |r| <= ln2/2), written to vectorize."""
        nf = math.floor(x * _INV_LN2 + 0.5)
        r = (x - nf * _LN2_HI) - nf * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        return p * _i2f((np.int64(nf) + 1023) << 52)

    @_jit_inline
    def flush_group(lb, pm, pe, lk, m):  # pragma: no cover - compiled
        """lb[i] += lk log(pm[i] 2^pe[i]) for i < m (one group of equally weighted rows); pm, pe reset."""
        for i in range(m):
            lb[i] += lk * (_vlog(pm[i]) + pe[i] * _LN2_HI + pe[i] * _LN2_LO)
            pm[i] = 1.0
            pe[i] = 0

    @_jit
    def vlog_array(x, out):  # pragma: no cover - compiled
        for i in range(x.size):
            out[i] = _vlog(x[i])

    @_jit
    def vexp_array(x, out):  # pragma: no cover - compiled
        for i in range(x.size):
            out[i] = _vexp(x[i])

    @_jit_inline
    def _stencil_passes(x, lo, hi, seg_lo, seg_hi, w, band, out):  # pragma: no cover - compiled
        """out[i - lo] = sum_{|d| <= band, seg_lo <= i+d < seg_hi} w[|d|] x[i+d] for i in [lo, hi), one pass per d.

        Every loop runs over zero-based slices, so no index can be negative and LLVM
        vectorizes them (a signed index costs a wrap-around test per access).
        """
        m = hi - lo
        xs = x[lo:hi]
        for i in range(m):
            out[i] = xs[i]
        for d in range(1, band + 1):
            wd = w[d]
            a0 = min(hi, max(lo, seg_lo + d))  # first i with a left neighbour i - d in the segment
            left, dst = x[a0 - d:hi - d], out[a0 - lo:m]
            for i in range(hi - a0):
                dst[i] += wd * left[i]
            b1 = max(lo, min(hi, seg_hi - d))  # i < b1 have a right neighbour i + d in the segment
            right = x[lo + d:b1 + d]
            for i in range(b1 - lo):
                out[i] += wd * right[i]

    @_jit_inline
    def _finish(out, a, lo, hi, divide):  # pragma: no cover - compiled
        """out[i] = a[i] / out[i] for i in [lo, hi) when ``divide``."""
        if divide:
            for i in range(lo, hi):
                out[i] = a[i] / out[i]

    @_jit_inline
    def _exp_step(x, y):  # pragma: no cover - compiled
        """|biased exponent of x - that of y|: |log x - log y| < (this + 1) ln 2 for positive normal x, y."""
        return abs((_f2i(x) >> 52) - (_f2i(y) >> 52))

    @_jit_inline
    def _steepest(x, lo, hi):  # pragma: no cover - compiled
        """max of ``_exp_step`` over the pairs (x[i - 1], x[i]), i in [lo, hi), lo >= 1 (zero-based slices:
        the loop vectorizes)."""
        top = 0
        c, left = x[lo:hi], x[lo - 1:hi - 1]
        for i in range(hi - lo):
            top = max(top, _exp_step(c[i], left[i]))
        return top

    def _make_stencil(check):
        """The band stencil, and with ``check`` (a constant of the compiled code, so the loops carry no test)
        also the steepest ``_exp_step`` of x over the pairs (i - 1, i) inside the segment, i in [lo, hi),
        measured in the same pass (no extra load)."""

        @_jit_inline
        def stencil(x, lo, hi, seg_lo, seg_hi, w, band, out, a, divide):  # pragma: no cover - compiled
            """out[i - lo] = (K x)[i] for i in [lo, hi), the band stencil of ``_stencil_passes``, or
            a[i - lo] / (K x)[i] when ``divide``; interior points in one pass (K x never stored) when
            1 <= band <= 4. Returns the steepest step when checking, else 0."""
            top = 0
            ia, ib = max(lo, seg_lo + band), min(hi, seg_hi - band)
            if band == 0 or band > 4 or ib - ia < 16:
                if check:
                    top = _steepest(x, max(lo, seg_lo + 1), hi)
                _stencil_passes(x, lo, hi, seg_lo, seg_hi, w, band, out)
                _finish(out, a, 0, hi - lo, divide)
                return top
            if check:
                top = max(_steepest(x, max(lo, seg_lo + 1), ia), _steepest(x, ib, hi))
            _stencil_passes(x, lo, ia, seg_lo, seg_hi, w, band, out)
            _finish(out, a, 0, ia - lo, divide)
            _stencil_passes(x, ib, hi, seg_lo, seg_hi, w, band, out[ib - lo:])
            _finish(out, a, ib - lo, hi - lo, divide)
            n = ib - ia
            dst, c, ad = out[ia - lo:ib - lo], x[ia:ib], a[ia - lo:ib - lo]
            w1, w2 = w[1], w[2] if band >= 2 else 0.0
            w3, w4 = w[3] if band >= 3 else 0.0, w[4] if band >= 4 else 0.0
            l1, r1 = x[ia - 1:ib - 1], x[ia + 1:ib + 1]
            if band == 1:
                for i in range(n):
                    y = c[i] + w1 * (l1[i] + r1[i])
                    dst[i] = ad[i] / y if divide else y
                    if check:
                        top = max(top, _exp_step(c[i], l1[i]))
                return top
            l2, r2 = x[ia - 2:ib - 2], x[ia + 2:ib + 2]
            if band == 2:
                for i in range(n):
                    y = c[i] + w1 * (l1[i] + r1[i]) + w2 * (l2[i] + r2[i])
                    dst[i] = ad[i] / y if divide else y
                    if check:
                        top = max(top, _exp_step(c[i], l1[i]))
                return top
            l3, r3 = x[ia - 3:ib - 3], x[ia + 3:ib + 3]
            if band == 3:
                for i in range(n):
                    y = c[i] + w1 * (l1[i] + r1[i]) + w2 * (l2[i] + r2[i]) + w3 * (l3[i] + r3[i])
                    dst[i] = ad[i] / y if divide else y
                    if check:
                        top = max(top, _exp_step(c[i], l1[i]))
                return top
            l4, r4 = x[ia - 4:ib - 4], x[ia + 4:ib + 4]
            for i in range(n):
                y = (c[i] + w1 * (l1[i] + r1[i]) + w2 * (l2[i] + r2[i]) + w3 * (l3[i] + r3[i])
                     + w4 * (l4[i] + r4[i]))
                dst[i] = ad[i] / y if divide else y
                if check:
                    top = max(top, _exp_step(c[i], l1[i]))
            return top

        return stencil

    _stencil = _make_stencil(False)
    _stencil_checked = _make_stencil(True)

    @_jit_inline
    def _mant_acc(y, pm, pe, i):  # pragma: no cover - compiled
        """pm[i] *= the mantissa of y (in [1, 2)); pe[i] += its unbiased binary exponent."""
        bits = _f2i(y)
        pm[i] *= _i2f((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
        pe[i] += (bits >> 52) - 1023

    @_jit_inline
    def _slope_c(n):  # pragma: no cover - compiled
        """The log of the slope bound's tolerance for a segment of n points: terms left out are below e^-c of
        the centre, c = 40 + log 2n (``sinkhorn_wide.slope_band``)."""
        return 40.0 + math.log(2.0 * n)

    @_jit
    def _slope_band(reg, slope, n):  # pragma: no cover - compiled
        """Half-width D with every term beyond it below e^-c (``_slope_c``) of the centre when log x steps by
        <= ``slope`` between neighbours: a term at distance d is at most e^(slope d - d^2 / reg) of it, so
        D + 1 >= reg (slope + sqrt(slope^2 + 4 c / reg)) / 2 (``sinkhorn_wide.slope_band``'s bound)."""
        c = _slope_c(n)
        return max(0, math.ceil(reg * (slope + math.sqrt(slope * slope + 4.0 * c / reg)) / 2.0) - 1)

    @_jit
    def _promise_band(reg, bits, n):  # pragma: no cover - compiled
        """``_slope_band`` for a promise of ``bits`` (log x steps by < (bits + 1) ln 2), at least 1: a band
        of 0 reads no neighbours, and the promise is checked on the neighbours a stencil reads."""
        return max(1, _slope_band(reg, (bits + 1) * math.log(2.0) + 1e-9, n))

    @_jit_tile
    def _tile_block(t, tid, s, nsteps, check_last, bv, bu, alo, ahi, slope_bits, slope_bits_u, a1, lam, group_end,
                    seg_lo, seg_hi, tile_lo, tile_hi, w, v_cur, v_next, b, vloc, aloc, ubuf, kubuf, lbuf, bbuf, mbuf,
                    pmbuf, pebuf, t_stat):  # pragma: no cover - compiled
        """``nsteps`` iterations on tile t of segment s, from a private copy of v with a halo.

        Overlapped tiling: the tile copies v and a on [lo - H, hi + H) (clipped to the
        segment), H = nsteps (bv + bu); each iteration's valid region shrinks by bv + bu on
        every side that is not a segment edge, so after ``nsteps`` the tile's own points are
        exact and no tile waits for another. Flags (t_stat[t, 2] = 1) any new v outside ``[alo, ahi]``
        (biased exponents: the interval the band was sized for, inside the plain range), and
        (t_stat[t, 2] = 2) a v it reads whose neighbours' binary exponents differ by more than
        ``slope_bits`` (the tile's promise: (slope_bits + 1) ln 2 nats per point; its bands are sized
        for the largest promise within its reach, see ``_iterate``), or a u it reads whose neighbours'
        exponents differ by more than ``slope_bits_u`` (the same for u).
        With v in the plain range and a + 1e-16 in [1e-16, 1], u and K u stay within
        [1e-116 / sum(w), 1e100], far from under- and overflow, so they need no check.
        t_stat[t] = [min exponent of v, max exponent of v, bad, error partial, u band, the steepest
        exponent step of the v's read (pairs inside [q0, q1), which every tile's regions cover), the
        same for the u's read (pairs inside [c0, c1))].
        """
        n_rows = a1.shape[0]
        lo, hi = tile_lo[t], tile_hi[t]
        sl, sh = seg_lo[s], seg_hi[s]
        step = bv + bu
        r0, r1 = max(sl, lo - nsteps * step), min(sh, hi + nsteps * step)
        width = r1 - r0
        lsl, lsh = sl - r0, sh - r0  # segment bounds in local coordinates
        for k in range(n_rows):
            vloc[k, :width] = v_cur[k, r0:r1]
            aloc[k, :width] = a1[k, r0:r1]
        left_edge, right_edge = r0 == sl, r1 == sh
        lb, bb, pm, pe, u = lbuf[tid], bbuf[tid], pmbuf[tid], pebuf[tid], ubuf[tid]
        bad = 0.0
        steep = 0
        steep_u = 0
        vmin, vmax = EXP_HI + 1, 0
        err = 0.0
        c0, c1 = 0, width
        for j in range(nsteps):
            p0 = 0 if left_edge else j * step
            p1 = width if right_edge else width - j * step
            q0, q1 = (p0 if left_edge else p0 + bv), (p1 if right_edge else p1 - bv)  # where u is exact
            c0, c1 = (q0 if left_edge else q0 + bu), (q1 if right_edge else q1 - bu)  # where K u and new v are
            mc = c1 - c0
            lb[:mc] = 0.0
            pm[:mc] = 1.0
            pe[:mc] = 0
            pending = -1
            for k in range(n_rows):
                # the pairs of v read here, (i - 1, i) for i in [q0, q1) inside the segment (every tile's
                # regions cover its own points and its seams), against the slope the v band was sized for
                top = _stencil_checked(vloc[k], q0, q1, lsl, lsh, w, bv, u, aloc[k, q0:q1], True) if bv > 0 else \
                    _stencil(vloc[k], q0, q1, lsl, lsh, w, bv, u, aloc[k, q0:q1], True)
                steep = max(steep, top)
                if top > slope_bits:
                    bad = 2.0  # v is steeper than the v band was sized for
                    break
                ku = kubuf[k]
                # log b = sum_groups lambda_g log prod_{k in g} (K u_k): rows of equal weight share one
                # log of the product of their mantissas (each in [1, 2)) plus the sum of their exponents,
                # taken two rows at a time (K u in [1e-117, 1e101], so a product of two is normal).
                top = _stencil_checked(u, c0 - q0, c1 - q0, lsl - q0, lsh - q0, w, bu, ku, ku, False) \
                    if bu > 0 else _stencil(u, c0 - q0, c1 - q0, lsl - q0, lsh - q0, w, bu, ku, ku, False)
                steep_u = max(steep_u, top)
                if top > slope_bits_u:
                    bad = 2.0  # u is steeper than the u band was sized for
                    break
                if pending >= 0:  # a row of this group waits: one product of the two per point
                    kp = kubuf[pending]
                    for i in range(mc):
                        _mant_acc(kp[i] * ku[i], pm, pe, i)
                    pending = -1
                elif group_end[k]:
                    for i in range(mc):
                        _mant_acc(ku[i], pm, pe, i)
                else:
                    pending = k  # the next row is of the same group
                if group_end[k]:
                    flush_group(lb, pm, pe, lam[k], mc)
            if bad != 0.0:
                break
            for i in range(mc):
                bb[i] = _vexp(lb[i])
            if check_last and j == nsteps - 1:  # POT's error on the tile's own points: sum_i std_k(v_k (K u_k))
                o0, o1 = lo - r0 - c0, hi - r0 - c0
                mean = mbuf[tid]
                mean[:o1 - o0] = 0.0
                for k in range(n_rows):
                    ku, vk = kubuf[k, o0:o1], vloc[k, c0 + o0:c0 + o1]
                    for i in range(o1 - o0):
                        mean[i] += vk[i] * ku[i]
                for i in range(o1 - o0):
                    mean[i] /= n_rows
                var = pm
                var[:o1 - o0] = 0.0
                for k in range(n_rows):
                    ku, vk = kubuf[k, o0:o1], vloc[k, c0 + o0:c0 + o1]
                    for i in range(o1 - o0):
                        dlt = vk[i] * ku[i] - mean[i]
                        var[i] += dlt * dlt
                for i in range(o1 - o0):
                    err += math.sqrt(var[i] / n_rows)
            vmin, vmax = EXP_HI + 1, 0
            # v = b / K u, two rows per division: r = 1 / (K u_k K u_l), b / K u_k = b (r K u_l). With K u
            # in [1e-117, 1e101] the product, r and r K u_l are normal (a few ulp from the division); a
            # v out of the plain range is caught below whatever its rounding.
            for k in range(0, n_rows - 1, 2):
                ka, kb, va, vb = kubuf[k], kubuf[k + 1], vloc[k, c0:c1], vloc[k + 1, c0:c1]
                for i in range(mc):
                    r = 1.0 / (ka[i] * kb[i])
                    xa = bb[i] * (r * kb[i])
                    xb = bb[i] * (r * ka[i])
                    va[i] = xa
                    vb[i] = xb
                    ea, eb = _f2i(xa) >> 52, _f2i(xb) >> 52
                    vmin = min(vmin, min(ea, eb))
                    vmax = max(vmax, max(ea, eb))
            if n_rows % 2 == 1:
                ku, vn = kubuf[n_rows - 1], vloc[n_rows - 1, c0:c1]
                for i in range(mc):
                    x = bb[i] / ku[i]
                    vn[i] = x
                    e = _f2i(x) >> 52
                    vmin = min(vmin, e)
                    vmax = max(vmax, e)
            if vmin < alo or vmax > ahi:
                bad = 1.0
                break
        if bad == 0.0:
            o0 = lo - r0
            for k in range(n_rows):
                v_next[k, lo:hi] = vloc[k, o0:o0 + hi - lo]
            b[lo:hi] = bb[o0 - c0:o0 - c0 + hi - lo]
            t_stat[t, 0] = vmin
            t_stat[t, 1] = vmax
            t_stat[t, 3] = err
        t_stat[t, 2] = bad
        t_stat[t, 4] = bu
        t_stat[t, 5] = steep
        t_stat[t, 6] = steep_u

    @_jit
    def reach_of(nsteps, band_v, band_u):  # pragma: no cover - compiled
        """How far from a tile the v's and u's its stencils read or leave out (within the spread bands
        ``band_v``, ``band_u``) can lie over a block of ``nsteps``: its halo and the bands, with room."""
        return (nsteps + 1) * (band_v + band_u)

    @_jit
    def reach_steep(t, tile_seg, tile_lo, tile_hi, tile_steep, reach):  # pragma: no cover - compiled
        """The largest ``tile_steep`` among tile t and the tiles of its segment with a point within ``reach``
        of it (tiles are sorted and contiguous within a segment)."""
        s, q = tile_seg[t], tile_steep[t]
        o = t - 1
        while o >= 0 and tile_seg[o] == s and tile_hi[o] > tile_lo[t] - reach:
            q = max(q, tile_steep[o])
            o -= 1
        o = t + 1
        while o < tile_seg.shape[0] and tile_seg[o] == s and tile_lo[o] < tile_hi[t] + reach:
            q = max(q, tile_steep[o])
            o += 1
        return q

    @_jit
    def _band(reg, spread, n, cap):  # pragma: no cover - compiled
        """``band_halfwidth`` capped at ``cap``."""
        d = math.ceil(math.sqrt(reg * (max(spread, 0.0) + math.log(2.0 * n) + 40.0))) - 1
        return min(cap, min(n - 1, max(0, d)))

    @_jit_parallel
    def _iterate(a1, lam, group_end, seg_lo, seg_hi, tile_seg, tile_lo, tile_hi, tile_slope_a, w, reg, band_cap,
                 spread_a, max_iter, stop_threshold, v_cur, v_next, b, out_iter, out_err, out_conv, out_band,
                 out_escaped, out_redone, nthreads, block, margin, slopes, slope_margin):  # pragma: no cover - compiled
        """Run the plain-domain iterate on every segment; returns the array holding the last good v.

        Each segment advances in blocks of up to ``block`` iterations that end at POT's check
        iterations (``ii % 10 == 1``), with the band sized for v staying within ``margin``
        binary orders of its range at the block's start. A block that breaks that promise is
        redone with a 4x wider margin (a slightly wider band), and once the margin spans the
        whole plain range, one iteration at a time (band from the actual range); a segment whose
        values leave the plain range then is handed back (``out_escaped``) with its last good v.

        Bands from slopes (``slopes``), per tile: tile t promises P_t, the steepest binary-exponent
        step of v between neighbours that it read in the last block plus ``slope_margin``, and
        checks it on every v it reads this block (the pairs of its u region, which include its own
        points at every iteration). So every pair of the segment is within the promise of the tile
        that owns it, and the v's a stencil of tile t reads or leaves out (within the spread band)
        lie among the points of the tiles within reach of t: log v steps there by < (Q_t + 1) ln 2,
        Q_t the largest promise within reach. The band of K v is the smaller of the spread one and
        the slope one (``_slope_band``) for Q_t. A block in which any tile breaks its promise is
        redone with one promise for all the segment's tiles (the steepest step any of them read, plus
        the margin), kept for ``UNIFORM_ITERATIONS`` (early in a run on trained weights single tiles
        steepen by more than the margin per block: 23 blocks redone on a round of trained MNIST MLPs
        instead of 5, and 12 with this), and a block that breaks that too is redone with the spread
        bands. The band of K u is the smallest of the spread one and two slope
        ones: u's own promises, made and checked the same way on the u's each tile reads (Q^u_t; a tile
        whose u band is 0 reads no neighbour, checks nothing and so promises nothing), and
        the bound from v's: log u = log(a + 1e-16) - log K v steps by at most log a's steepest step
        within the tile's reach (``tile_slope_a``, nats) + (Q_t + 1) ln 2 + ln 2 (log K v is at most
        log 2 steeper than log v: K is a positive combination of shifted copies, clipped at the
        segment's edges). Terms beyond the reach are farther than the spread band, where the spread
        bound holds. (One promise per segment, its steepest step anywhere, gave v bands of 3 where
        most tiles need 2; the u bound from v's promise gave u bands of 3 where u's own gives 2.)
        """
        log_wsum = math.log(w.sum() * 2.0 - 1.0)  # log of the kernel's total weight, sum_d w_|d|
        ln2 = math.log(2.0)
        n_rows = a1.shape[0]
        n_seg = seg_lo.shape[0]
        n_tiles = tile_lo.shape[0]
        max_tile = 0
        for t in range(n_tiles):
            max_tile = max(max_tile, tile_hi[t] - tile_lo[t])
        t_stat = np.zeros((n_tiles, 7))
        active = np.ones(n_seg, np.bool_)
        stepwise = np.zeros(n_seg, np.bool_)
        stepwise_until = np.zeros(n_seg, np.int64)
        seg_margin = np.full(n_seg, margin)  # widened (x4) for a segment whose v moves faster
        ii = np.zeros(n_seg, np.int64)
        v_lo = np.full(n_seg, 1023)  # biased exponents of min v and max v (v = 1 at the start)
        v_hi = np.full(n_seg, 1023)
        nsteps = np.zeros(n_seg, np.int64)
        band_v = np.zeros(n_seg, np.int64)
        band_u = np.zeros(n_seg, np.int64)
        a_lo = np.zeros(n_seg, np.int64)
        a_hi = np.zeros(n_seg, np.int64)
        check_last = np.zeros(n_seg, np.bool_)
        seg_slope = np.zeros(n_seg, np.bool_)  # this block's v bands come from slope promises
        no_slope = np.ones(n_seg, np.bool_)  # no measured slope yet, or the last block broke its promise
        uniform_until = np.zeros(n_seg, np.int64)  # before this iteration a segment's tiles share one promise
        tile_steep = np.zeros(n_tiles, np.int64)  # steepest exponent step of v each tile read in the last block
        tile_promise = np.full(n_tiles, NO_PROMISE)  # what each tile checks the v it reads against
        tile_steep_u = np.zeros(n_tiles, np.int64)
        tile_promise_u = np.full(n_tiles, NO_PROMISE)
        tile_bv = np.zeros(n_tiles, np.int64)  # each tile's bands for the block
        tile_bu = np.zeros(n_tiles, np.int64)
        for s in range(n_seg):
            out_iter[s] = 0
            out_err[s] = np.inf
            out_conv[s] = False
            out_band[s] = 0
            out_escaped[s] = -1
            out_redone[s] = 0
        while True:
            any_active = False
            halo = 0
            for s in range(n_seg):
                if not active[s]:
                    continue
                if ii[s] >= max_iter:
                    active[s] = False
                    continue
                any_active = True
                n = seg_hi[s] - seg_lo[s]
                end = ii[s] + 1 + (10 - (ii[s] + 9) % 10) % 10 if ii[s] > 1 else 2  # blocks end after a check
                if stepwise[s] and ii[s] >= stepwise_until[s]:
                    stepwise[s] = False  # the hard stretch is over: blocks again
                if stepwise[s]:
                    lo_e, hi_e = v_lo[s], v_hi[s]
                    a_lo[s], a_hi[s] = EXP_LO, EXP_HI
                    steps = 1
                else:
                    lo_e, hi_e = max(EXP_LO, v_lo[s] - seg_margin[s]), min(EXP_HI, v_hi[s] + seg_margin[s])
                    a_lo[s], a_hi[s] = lo_e, hi_e
                    steps = min(end - ii[s], block, max_iter - ii[s])
                spread_v = (hi_e - lo_e + 1) * ln2  # >= log(max v / min v) over the block
                # spread of log Kv <= spread of log v + log(sum of kernel weights);
                # spread of log u <= that + spread of log(a + 1e-16)
                band_v[s] = _band(reg, spread_v, n, band_cap)
                band_u[s] = _band(reg, spread_v + spread_a[s] + log_wsum, n, band_cap)
                seg_slope[s] = slopes and not stepwise[s] and not no_slope[s] and band_v[s] > 0
                if not stepwise[s]:  # keep the halo's extra work below about a tile's quarter
                    steps = max(1, min(steps, max_tile // (4 * (band_v[s] + band_u[s]) + 1)))
                nsteps[s] = steps
                check_last[s] = (ii[s] + steps - 1) % 10 == 1
                halo = max(halo, steps * (band_v[s] + band_u[s]))
            if not any_active:
                break
            seg_top = np.zeros(n_seg, np.int64)  # the steepest step any tile of a segment read, for v and u
            seg_top_u = np.zeros(n_seg, np.int64)
            for t in range(n_tiles):
                seg_top[tile_seg[t]] = max(seg_top[tile_seg[t]], tile_steep[t])
                seg_top_u[tile_seg[t]] = max(seg_top_u[tile_seg[t]], tile_steep_u[t])
            for t in range(n_tiles):  # per tile: promise its own steepest step (all the segment's, after a break)
                s = tile_seg[t]
                if not active[s]:
                    continue
                tile_promise[t], tile_promise_u[t] = NO_PROMISE, NO_PROMISE
                if seg_slope[s] and ii[s] < uniform_until[s]:
                    tile_promise[t], tile_promise_u[t] = seg_top[s] + slope_margin, seg_top_u[s] + slope_margin
                elif seg_slope[s]:
                    tile_promise[t], tile_promise_u[t] = tile_steep[t] + slope_margin, tile_steep_u[t] + slope_margin
            for t in range(n_tiles):  # and size its bands for the promises within its reach
                s = tile_seg[t]
                if not active[s]:
                    continue
                tile_bv[t], tile_bu[t] = band_v[s], band_u[s]
                if seg_slope[s]:
                    # every v this tile's stencils use, and every term they leave out within the spread bands,
                    # lies among the points of the tiles within reach: each checks its promise on them
                    n = seg_hi[s] - seg_lo[s]
                    q = reach_steep(t, tile_seg, tile_lo, tile_hi, tile_promise, reach_of(nsteps[s], band_v[s],
                                                                                             band_u[s]))
                    tile_bv[t] = min(_promise_band(reg, q, n), band_v[s])
                    # log u steps by <= log a's + the promised log v's + log 2
                    tile_bu[t] = min(band_u[s], _slope_band(reg, tile_slope_a[t] + (q + 2) * ln2 + 1e-9, n))
                    if tile_bu[t] == 0:  # a band of 0 checks no u: its promise must not size a neighbour's band
                        tile_promise_u[t] = NO_PROMISE
                out_band[s] = max(out_band[s], tile_bv[t])
            for t in range(n_tiles):  # the band of K u also from u's own promises within reach
                s = tile_seg[t]
                if active[s] and seg_slope[s] and tile_bu[t] > 0:
                    qu = reach_steep(t, tile_seg, tile_lo, tile_hi, tile_promise_u,
                                     reach_of(nsteps[s], band_v[s], band_u[s]))
                    tile_bu[t] = min(tile_bu[t], _promise_band(reg, qu, seg_hi[s] - seg_lo[s]))
            width = max_tile + 2 * halo
            vloc = np.empty((nthreads, n_rows, width))
            aloc = np.empty((nthreads, n_rows, width))
            kubuf = np.empty((nthreads, n_rows, width))
            ubuf = np.empty((nthreads, width))
            lbuf = np.empty((nthreads, width))
            bbuf = np.empty((nthreads, width))
            mbuf = np.empty((nthreads, width))
            pmbuf = np.empty((nthreads, width))
            pebuf = np.empty((nthreads, width), np.int64)
            for tid in numba.prange(nthreads):  # one worker per scratch slot; tiles dealt round-robin
                for t in range(tid, n_tiles, nthreads):
                    s = tile_seg[t]
                    if active[s]:
                        _tile_block(t, tid, s, nsteps[s], check_last[s], tile_bv[t], tile_bu[t], a_lo[s], a_hi[s],
                                    tile_promise[t], tile_promise_u[t], a1, lam, group_end, seg_lo, seg_hi,
                                    tile_lo, tile_hi, w, v_cur, v_next, b, vloc[tid], aloc[tid], ubuf, kubuf[tid],
                                    lbuf, bbuf, mbuf, pmbuf, pebuf, t_stat)
            seg_bad = np.zeros(n_seg, np.bool_)
            seg_steep_bad = np.zeros(n_seg, np.bool_)
            seg_err = np.zeros(n_seg)
            new_lo = np.full(n_seg, EXP_HI + 1)
            new_hi = np.zeros(n_seg, np.int64)
            for t in range(n_tiles):
                s = tile_seg[t]
                if not active[s]:
                    continue
                if t_stat[t, 2] == 1.0:
                    seg_bad[s] = True
                elif t_stat[t, 2] == 2.0:
                    seg_steep_bad[s] = True
                else:
                    out_band[s] = max(out_band[s], np.int64(t_stat[t, 4]))
                    new_lo[s] = min(new_lo[s], np.int64(t_stat[t, 0]))
                    new_hi[s] = max(new_hi[s], np.int64(t_stat[t, 1]))
                    seg_err[s] += t_stat[t, 3]
            for t in range(n_tiles):  # the next block's slope promises start from what this one read
                s = tile_seg[t]
                if not active[s]:
                    continue
                keep = seg_bad[s] or seg_steep_bad[s]  # a block redone never promises less than before
                tile_steep[t] = max(tile_steep[t], np.int64(t_stat[t, 5])) if keep else np.int64(t_stat[t, 5])
                tile_steep_u[t] = max(tile_steep_u[t], np.int64(t_stat[t, 6])) if keep else np.int64(t_stat[t, 6])
            for s in range(n_seg):
                if not active[s]:
                    continue
                if seg_bad[s] or seg_steep_bad[s]:  # v_cur is still the block's start: keep it through the swap
                    for k in range(n_rows):
                        v_next[k, seg_lo[s]:seg_hi[s]] = v_cur[k, seg_lo[s]:seg_hi[s]]
                    if not seg_bad[s]:  # a slope promise broke: redo with one promise for the whole segment
                        if ii[s] < uniform_until[s]:  # (which broke too: with the spread bands)
                            no_slope[s] = True
                        uniform_until[s] = ii[s] + UNIFORM_ITERATIONS
                        out_redone[s] += 1
                    elif stepwise[s]:  # values left the plain range: the log domain takes over from here
                        active[s] = False
                        out_escaped[s] = ii[s]
                        out_iter[s] = ii[s]
                    elif seg_margin[s] < EXP_HI - EXP_LO:  # the band's promise broke: redo with a wider one
                        seg_margin[s] *= 4
                    else:  # even the whole plain range was not enough: one iteration at a time up to the check
                        stepwise[s] = True
                        stepwise_until[s] = ii[s] + nsteps[s]
                    continue
                ii[s] += nsteps[s]
                no_slope[s] = False
                out_iter[s] = ii[s]
                v_lo[s], v_hi[s] = new_lo[s], new_hi[s]
                if check_last[s]:
                    out_err[s] = seg_err[s]
                    if seg_err[s] < stop_threshold:
                        active[s] = False
                        out_conv[s] = True
            v_cur, v_next = v_next, v_cur
        return v_cur


def _tiles(seg_lo: np.ndarray, seg_hi: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    segs, los, his = [], [], []
    for s, (lo, hi) in enumerate(zip(seg_lo.tolist(), seg_hi.tolist(), strict=True)):
        count = max(1, -(-(hi - lo) // tile))
        edges = np.linspace(lo, hi, count + 1).astype(np.int64)
        segs += [s] * count
        los += edges[:-1].tolist()
        his += edges[1:].tolist()
    return np.array(segs, np.int64), np.array(los, np.int64), np.array(his, np.int64)


def tile_slopes(a1: np.ndarray, seg_lo: np.ndarray, seg_hi: np.ndarray, tile_seg: np.ndarray,
                tile_lo: np.ndarray, tile_hi: np.ndarray, reach: int) -> np.ndarray:
    r"""Per tile, a bound (nats) on :math:`|\log a_{k,i+1} - \log a_{k,i}|` over every row and every pair
    within ``reach`` points of the tile, inside its segment: (exponent difference + 1) ln 2."""
    ex = (a1.view(np.int64) >> 52).astype(np.int64)
    step = np.abs(np.diff(ex, axis=1)).max(axis=0) if a1.shape[1] > 1 else np.zeros(0, np.int64)
    out = np.empty(len(tile_seg))
    for t, (s, lo, hi) in enumerate(zip(tile_seg.tolist(), tile_lo.tolist(), tile_hi.tolist(), strict=True)):
        p0, p1 = max(int(seg_lo[s]), lo - reach), min(int(seg_hi[s]), hi + reach) - 1  # pairs (i, i + 1), i in [p0, p1)
        out[t] = (float(step[p0:p1].max()) + 1.0) * math.log(2.0) if p1 > p0 else 0.0
    return out


def row_groups(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ordered by weight (equal weights side by side: one log per group and point), the sorted
    weights, and where each group of at most ``GROUP_MAX`` equal weights ends."""
    order = np.argsort(lam, kind="stable")
    lam = lam[order]
    group_end = np.ones(len(lam), np.bool_)
    for k in range(len(lam) - 1):
        group_end[k] = not (lam[k] == lam[k + 1] and k % GROUP_MAX != GROUP_MAX - 1)
    return order, lam, group_end


def plain_barycenters(hists: list[np.ndarray], lam: np.ndarray, *, reg: float, stop_threshold: float,
                      max_iter: int, tile: int = TILE, slopes: bool = True
                      ) -> tuple[list[np.ndarray], list[SegmentResult], list[np.ndarray | None]]:
    r"""Entropic barycenters of several (K, n_s) histogram stacks with one compiled iteration.

    ``lam`` (K,) are the normalized weights. Returns, per stack: the barycenter :math:`b`
    (n_s,), a ``SegmentResult``, and for a segment that left the plain range the last good
    :math:`v` (K, n_s) to continue from in the log domain (else ``None``).
    """
    if numba is None:  # pragma: no cover
        raise RuntimeError("the compiled entropic solver needs numba")
    k_rows = len(lam)
    order, lam, group_end = row_groups(np.asarray(lam, dtype=np.float64))
    hists = [h[order] for h in hists]
    sizes = [h.shape[1] for h in hists]
    seg_hi = np.cumsum(sizes).astype(np.int64)
    seg_lo = (seg_hi - np.array(sizes, np.int64)).astype(np.int64)
    a1 = np.empty((k_rows, int(seg_hi[-1])))
    spread_a = np.empty(len(hists))
    for s, h in enumerate(hists):
        block = a1[:, seg_lo[s]:seg_hi[s]]
        np.add(h, LOG_FLOOR, out=block)
        spread_a[s] = math.log(float(block.max()) / float(block.min()))
    band_cap = max(band_halfwidth(reg, 2 * math.log(RANGE_HI) + float(spread_a.max()) + log_kernel_bound(reg),
                                  max(sizes)), 1)
    w = np.exp(-np.arange(band_cap + 1, dtype=np.float64) ** 2 / reg)
    tile_seg, tile_lo, tile_hi = _tiles(seg_lo, seg_hi, tile)
    # a tile reads at most BLOCK (band_v + band_u) points beyond itself, its u stencil band_u more
    slope_a = tile_slopes(a1, seg_lo, seg_hi, tile_seg, tile_lo, tile_hi, (2 * BLOCK + 1) * band_cap)
    v_cur = np.ones_like(a1)
    v_next = np.empty_like(a1)
    b = np.empty(a1.shape[1])
    n_seg = len(hists)
    it, err = np.zeros(n_seg, np.int64), np.zeros(n_seg)
    conv, band, esc = np.zeros(n_seg, np.bool_), np.zeros(n_seg, np.int64), np.zeros(n_seg, np.int64)
    redone = np.zeros(n_seg, np.int64)
    v_last = _iterate(a1, lam, group_end, seg_lo, seg_hi, tile_seg, tile_lo, tile_hi, slope_a,
                      w, float(reg), band_cap, spread_a, int(max_iter), float(stop_threshold), v_cur, v_next, b,
                      it, err, conv, band, esc, redone, numba.get_num_threads(), BLOCK, MARGIN, slopes, SLOPE_MARGIN)
    bs, results, vs = [], [], []
    for s in range(n_seg):
        lo, hi = int(seg_lo[s]), int(seg_hi[s])
        bs.append(b[lo:hi].copy())
        results.append(SegmentResult(iterations=int(it[s]), error=float(err[s]), converged=bool(conv[s]),
                                     band=int(band[s]), escaped_at=int(esc[s]), slope_redone=int(redone[s])))
        if esc[s] >= 0:
            v = np.empty((k_rows, hi - lo))
            v[order] = v_last[:, lo:hi]
            vs.append(v)
        else:
            vs.append(None)
    return bs, results, vs


def warm_up() -> float:
    """Compile (or load from numba's cache) the kernels with a tiny problem; returns the seconds taken.

    The first entropic fusion of a process otherwise pays this inside its round: seconds from
    the cache, about half a minute where nothing is cached yet (a fresh install).
    """
    import time

    start = time.perf_counter()
    if numba is not None:
        h = np.full((2, 64), 1.0 / 64)
        plain_barycenters([h], np.array([0.5, 0.5]), reg=0.1, stop_threshold=0.0, max_iter=12)
    return time.perf_counter() - start
