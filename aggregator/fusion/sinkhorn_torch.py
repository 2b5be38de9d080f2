r"""The plain-domain entropic barycenter iterate in torch, for any device; CUDA graphs on a GPU.

Same iterate as :mod:`aggregator.fusion.sinkhorn_fast` (and POT's ``sinkhorn_log``), for all
tensors of a model at once:

.. math::
    u_k = \frac{a_k + 10^{-16}}{K v_k}, \qquad
    \log b = \sum_k \lambda_k \log (K u_k), \qquad
    v_k \leftarrow \frac{b}{K u_k},

with :math:`K` the band stencil :math:`(Kx)_i = \sum_{|d| \le D} e^{-d^2/\varepsilon} x_{i+d}`.

Layout: every tensor is one segment of a zero-padded (K, L) array, with gaps at least as
wide as the widest band between segments, so a stencil never mixes two tensors.

Blocks: the iteration runs in blocks of up to 10 iterations that end at POT's check
iterations (``ii % 10 == 1``), with one band for the whole block, sized for v staying within
``MARGIN`` binary orders of its range at the block's start (the compiled solver's rule).
Inside a block nothing is read back to the host, so on CUDA a block is one captured CUDA
graph, replayed (one launch per block instead of ~30 per iteration). At the block's end one
read-back gives, per segment: whether v left the promised range (then the block is redone
with a 4x wider margin, and once the margin spans the whole plain range one iteration at a
time, where a segment that leaves ``[1e-100, 1e100]`` is handed back with its last good v
for the log domain), POT's stopping error :math:`\sum_i \mathrm{std}_k(v_{ki} (K u_k)_i)`
at check iterations, and the range of v for the next block's band.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from aggregator.fusion.sinkhorn import band_halfwidth, log_kernel_bound
from aggregator.fusion.sinkhorn_fast import BLOCK, LOG_FLOOR, MARGIN, RANGE_HI, RANGE_LO, SegmentResult

STENCILS = ("shift", "conv")


@dataclass
class Layout:
    """Segments side by side in one zero-padded (K, L) array, gaps of ``gap`` points around each."""

    starts: list[int]
    sizes: list[int]
    gap: int
    a1: torch.Tensor  # (K, L): a + 1e-16 on segment points, 0 in gaps
    seg_idx: torch.Tensor  # (L,) int64: segment of each point (0 in gaps; masked by ``realf``)
    realf: torch.Tensor  # (L,) float64: 1 on segment points, 0 in gaps
    gapf: torch.Tensor  # (L,) float64: 1 - realf (added to denominators so gaps never divide by 0)
    spread_a: float  # log(max a1 / min a1) over segment points

    def segments(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each segment's part of ``x`` (along its last axis), copied."""
        return [x[..., st:st + n].clone() for st, n in zip(self.starts, self.sizes, strict=True)]


def layout(hists: list[torch.Tensor], reg: float, spread: float) -> Layout:
    """The layout of ``hists``, its gaps as wide as the band for potentials (log v) spread ``spread``."""
    device = hists[0].device
    k_rows = hists[0].shape[0]
    sizes = [int(h.shape[1]) for h in hists]
    lo = min(float(h.min()) for h in hists) + LOG_FLOOR
    hi = max(float(h.max()) for h in hists) + LOG_FLOOR
    spread_a = math.log(hi / lo)
    gap = max(band_halfwidth(reg, spread + spread_a + log_kernel_bound(reg), max(sizes)), 1)
    starts, pos = [], gap
    for n in sizes:
        starts.append(pos)
        pos += n + gap
    a1 = torch.zeros(k_rows, pos, dtype=torch.float64, device=device)
    seg_idx = torch.zeros(pos, dtype=torch.int64, device=device)
    realf = torch.zeros(pos, dtype=torch.float64, device=device)
    for s, (st, h) in enumerate(zip(starts, hists, strict=True)):
        a1[:, st:st + h.shape[1]] = h.to(torch.float64) + LOG_FLOOR
        seg_idx[st:st + h.shape[1]] = s
        realf[st:st + h.shape[1]] = 1.0
    return Layout(starts, sizes, gap, a1, seg_idx, realf, 1.0 - realf, spread_a)


