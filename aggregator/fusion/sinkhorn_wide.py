r"""The plain-domain entropic iterate with a binary exponent per value: no range to leave.

Where :mod:`aggregator.fusion.sinkhorn_fast` hands a segment back because its scalings left
``[1e-100, 1e100]`` (trained weights do: the potentials of a histogram with one exact zero
spread by about one nat per iteration), this solver continues *the same iterate* with
every scaling stored as a pair :math:`x = m \cdot 2^{e}`, :math:`m \in [1, 2)` (float64)
and :math:`e` (int64). One iteration is, per row :math:`k` and grid point :math:`i`,

.. math::
    u_k = \frac{a_k + 10^{-16}}{K v_k}, \qquad
    \log b = \sum_k \lambda_k \log (K u_k), \qquad
    v_k \leftarrow \frac{b}{K u_k},

with the band stencil :math:`(Kx)_i = \sum_{|d| \le D} w_d x_{i+d}` evaluated against the
largest term's exponent :math:`r_i = \max_d (e_{i+d} + \epsilon_d)` (:math:`w_d = \mu_d
2^{\epsilon_d}`, so weights far below float64's range are kept too):
:math:`(Kx)_i = 2^{r_i} \sum_d \mu_d m_{i+d} 2^{e_{i+d} + \epsilon_d - r_i}`. Every power of
two is built from its exponent bits, so an iteration has no transcendental function but
one vectorizable logarithm per point and group of equally weighted rows (for
:math:`\log b`) and one exponential per point (for :math:`b`), as the plain solver; terms
below :math:`2^{-1022}` of the largest are dropped (a relative change under 1e-300).

Band: the left-out terms are bounded as in :func:`aggregator.fusion.sinkhorn.band_halfwidth`,
by :math:`e^{-40}` relative to the centre term, but from the *slope* of the potentials as
well as their spread: with :math:`|\log x_{i+1} - \log x_i| \le L`, a term at distance
:math:`d` is at most :math:`e^{Ld - d^2/\varepsilon}` of the centre one, so

.. math::
    D + 1 \ge \tfrac{\varepsilon}{2}\left(L + \sqrt{L^2 + 4C/\varepsilon}\right),
    \qquad C = 40 + \log 2n

suffices; the band is the smaller of this and the spread bound. Potentials of trained
weights spread by thousands of nats over a tensor but change by at most tens between
neighbours, so the band stays at a few points where the log-domain solver's grows with the
spread. Bands are per chunk of ``CHUNK`` points: :math:`L` within one chunk's reach of the
points a chunk computes, the global slope beyond (where :math:`-d^2/\varepsilon` has long
won; checked, else the global band). The slope of :math:`v` is measured exactly (integer
exponent differences) when it is written; that of :math:`u` is promised from the previous
iteration's plus a margin and checked while :math:`u` is computed; an iteration that
breaks the promise is redone with the proven bound :math:`L_u \le L_a + L_v + \log 2`
(:math:`K` is a positive combination of shifted copies, so :math:`\log Kv` is at most
:math:`\log 2` steeper than :math:`\log v`).

Stopping is POT's: every 10th iteration (``ii % 10 == 1``) the error
:math:`\sum_i \mathrm{std}_k(v_{ki} (K u_k)_i)` (old :math:`v`, new :math:`Ku`) is compared
with ``stop_threshold`` and a segment that stops keeps that iteration's :math:`b`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from aggregator.fusion import sinkhorn_fast as _fast

numba = _fast.numba
CHUNK = 1024  # grid points per work item: K rows of its scratch stay in L2
U_MARGIN = 8  # binary orders the slope of u may grow in one iteration before it is redone
CENTRE_LIMIT = 1000.0  # stencils reference the centre's exponent while no term can exceed 2^this of it
_MANT = 0x000FFFFFFFFFFFFF
_ONE = 0x3FF0000000000000
_LN2 = math.log(2.0)
_ERR_EXP = 500  # v (K u) is clamped below 2^500 for the error (only ever that large far from converging)


class WideResult(NamedTuple):
    """What ``wide_barycenter`` computed."""

    b: np.ndarray  # the barycenter (n,), float64
    iterations: int
    error: float  # the last checked error (POT's)
    converged: bool  # whether it met stop_threshold
    band: int  # the widest band used
    redone: int  # iterations redone after u broke its slope promise


def available() -> bool:
    """Whether the compiled solver can run here (numba importable)."""
    return numba is not None


def slope_band(reg: float, slope: float, n: int) -> int:
    r"""Half-width D so that terms beyond it are below :math:`e^{-40}/(2n)` of the centre for slope ``slope``."""
    c = 40.0 + math.log(2.0 * n)
    need = reg * (slope + math.sqrt(slope * slope + 4.0 * c / reg)) / 2.0
    return int(min(n - 1, max(0, math.ceil(need) - 1)))


def kernel_weights(reg: float, cap: int) -> tuple[np.ndarray, np.ndarray]:
    r""":math:`w_d = e^{-d^2/\varepsilon} = \mu_d 2^{\epsilon_d}` for d = 0..cap: exact splits of the float64
    weight where it is a normal number, from :math:`-d^2/(\varepsilon \ln 2)` beyond."""
    d = np.arange(cap + 1, dtype=np.float64)
    w = np.exp(-d * d / reg)
    mant, ex = np.frexp(w)  # w = mant 2^ex, mant in [0.5, 1)
    mant, ex = mant * 2.0, ex.astype(np.int64) - 1
    far = w < np.finfo(np.float64).tiny
    if far.any():
        log2w = -d[far] ** 2 / (reg * _LN2)
        e = np.floor(log2w)
        mant[far], ex[far] = np.exp2(log2w - e), e.astype(np.int64)
    return mant, ex


if numba is not None:
    _f2i, _i2f, _vexp, _flush_group, _band = _fast._f2i, _fast._i2f, _fast._vexp, _fast.flush_group, _fast._band
    _slope_band, _slope_c = _fast._slope_band, _fast._slope_c
    _LN2_HI, _LN2_LO, _INV_LN2 = _fast._LN2_HI, _fast._LN2_LO, _fast._INV_LN2
    _jit_inline = numba.njit(inline="always", error_model="numpy", cache=True)
    _jit_tile = numba.njit(error_model="numpy", cache=True, nogil=True,
                           fastmath={"nnan", "ninf", "nsz", "contract", "reassoc"})
    _jit = numba.njit(error_model="numpy", cache=True, nogil=True)
    _jit_parallel = numba.njit(error_model="numpy", cache=True, nogil=True, parallel=True)

    @_jit_tile
    def _wstencil_passes(xm, xe, size, lo, hi, wm, we1, band, centred, sm, se):  # pragma: no cover - compiled
        """(K x)_i = sm[i - lo] 2^se[i - lo] for i in [lo, hi): the band stencil on [0, size).

        Reference exponent r_i: the centre's, xe[i], when ``centred`` (the caller has bounded every
        term below 2^1000 of it), else the largest term's, max_d (xe[i+d] + we[d]) (one more pass).
        Sums wm[d] xm[i+d] 2^(xe[i+d] + we[d] - r_i); ``we1`` is we + 1023 (the biased exponent).
        Loops over zero-based slices, one per offset, so LLVM vectorizes them (as ``_stencil_passes``).
        """
        m = hi - lo
        xe0, xm0 = xe[lo:hi], xm[lo:hi]
        for i in range(m):
            se[i] = xe0[i]
        if not centred:
            for d in range(1, band + 1):
                wd = we1[d] - 1023
                a0 = min(hi, max(lo, d))  # first i with a left neighbour i - d >= 0
                left, dst = xe[a0 - d:hi - d], se[a0 - lo:m]
                for i in range(hi - a0):
                    dst[i] = max(dst[i], left[i] + wd)
                b1 = max(lo, min(hi, size - d))  # i < b1 have a right neighbour i + d < size
                right = xe[lo + d:b1 + d]
                for i in range(b1 - lo):
                    se[i] = max(se[i], right[i] + wd)
            for i in range(m):
                sm[i] = xm0[i] * _i2f(max(xe0[i] - se[i] + 1023, 1) << 52)
        else:
            for i in range(m):
                sm[i] = xm0[i]
        for d in range(1, band + 1):
            wd, md = we1[d], wm[d]
            a0 = min(hi, max(lo, d))
            lm, le, dm, de = xm[a0 - d:hi - d], xe[a0 - d:hi - d], sm[a0 - lo:m], se[a0 - lo:m]
            for i in range(hi - a0):
                dm[i] += md * lm[i] * _i2f(max(le[i] + wd - de[i], 1) << 52)
            b1 = max(lo, min(hi, size - d))
            rm, re = xm[lo + d:b1 + d], xe[lo + d:b1 + d]
            for i in range(b1 - lo):
                sm[i] += md * rm[i] * _i2f(max(re[i] + wd - se[i], 1) << 52)

    @_jit_tile
    def _wstencil(xm, xe, size, lo, hi, wm, we1, band, centred, sm, se):  # pragma: no cover - compiled
        """``_wstencil_passes``, with the interior points (every neighbour present) of a centred stencil in
        passes of four offsets (+-d, +-(d+1)) that keep the sum in registers."""
        ia, ib = max(lo, band), min(hi, size - band)
        if not centred or ib - ia < 16:
            _wstencil_passes(xm, xe, size, lo, hi, wm, we1, band, centred, sm, se)
            return
        _wstencil_passes(xm, xe, size, lo, ia, wm, we1, band, centred, sm, se)
        _wstencil_passes(xm, xe, size, ib, hi, wm, we1, band, centred, sm[ib - lo:], se[ib - lo:])
        n = ib - ia
        dm, de = sm[ia - lo:ib - lo], se[ia - lo:ib - lo]
        cm, ce = xm[ia:ib], xe[ia:ib]
        for i in range(n):
            dm[i] = cm[i]
            de[i] = ce[i]
        d = 1
        while d + 1 <= band:
            w1, w2, m1, m2 = we1[d], we1[d + 1], wm[d], wm[d + 1]
            l1m, l1e, r1m, r1e = xm[ia - d:ib - d], xe[ia - d:ib - d], xm[ia + d:ib + d], xe[ia + d:ib + d]
            l2m, l2e = xm[ia - d - 1:ib - d - 1], xe[ia - d - 1:ib - d - 1]
            r2m, r2e = xm[ia + d + 1:ib + d + 1], xe[ia + d + 1:ib + d + 1]
            for i in range(n):
                e0 = de[i]
                s1 = (l1m[i] * _i2f(max(l1e[i] + w1 - e0, 1) << 52) + r1m[i] * _i2f(max(r1e[i] + w1 - e0, 1) << 52))
                s2 = (l2m[i] * _i2f(max(l2e[i] + w2 - e0, 1) << 52) + r2m[i] * _i2f(max(r2e[i] + w2 - e0, 1) << 52))
                dm[i] += m1 * s1 + m2 * s2
            d += 2
        if d == band:
            w1, m1 = we1[d], wm[d]
            l1m, l1e, r1m, r1e = xm[ia - d:ib - d], xe[ia - d:ib - d], xm[ia + d:ib + d], xe[ia + d:ib + d]
            for i in range(n):
                e0 = de[i]
                dm[i] += m1 * (l1m[i] * _i2f(max(l1e[i] + w1 - e0, 1) << 52)
                               + r1m[i] * _i2f(max(r1e[i] + w1 - e0, 1) << 52))

    @_jit_inline
    def _err_value(m, e):  # pragma: no cover - compiled
        """m 2^e as a float64: 0 below 2^-1022, clamped at 2^_ERR_EXP (so squares stay finite)."""
        x = m * _i2f((min(max(e, -1022), _ERR_EXP) + 1023) << 52)
        return x if e >= -1022 else 0.0

    @_jit_inline
    def _normalize(sm, se, m):  # pragma: no cover - compiled
        """Move the exponent of each sm[i] (positive, normal) into se[i], leaving sm[i] in [1, 2)."""
        for i in range(m):
            bits = _f2i(sm[i])
            sm[i] = _i2f((bits & _MANT) | _ONE)
            se[i] += (bits >> 52) - 1023

    @_jit_tile
    def _chunk(c, tid, c0, c1, n, dv, du, cv, cu, check, vm, ve, a1, lam, group_end, wm, we1, vm2, ve2, bm, be,
               um, ue, sm, se, km, ke, lb, pm, pe, mean, var, stat):  # pragma: no cover - compiled
        """One iteration on grid points [c0, c1) of every row; stat[c] = [v min exp, v max exp, v slope,
        u slope, error partial] (slopes: largest exponent step between neighbours inside the chunk for the
        new v, over the u computed here for u)."""
        n_rows = a1.shape[0]
        u0, u1 = max(0, c0 - du - 1), min(n, c1 + du + 1)  # u one point wider: every neighbour pair is seen
        mu, mc = u1 - u0, c1 - c0
        o0 = c0 - u0
        umk, uek, smk, sek, lbt, pmt, pet = um[tid], ue[tid], sm[tid], se[tid], lb[tid], pm[tid], pe[tid]
        kmt, ket = km[tid], ke[tid]
        lbt[:mc] = 0.0
        pmt[:mc] = 1.0
        pet[:mc] = 0
        u_slope = 0
        for k in range(n_rows):
            _wstencil(vm[k], ve[k], n, u0, u1, wm, we1, dv, cv, smk, sek)
            ak = a1[k, u0:u1]
            for i in range(mu):  # u = a / Kv, a's own exponent split off
                bits = _f2i(ak[i])
                umk[i] = _i2f((bits & _MANT) | _ONE) / smk[i]
                uek[i] = (bits >> 52) - 1023 - sek[i]
            _normalize(umk, uek, mu)
            for i in range(mu - 1):
                u_slope = max(u_slope, abs(uek[i + 1] - uek[i]))
            kmk, kek = kmt[k], ket[k]
            _wstencil(umk, uek, mu, o0, o0 + mc, wm, we1, du, cu, kmk, kek)
            _normalize(kmk, kek, mc)
            for i in range(mc):
                pmt[i] *= kmk[i]
                pet[i] += kek[i]
            if group_end[k]:
                _flush_group(lbt, pmt, pet, lam[k], mc)
        bmc, bec = bm[c0:c1], be[c0:c1]
        for i in range(mc):  # b = exp(log b) = p 2^nf, |r| <= ln2/2 (the reduction of _vexp)
            x = lbt[i]
            nf = math.floor(x * _INV_LN2 + 0.5)
            bmc[i] = _vexp((x - nf * _LN2_HI) - nf * _LN2_LO)
            bec[i] = np.int64(nf)
        err = 0.0
        if check:  # POT's error: sum_i std_k(v_k (K u_k)), old v
            mn, vr = mean[tid], var[tid]
            mn[:mc] = 0.0
            vr[:mc] = 0.0
            for k in range(n_rows):
                vmk, vek, kmk, kek = vm[k, c0:c1], ve[k, c0:c1], kmt[k], ket[k]
                for i in range(mc):
                    mn[i] += _err_value(vmk[i] * kmk[i], vek[i] + kek[i])
            for i in range(mc):
                mn[i] /= n_rows
            for k in range(n_rows):
                vmk, vek, kmk, kek = vm[k, c0:c1], ve[k, c0:c1], kmt[k], ket[k]
                for i in range(mc):
                    dlt = _err_value(vmk[i] * kmk[i], vek[i] + kek[i]) - mn[i]
                    vr[i] += dlt * dlt
            for i in range(mc):
                err += math.sqrt(vr[i] / n_rows)
        vmin, vmax, v_slope = np.int64(1) << 62, -(np.int64(1) << 62), 0
        for k in range(n_rows):  # v = b / K u
            kmk, kek, vmo, veo = kmt[k], ket[k], vm2[k, c0:c1], ve2[k, c0:c1]
            for i in range(mc):
                x = bmc[i] / kmk[i]
                bits = _f2i(x)
                vmo[i] = _i2f((bits & _MANT) | _ONE)
                e = bec[i] - kek[i] + (bits >> 52) - 1023
                veo[i] = e
                vmin = min(vmin, e)
                vmax = max(vmax, e)
            for i in range(mc - 1):
                v_slope = max(v_slope, abs(veo[i + 1] - veo[i]))
        stat[c, 0] = vmin
        stat[c, 1] = vmax
        stat[c, 2] = v_slope
        stat[c, 3] = u_slope
        stat[c, 4] = err

    @_jit
    def _chunk_slopes(ve, chunk, out):  # pragma: no cover - compiled
        """out[c] = max |exponent step| over the neighbour pairs of chunk c and the pair across its left edge."""
        n = ve.shape[1]
        for c in range(out.shape[0]):
            lo, hi, sl = max(0, c * chunk - 1), min(n, (c + 1) * chunk), 0
            for k in range(ve.shape[0]):
                row = ve[k, lo:hi]
                for i in range(hi - lo - 1):
                    sl = max(sl, abs(row[i + 1] - row[i]))
            out[c] = sl

    @_jit
    def _band_for(reg, spread, slope, n, cap):  # pragma: no cover - compiled
        """The smaller of the spread bound (the plain solver's ``_band``) and the slope bound (``slope_band``)."""
        return min(_band(reg, spread, n, cap), _slope_band(reg, slope, n))

    @_jit
    def _local_band(reg, spread, local, glob, n, cap, reach):  # pragma: no cover - compiled
        """The band of a chunk whose potentials have slope ``local`` within ``reach`` points of it, ``glob`` beyond.

        Beyond the reach a term at distance d is below e^(local reach + glob (d - reach) - d^2 / eps) of the centre
        (concave in d): the local band stands when that is below e^-C at its largest over d > reach, and the
        local band fits in the reach; otherwise the global one.
        """
        c = _slope_c(n)
        d = _band_for(reg, spread, local, n, cap)
        top = max(reach + 1.0, reg * glob / 2.0)
        if d < reach and local * reach + glob * (top - reach) - top * top / reg <= -c:
            return d
        return _band_for(reg, spread, glob, n, cap)

    @_jit
    def _nbr_max(x, c, r):  # pragma: no cover - compiled
        """max(x[c - r], ..., x[c + r]) over the indices that exist."""
        m = x[c]
        for j in range(max(0, c - r), min(x.shape[0], c + r + 1)):
            m = max(m, x[j])
        return m

    @_jit_parallel
    def _iterate(a1, lam, group_end, wm, we1, reg, cap, spread_a, slope_a, start, max_iter, stop_threshold,
                 vm, ve, vm2, ve2, bm, be, out, nthreads, chunk, u_margin, centre_limit):  # pragma: no cover
        """Iterations ``start`` .. ``max_iter`` - 1 (or to POT's stop).

        out = [iterations, error, converged, widest band, iterations redone].

        Bands per chunk, from the slopes within one chunk of it (v: measured when written; u: the
        previous iteration's plus ``u_margin``, checked, the iteration redone with the proven global
        bound when broken) and the global slopes beyond.
        """
        n_rows, n = a1.shape
        ln2 = math.log(2.0)
        log_wsum = math.log(1.0 + 2.0 * math.sqrt(math.pi * reg)) + 1.0  # >= log sum_d w_d
        n_chunks = (n + chunk - 1) // chunk
        stat = np.zeros((n_chunks, 5))
        v_sl = np.zeros(n_chunks, np.int64)  # per chunk, binary orders
        u_sl = np.zeros(n_chunks, np.int64)
        dv_c = np.zeros(n_chunks, np.int64)
        du_c = np.zeros(n_chunks, np.int64)
        cv_c = np.zeros(n_chunks, np.bool_)
        cu_c = np.zeros(n_chunks, np.bool_)
        u_chk = np.zeros(n_chunks, np.int64)
        _chunk_slopes(ve, chunk, v_sl)
        v_lo, v_hi = ve.min(), ve.max()
        proven = True  # u's slope unknown (first iteration, or a broken promise): the proven bound
        ii, err, conv, band = start, np.inf, False, 0
        big = np.int64(1) << 62
        while ii < max_iter:
            spread_v = (v_hi - v_lo + 1) * ln2
            spread_u = spread_v + spread_a + log_wsum
            l_vg = (v_sl.max() + 1) * ln2
            l_ug = slope_a + l_vg + ln2 + 1e-6  # proven: log Kv is at most log 2 steeper than log v
            du_max = 0
            for c in range(n_chunks):
                if proven:
                    l_u, u_chk[c] = l_ug, big
                else:
                    u_chk[c] = _nbr_max(u_sl, c, 1) + u_margin
                    l_u = min((u_chk[c] + 1) * ln2, l_ug)
                du_c[c] = _local_band(reg, spread_u, l_u, l_ug, n, cap, chunk)
                du_max = max(du_max, du_c[c])
                # K v is needed on the chunk and du + 1 points either side: slopes within a chunk of those
                # points are those of chunks c - 2 .. c + 2 while du + 1 <= chunk
                l_v = (_nbr_max(v_sl, c, 2) + 1) * ln2 if du_c[c] + 1 <= chunk else l_vg
                dv_c[c] = _local_band(reg, spread_v, l_v, l_vg, n, cap, chunk)
                # every term within the band is below 2^(eps L^2 / (4 ln 2) + 2) of its centre: centre
                # references while that cannot overflow
                cv_c[c] = reg * l_v * l_v / (4.0 * ln2) + 2.0 < centre_limit
                cu_c[c] = reg * l_u * l_u / (4.0 * ln2) + 2.0 < centre_limit
            check = ii % 10 == 1
            width = chunk + 2 * (du_max + 1)
            um = np.empty((nthreads, width))
            ue = np.empty((nthreads, width), np.int64)
            sm = np.empty((nthreads, width))
            se = np.empty((nthreads, width), np.int64)
            km = np.empty((nthreads, n_rows, chunk))
            ke = np.empty((nthreads, n_rows, chunk), np.int64)
            lb = np.empty((nthreads, chunk))
            pm = np.empty((nthreads, chunk))
            pe = np.empty((nthreads, chunk), np.int64)
            mean = np.empty((nthreads, chunk))
            var = np.empty((nthreads, chunk))
            for tid in numba.prange(nthreads):
                for c in range(tid, n_chunks, nthreads):
                    c0 = c * chunk
                    _chunk(c, tid, c0, min(n, c0 + chunk), n, dv_c[c], du_c[c], cv_c[c], cu_c[c], check,
                           vm, ve, a1, lam, group_end, wm, we1, vm2, ve2, bm, be, um, ue, sm, se, km, ke, lb, pm,
                           pe, mean, var, stat)
            for c in range(n_chunks):
                u_sl[c] = np.int64(stat[c, 3])
            bad = False
            for c in range(n_chunks):  # u within one chunk of c as steep as promised?
                bad = bad or _nbr_max(u_sl, c, 1) > u_chk[c]
            if bad:  # no: redo this iteration with the proven bound
                proven = True
                out[4] += 1
                continue
            err_sum, new_lo, new_hi = 0.0, big, -big
            for c in range(n_chunks):
                new_lo = min(new_lo, np.int64(stat[c, 0]))
                new_hi = max(new_hi, np.int64(stat[c, 1]))
                err_sum += stat[c, 4]
                band = max(band, max(dv_c[c], du_c[c]))
            if check:
                err = err_sum
                if err < stop_threshold:
                    conv = True
                    ii += 1
                    break
            for c in range(n_chunks):  # the new v's slopes, with the pair across each chunk's left edge
                v_sl[c] = np.int64(stat[c, 2])
                if c > 0:
                    for k in range(n_rows):
                        v_sl[c] = max(v_sl[c], abs(ve2[k, c * chunk] - ve2[k, c * chunk - 1]))
            vm, vm2 = vm2, vm
            ve, ve2 = ve2, ve
            v_lo, v_hi = new_lo, new_hi
            proven = False
            ii += 1
        out[0] = ii
        out[1] = err
        out[2] = 1.0 if conv else 0.0
        out[3] = band


def wide_barycenter(hist: np.ndarray, lam: np.ndarray, v0: np.ndarray, start: int, *, reg: float,
                    stop_threshold: float, max_iter: int, chunk: int = CHUNK, u_margin: int = U_MARGIN,
                    centre_limit: float = CENTRE_LIMIT) -> WideResult:
    r"""Continue the entropic barycenter of ``hist`` (K, n) from scalings ``v0`` (K, n) at iteration ``start``.

    ``lam`` (K,) are normalized weights. Returns a ``WideResult``: :math:`b` (n,) as float64
    (values below the float64 range become 0, as :math:`e^{\log b}` does in the log domain), the
    iteration count, the last checked error, whether it met ``stop_threshold``, the widest band
    used and the iterations redone.
    ``chunk``, ``u_margin`` (binary orders) and ``centre_limit`` (binary orders above the centre
    a term may reach before a stencil takes the largest term's exponent) change the work, not the
    iterate; tests vary them.
    """
    if numba is None:  # pragma: no cover
        raise RuntimeError("the wide-range entropic solver needs numba")
    if not 0 <= start < max_iter:
        raise ValueError(f"start must be in [0, max_iter), got {start} with max_iter {max_iter}")
    k_rows, n = hist.shape
    order, lam_s, group_end = _fast.row_groups(np.asarray(lam, dtype=np.float64))
    a1 = np.ascontiguousarray(hist[order], dtype=np.float64) + _fast.LOG_FLOOR
    log_a = np.log(a1)
    spread_a = float(log_a.max() - log_a.min())
    slope_a = float(np.abs(np.diff(log_a, axis=1)).max()) if n > 1 else 0.0
    m, e = np.frexp(np.ascontiguousarray(v0[order], dtype=np.float64))
    vm, ve = m * 2.0, e.astype(np.int64) - 1
    cap = n - 1
    wm, we = kernel_weights(reg, cap)
    bm, be = np.ones(n), np.zeros(n, np.int64)
    out = np.zeros(5)
    _iterate(a1, lam_s, group_end, wm, we + 1023, float(reg), cap, spread_a, slope_a, int(start), int(max_iter),
             float(stop_threshold), vm, ve, np.empty_like(vm), np.empty_like(ve), bm, be, out,
             numba.get_num_threads(), int(chunk), int(u_margin), float(centre_limit))
    b = np.ldexp(bm, be)
    return WideResult(b, int(out[0]), float(out[1]), bool(out[2]), int(out[3]), int(out[4]))


def warm_up() -> float:
    """Compile (or load from numba's cache) both compiled entropic solvers; returns the seconds taken.

    The plain solver runs every entropic fusion on CPU, this one when a tensor leaves its range
    (trained weights do within the first fusion), so both are ready before the first round.
    """
    import time

    start = time.perf_counter()
    _fast.warm_up()
    if numba is not None:
        h = np.full((2, 64), 1.0 / 64)
        wide_barycenter(h, np.array([0.5, 0.5]), np.ones((2, 64)), 0, reg=0.1, stop_threshold=0.0, max_iter=12)
    return time.perf_counter() - start