def _stencil_shift(x: torch.Tensor, w: list[float]) -> torch.Tensor:
    """sum_{|d| <= D} w_|d| x[:, i+d] by shifted adds (the array's ends are gaps of zeros)."""
    out = x.clone()
    for d in range(1, len(w)):
        out[:, d:].add_(x[:, :-d], alpha=w[d])
        out[:, :-d].add_(x[:, d:], alpha=w[d])
    return out


def _stencil_conv(x: torch.Tensor, w: list[float]) -> torch.Tensor:
    """The same stencil as one 1-D convolution (the kernel is symmetric)."""
    band = len(w) - 1
    ker = torch.tensor(w[:0:-1] + w, dtype=x.dtype, device=x.device).view(1, 1, -1)
    return F.conv1d(x.unsqueeze(1), ker, padding=band).squeeze(1)


class GraphBlocks:
    """Runs ``_block(*key)`` on static tensors, eagerly or (on CUDA) as one captured graph per key.

    Subclasses set ``self.state``: the tensors a block changes (restored after the warm-up run
    that precedes a capture).
    """

    state: tuple[torch.Tensor, ...] = ()

    def __init__(self, graphs: bool) -> None:
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] | None = {} if graphs else None
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.graph_failed = ""

    def _block(self, *key) -> None:
        raise NotImplementedError

    def run(self, *key) -> None:
        """One block: replayed from its CUDA graph when graphs are on (captured on first use)."""
        if self.graphs is None:
            self._block(*key)
            return
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key)
            if graph is None:
                self._block(*key)
                return
        graph.replay()

    def _capture(self, key: tuple) -> torch.cuda.CUDAGraph | None:
        """Warm up on a side stream (state restored afterwards), then capture; None if capture fails."""
        saved = [t.clone() for t in self.state]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._block(*key)
            torch.cuda.current_stream().wait_stream(side)
            for t, s in zip(self.state, saved, strict=True):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._block(*key)
        except RuntimeError as exc:  # pragma: no cover - needs a GPU
            self.graph_failed = str(exc).splitlines()[0][:200]
            self.graphs = None
            for t, s in zip(self.state, saved, strict=True):
                t.copy_(s)
            return None
        self.graphs[key] = graph
        return graph


def block_steps(ii: int, max_iter: int) -> tuple[int, bool]:
    """Iterations in the block starting at ``ii`` (it ends after POT's next check), and whether it checks."""
    end = ii + 1 + (10 - (ii + 9) % 10) % 10 if ii > 1 else 2
    steps = min(end - ii, BLOCK, max_iter - ii)
    return steps, (ii + steps - 1) % 10 == 1


@dataclass
class SegmentProgress:
    """Where each segment stands: still iterating, iterations done, last error, converged, handed back."""

    n: int
    live: list[bool] = field(init=False)
    it: list[int] = field(init=False)
    err: list[float] = field(init=False)
    conv: list[bool] = field(init=False)
    escaped: list[int] = field(init=False)
    v_saved: list[torch.Tensor | None] = field(init=False)

    def __post_init__(self) -> None:
        self.live, self.it, self.err = [True] * self.n, [0] * self.n, [math.inf] * self.n
        self.conv, self.escaped, self.v_saved = [False] * self.n, [-1] * self.n, [None] * self.n

    def record(self, ii: int, check: bool, seg_err: list[float], stop_threshold: float) -> bool:
        """Book a finished block (now at iteration ``ii``): POT's stop test at check blocks; True if one stopped."""
        stopped = False
        for s, alive in enumerate(self.live):
            if not alive:
                continue
            self.it[s] = ii
            if check:
                self.err[s] = seg_err[s]
                if self.err[s] < stop_threshold:
                    self.live[s], self.conv[s], stopped = False, True, True
        return stopped

    def hand_back(self, s: int, ii: int, v: torch.Tensor) -> None:
        """Segment ``s`` stops at iteration ``ii``; the log-domain solver continues from ``v``."""
        self.live[s], self.escaped[s], self.it[s], self.v_saved[s] = False, ii, ii, v

    def results(self, band: int) -> list[SegmentResult]:
        return [SegmentResult(iterations=self.it[s], error=self.err[s], converged=self.conv[s], band=band,
                              escaped_at=self.escaped[s]) for s in range(self.n)]


class SegmentBlocks(GraphBlocks):
    """Blocks over a ``Layout``: which points are live, the range of the state over a block and at
    its end (``run_min/max``, ``last_min/max``, filled by ``_block``), POT's error per point, and
    a snapshot of ``state`` to redo a block from."""

    def __init__(self, lay: Layout, state: tuple[torch.Tensor, ...], graphs: bool) -> None:
        super().__init__(graphs)
        self.lay, self.state = lay, state
        self.active: tuple[torch.Tensor, ...] = state
        self.saved = [torch.empty_like(t) for t in state]
        self.livef = lay.realf.clone()
        self.err_pt = torch.zeros_like(lay.realf)
        self.run_min, self.run_max = torch.empty_like(lay.realf), torch.empty_like(lay.realf)
        self.last_min, self.last_max = torch.empty_like(lay.realf), torch.empty_like(lay.realf)

    def snapshot(self) -> None:
        """Save what a block changes (``active``: all of ``state`` unless a subclass narrows it to a prefix-shaped
        part, e.g. the log state of the Triton solver)."""
        for t, s in zip(self.active, self.saved, strict=False):
            s.copy_(t)

    def restore(self) -> None:
        for t, s in zip(self.active, self.saved, strict=False):
            t.copy_(s)

    def block_stats(self, lo: float, hi: float, errs: torch.Tensor | None = None
                    ) -> tuple[list[float], list[list[float]], float, float]:
        """One read-back: per segment whether it left [lo, hi] (or hit NaN) on a live point; per row of ``errs``
        (C, L) (default: ``err_pt``) the segments' error sums; the live range at the block's end."""
        live, n_seg = self.livef, len(self.lay.sizes)
        errs = self.err_pt[None] if errs is None else errs
        outside = ((self.run_min < lo) | (self.run_max > hi) | torch.isnan(self.run_min)
                   | torch.isnan(self.run_max)).to(torch.float64) * live
        seg_bad = torch.zeros(n_seg, dtype=torch.float64, device=live.device).index_add_(0, self.lay.seg_idx, outside)
        seg_err = torch.zeros(errs.shape[0], n_seg, dtype=torch.float64, device=live.device).index_add_(
            1, self.lay.seg_idx, errs * live)
        vmin = torch.where(live > 0, self.last_min, math.inf).amin().reshape(1)
        vmax = torch.where(live > 0, self.last_max, -math.inf).amax().reshape(1)
        host = torch.cat([seg_bad, seg_err.reshape(-1), vmin, vmax]).tolist()
        per_row = [host[n_seg * (1 + c):n_seg * (2 + c)] for c in range(errs.shape[0])]
        return host[:n_seg], per_row, host[-2], host[-1]

    def set_live(self, live: list[bool]) -> None:
        flags = torch.tensor(live, dtype=torch.float64, device=self.livef.device)
        self.livef.copy_(flags[self.lay.seg_idx] * self.lay.realf)


class _Blocks(SegmentBlocks):
    """The plain-domain state (v, b) and its block of iterations."""

    def __init__(self, lay: Layout, lam: torch.Tensor, w_all: list[float], stencil: str, graphs: bool) -> None:
        k_rows, length = lay.a1.shape
        self.v = lay.realf.expand(k_rows, -1).clone()
        self.b = torch.zeros(length, dtype=torch.float64, device=lay.a1.device)
        super().__init__(lay, (self.v, self.b), graphs)
        self.lam_row = lam.to(device=lay.a1.device, dtype=torch.float64).reshape(1, -1)
        self.w_all = w_all
        self.stencil: Callable[[torch.Tensor, list[float]], torch.Tensor] = (
            _stencil_conv if stencil == "conv" else _stencil_shift)

    def _block(self, steps: int, dv: int, du: int, check: bool) -> None:
        """``steps`` iterations in place on the static tensors; no read-back to the host."""
        lay = self.lay
        wv, wu = self.w_all[:dv + 1], self.w_all[:du + 1]
        frozen_v = self.v * (1.0 - self.livef)  # stopped segments keep their v and b
        frozen_b = self.b * (1.0 - self.livef)
        self.run_min.fill_(math.inf)
        self.run_max.fill_(0.0)
        for j in range(steps):
            kv = self.stencil(self.v, wv).add_(lay.gapf)
            u = lay.a1 / kv
            ku = self.stencil(u, wu).add_(lay.gapf)
            if check and j == steps - 1:
                torch.std(self.v * ku, dim=0, correction=0, out=self.err_pt)
            b = torch.exp(torch.mm(self.lam_row, torch.log(ku)).squeeze(0))
            torch.addcmul(frozen_b, b, self.livef, out=self.b)
            torch.addcdiv(frozen_v, b * self.livef, ku, out=self.v)
            mn, mx = self.v.amin(dim=0), self.v.amax(dim=0)
            torch.minimum(self.run_min, mn, out=self.run_min)
            torch.maximum(self.run_max, mx, out=self.run_max)
            if j == steps - 1:
                self.last_min.copy_(mn)
                self.last_max.copy_(mx)


def plain_barycenters_torch(hists: list[torch.Tensor], lam: torch.Tensor, *, reg: float,
                            stop_threshold: float, max_iter: int, stencil: str = "shift",
                            graphs: bool | None = None
                            ) -> tuple[list[torch.Tensor], list[SegmentResult], list[torch.Tensor | None]]:
    r"""Entropic barycenters of several (K, n_s) histogram stacks, blocks of iterations at a time.

    ``lam`` (K,) are the normalized weights. ``graphs`` (default: on for CUDA tensors)
    captures each block shape in a CUDA graph. Returns, per stack: the barycenter :math:`b`
    (n_s,), a ``SegmentResult``, and for a segment that left the plain range the last good
    :math:`v` (K, n_s) to continue from in the log domain (else ``None``).
    """
    if stencil not in STENCILS:
        raise ValueError(f"unknown stencil {stencil!r}: use one of {', '.join(STENCILS)}")
    device = hists[0].device
    use_graphs = device.type == "cuda" if graphs is None else graphs
    log_wsum = log_kernel_bound(reg)
    lay = layout(hists, reg, 2 * math.log(RANGE_HI))
    w_all = [math.exp(-d * d / reg) for d in range(lay.gap + 1)]
    blocks = _Blocks(lay, lam, w_all, stencil, use_graphs)
    n_seg, n_max = len(hists), max(lay.sizes)
    prog = SegmentProgress(n_seg)
    ii, margin, stepwise_until, band_used = 0, MARGIN, -1, 0
    full = math.log2(RANGE_HI / RANGE_LO)
    v_lo = v_hi = 1.0
    while any(prog.live) and ii < max_iter:
        stepwise = ii < stepwise_until
        if stepwise:  # one iteration: the band from v's actual range
            lo, hi, steps = RANGE_LO, RANGE_HI, 1
            spread_v = math.log(v_hi / v_lo)
        else:  # a block: the band for v anywhere in [lo, hi] (checked at the block's end)
            reach = 2.0 ** min(margin, full)  # margin grows x4 past the plain range's span: stop there
            lo, hi = max(RANGE_LO, v_lo / reach), min(RANGE_HI, v_hi * reach)
            steps, _ = block_steps(ii, max_iter)
            spread_v = math.log(hi / lo)
        dv = min(band_halfwidth(reg, spread_v, n_max), lay.gap)
        du = min(band_halfwidth(reg, spread_v + lay.spread_a + log_wsum, n_max), lay.gap)
        band_used = max(band_used, dv, du)
        check = (ii + steps - 1) % 10 == 1
        blocks.snapshot()
        blocks.run(steps, dv, du, check)
        seg_bad, (seg_err,), new_lo, new_hi = blocks.block_stats(lo, hi)
        bad = [prog.live[s] and seg_bad[s] > 0 for s in range(n_seg)]
        if any(bad):  # back to the block's start; wider margin, then one step at a time, then the log domain
            blocks.restore()
            if stepwise:
                for s, v in enumerate(lay.segments(blocks.v)):
                    if bad[s]:
                        prog.hand_back(s, ii, v)
                blocks.set_live(prog.live)
            elif margin < full:
                margin *= 4
            else:
                stepwise_until = ii + steps
            continue
        ii += steps
        if prog.record(ii, check, seg_err, stop_threshold):
            blocks.set_live(prog.live)
        if 0 < new_lo <= new_hi < math.inf:
            v_lo, v_hi = new_lo, new_hi
    return lay.segments(blocks.b), prog.results(band_used), prog.v_saved
