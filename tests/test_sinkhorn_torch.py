"""The torch and Triton entropic solvers (blocks of iterations, CUDA graphs on a GPU) against POT and the
compiled one (the torch solver's equality with POT, both stencils, is in test_sinkhorn_fast).

The same code runs on CPU here (eager blocks; Triton's interpreter) and on CUDA (each block one
captured graph); the CUDA cases run wherever a GPU is present and are skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import ot
import pytest
import torch

from aggregator.fusion import fuse_with_report, sinkhorn_barycenter_1d
from aggregator.fusion import sinkhorn_fast as fast
from aggregator.fusion import sinkhorn_torch as st
from tests.test_sinkhorn_fast import _GPU, CUDA, ITERS, cases, cost, segments, solve

DEVICES = ["cpu", pytest.param("cuda", marks=_GPU)]


@pytest.mark.parametrize("device", DEVICES)
def test_segments_stop_on_their_own_and_match_the_compiled_solver(device: str) -> None:
    hists = segments((7, 300, 2000))
    lam = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    kw = {"reg": 1.0, "stop_threshold": 1e-4, "max_iter": 200}
    ref, ref_segs, _ = fast.plain_barycenters(hists, lam, **kw)
    bs, segs, _ = st.plain_barycenters_torch([torch.tensor(h, device=device) for h in hists], torch.tensor(lam), **kw)
    for r, rs, b, s in zip(ref, ref_segs, bs, segs, strict=True):
        assert (s.iterations, s.converged) == (rs.iterations, rs.converged)
        assert np.abs(b.cpu().numpy() - r).max() <= 1e-12 * np.abs(r).max()
    assert segs[0].converged and not segs[2].converged


def test_graphs_off_and_stencils_agree_on_cpu() -> None:
    """Eager blocks are what a graph replays: the two stencils give the same iterate."""
    rng = np.random.default_rng(5)
    h = rng.random((6, 3000))
    h /= h.sum(1, keepdims=True)
    lam = np.full(6, 1 / 6)
    a = solve("plain-torch", [h], lam, 0.1, ITERS, stencil="shift", graphs=False)[0]
    b = solve("plain-torch", [h], lam, 0.1, ITERS, stencil="conv", graphs=False)[0]
    assert np.abs(a - b).max() <= 1e-13 * np.abs(a).max()


def test_unknown_stencil_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown stencil 'fft'"):
        st.plain_barycenters_torch([torch.ones(2, 3) / 3], torch.tensor([0.5, 0.5]), reg=1.0, stop_threshold=0.0,
                                   max_iter=1, stencil="fft")


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU here")
def test_fuse_on_cuda_picks_the_triton_solver_and_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"fc1.weight": (200, 78), "fc1.bias": (200,), "fc2.weight": (10, 200), "fc2.bias": (10,)}
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    models = [{k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(5)]
    cpu, _ = fuse_with_report(models, [1, 2, 1, 3, 1], "fedwb-sinkhorn", max_iter=300, warn=False, solver="plain")
    gpu_models = [{k: v.cuda() for k, v in m.items()} for m in models]
    gpu, rep = fuse_with_report(gpu_models, [1, 2, 1, 3, 1], "fedwb-sinkhorn", max_iter=300, warn=False)
    assert rep.sinkhorn_solver == "triton"
    for k in shapes:
        assert gpu[k].device.type == "cuda"
        ref = cpu[k]
        assert torch.allclose(gpu[k].cpu(), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max())), k


# The Triton solver: on CPU its kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
# where there is no GPU), so the sizes here are small; on a GPU the same cases run compiled, in CUDA graphs.
triton_solver = pytest.importorskip("aggregator.fusion.sinkhorn_triton")
# the dev extra installs triton on Linux x86_64 (CI included); elsewhere these skip
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
TRITON_ITERS = 20


@needs_triton
@pytest.mark.parametrize(("device", "reg"), [("cpu", 0.05), ("cpu", 1.0), *[
    pytest.param("cuda", reg, marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU here")) for reg in (0.05, 1, 10)]])
def test_triton_solver_equals_pot_sinkhorn_log(device: str, reg: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain-domain kernels, and the log-domain ones from where v would leave the plain range ("far")."""
    switches = []
    to_log = triton_solver._Blocks.to_log
    monkeypatch.setattr(triton_solver._Blocks, "to_log", lambda self: (switches.append(1), to_log(self)))
    rng = np.random.default_rng(int(reg * 100) + 1)
    for name, h in cases(40, rng).items():
        lam = rng.random(h.shape[0]) + 0.1
        lam /= lam.sum()
        ref = ot.bregman.barycenter(h.T, cost(h.shape[1]), reg, weights=lam, method="sinkhorn_log",
                                    numItermax=TRITON_ITERS, stopThr=1e-4, warn=False)
        bs, segs, vs = triton_solver.barycenters_triton([torch.tensor(h, device=device)], torch.tensor(lam),
                                                        reg=reg, stop_threshold=1e-4, max_iter=TRITON_ITERS)
        assert vs == [None] and segs[0].escaped_at == -1
        ours = bs[0].cpu().numpy()
        assert np.abs(ours - ref).max() <= 1e-10 * np.abs(ref).max(), (name, reg)
    if reg == 0.05:
        assert switches, "the far-apart case should have needed the log-domain kernels"


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_triton_segments_stop_on_their_own(device: str) -> None:
    """Three tensors in one solve, each as the log-domain solver gives it alone (the small one stops first)."""
    hists = segments((7, 30, 80))
    lam = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    bs, segs, _ = triton_solver.barycenters_triton([torch.tensor(h, device=device) for h in hists], lam,
                                                   reg=1.0, stop_threshold=2e-3, max_iter=40)
    for h, b, seg in zip(hists, bs, segs, strict=True):
        ref, info = sinkhorn_barycenter_1d(torch.tensor(h), lam, reg=1.0, stop_threshold=2e-3, max_iter=40,
                                           warn=False)
        assert (seg.iterations, seg.converged) == (info.iterations, info.converged)
        assert float((b.cpu() - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    assert segs[0].converged and not segs[2].converged


@needs_triton
@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
def test_triton_solver_on_cpu_without_interpreter_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        triton_solver.barycenters_triton([torch.ones(2, 3) / 3], torch.tensor([0.5, 0.5]), reg=1.0,
                                         stop_threshold=0.0, max_iter=1)


@needs_triton
@pytest.mark.skipif(CUDA, reason="checks the CPU fallback")
def test_solver_triton_on_cpu_falls_back_to_the_same_iterate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy may name solver triton on a CPU aggregator: the compiled CPU solver runs instead, and says so."""
    import triton

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    g = torch.Generator().manual_seed(1)
    models = [{"w": torch.randn(30, generator=g, dtype=torch.float64)} for _ in range(3)]
    out, rep = fuse_with_report(models, [1, 1, 1], "fedwb-sinkhorn", max_iter=50, warn=False, solver="triton")
    ref, _ = fuse_with_report(models, [1, 1, 1], "fedwb-sinkhorn", max_iter=50, warn=False, solver="log")
    assert rep.sinkhorn_solver == "plain"
    assert torch.allclose(out["w"], ref["w"], rtol=1e-10, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_triton_solver_state_is_reused_for_the_same_shapes_and_gives_a_fresh_solves_iterate(
        device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregator fuses the same shapes every round: the second solve reuses the first one's tensors (and
    CUDA graphs), reset to the new histograms, also after a solve that ended in the log-domain kernels."""
    rng = np.random.default_rng(11)
    both = cases(40, rng)
    far, near = both["far"], both["weights"][:3] / both["weights"][:3].sum(1, keepdims=True)
    lam = torch.full((far.shape[0],), 1.0 / far.shape[0], dtype=torch.float64)
    kw = {"reg": 0.05, "stop_threshold": 1e-4, "max_iter": TRITON_ITERS}

    def run(h: np.ndarray) -> np.ndarray:
        return triton_solver.barycenters_triton([torch.tensor(h, device=device)], lam, **kw)[0][0].cpu().numpy()

    triton_solver._cache.clear()
    fresh_near = run(near)
    triton_solver._cache.clear()
    switches = []
    to_log = triton_solver._Blocks.to_log
    monkeypatch.setattr(triton_solver._Blocks, "to_log", lambda self: (switches.append(1), to_log(self)))
    run(far)  # ends in the log domain, leaves its state in the cache
    assert switches, "the far-apart case should have needed the log-domain kernels"
    (key, state), = triton_solver._cache.items()
    reused_near = run(near)
    assert triton_solver._cache[key] is state, "same shapes and gap: the cached state is used again"
    assert np.array_equal(reused_near, fresh_near)


class _TraceBlocks:
    """Stands in for the Triton solver's state: the range of log v after each iteration comes from a trace,
    so the block schedule (long blocks, redos, the switch to log kernels) runs without kernels."""

    def __init__(self, lo: list[float], hi: list[float]) -> None:
        self.lo, self.hi = lo, hi
        self.lay = type("Lay", (), {"sizes": [1000], "spread_a": 30.0, "gap": 10**6, "segments": lambda _, x: [x]})()
        self.pos = self.saved = self.executed = 0
        self.log = False
        self.g = self.logb = self.b = torch.zeros(1)
        self.err_all = torch.zeros(triton_solver.LONG_CHECKS, 1)  # only its rows count: one per check
        self.steps: list[int] = []

    def snapshot(self) -> None:
        self.saved = self.pos

    def restore(self) -> None:
        self.pos = self.saved

    def to_log(self) -> None:
        self.log = True

    def set_live(self, live: list[bool]) -> None:
        pass

    def run(self, log: bool, steps: int, dv: int, du: int, first: int) -> None:
        self.span = range(self.pos, self.pos + steps)
        self.pos += steps
        self.executed += steps
        self.steps.append(steps)

    def block_stats(self, lo: float, hi: float, errs: torch.Tensor):
        conv = (lambda x: x) if self.log else (lambda x: math.exp(min(x, 700.0)))
        run_lo, run_hi = min(conv(self.lo[i]) for i in self.span), max(conv(self.hi[i]) for i in self.span)
        bad = run_lo < lo or run_hi > hi
        end = self.span[-1]
        return [float(bad)], [[1.0]] * errs.shape[0], conv(self.lo[end]), conv(self.hi[end])


@pytest.mark.parametrize(("drift", "most_executed", "most_blocks"), [(0.01, 1000, 20), (0.8, 1100, 110)])
def test_long_blocks_follow_the_drift_of_the_potentials(drift: float, most_executed: int, most_blocks: int) -> None:
    """Potentials that settle get blocks of up to 100 iterations (one read-back each); potentials that keep
    drifting (log v's range growing ~1 binary order per iteration, as on random histograms) get short blocks
    instead of long ones that break their band's promise and are redone (2.5x the iterations before)."""
    its = 1000
    hi = [5.0 + drift * i for i in range(its)]
    lo = [-5.0 - drift * i for i in range(its)]
    fake = _TraceBlocks(lo, hi)
    triton_solver._solve(fake, 0.1, 0.0, its)
    assert fake.pos == its
    assert fake.executed <= most_executed and len(fake.steps) <= most_blocks, (fake.executed, fake.steps)
    if drift < 0.1:
        assert max(fake.steps) == 10 * triton_solver.LONG_CHECKS


def _band_lse(x: torch.Tensor, cost: torch.Tensor, band: int) -> torch.Tensor:
    """Reference: LSE_{|d|<=band}(x[:, i+d] - c_d) over the row, 0 where every term is -inf."""
    k_rows, n = x.shape
    pad = torch.full((k_rows, band), -math.inf, dtype=torch.float64)
    xp = torch.cat([pad, x, pad], dim=1)
    terms = torch.stack([xp[:, band + d:band + d + n] - cost[d + band] for d in range(-band, band + 1)])
    out = torch.logsumexp(terms, dim=0)
    return torch.where(torch.isfinite(out), out, 0.0)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_windowed_lse_is_the_exact_band_lse_where_values_span_far_beyond_float64(device: str) -> None:
    """The log kernels' windowed LSE (one exponential per point against the window's maximum) equals the exact
    two-pass LSE on rows spanning several windows: smooth values, jumps of 1,500 nats inside a window (points
    far beneath the window's maximum take the exact recomputation), and runs of -inf narrower and wider than
    the band; and f = log a - LSE is -inf exactly where a = 0."""
    rng = np.random.default_rng(3)
    n, band, reg = 3000, 7, 0.1
    gap = band
    x = np.cumsum(rng.normal(0, 0.3, (3, n)), axis=1)
    x[1] += np.where(np.arange(n) % 700 < 350, 1500.0, -1500.0)  # deep valleys beside high plateaus
    x[1, 1200:1205] = 3000.0  # a spike above the plateau
    x[2, 100:104] = -np.inf  # narrower than the band
    x[2, 900:1400] = -np.inf  # wider than the band: l = LSE is -inf there (returned as 0)
    xt = torch.tensor(x, device=device)
    offsets = torch.arange(-gap, gap + 1, dtype=torch.float64, device=device)
    cost = offsets * offsets / reg
    w = torch.exp(-cost)
    loga = torch.where(torch.rand(3, n, generator=torch.Generator().manual_seed(0)) < 0.2, -math.inf,
                       torch.log(torch.rand(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))))
    loga = loga.to(device)
    span = triton_solver.WINDOW - 2 * band
    tiles = -(-n // span)
    scratch = torch.empty(3 * tiles * triton_solver.WINDOW, dtype=torch.float64, device=device)
    counts = torch.empty(3 * tiles * triton_solver.WINDOW, dtype=torch.int32, device=device)
    ref = _band_lse(torch.tensor(x), cost.cpu(), band)
    for sub_a in (False, True):
        out = torch.full((3, n), math.nan, dtype=torch.float64, device=device)
        triton_solver._lse_rows[(tiles, 3)](xt, loga, out, scratch, counts, w, cost, gap, n, span, band,
                                            DS=min(band, triton_solver.UNROLL), BW=triton_solver.WINDOW,
                                            SUB_A=sub_a, LOG_TINY=triton_solver.LOG_TINY)
        got = out.cpu()
        want = torch.where(loga.cpu() > -math.inf, loga.cpu() - ref, -math.inf) if sub_a else ref
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        fin = torch.isfinite(want)
        assert float((got[fin] - want[fin]).abs().max()) <= 1e-12 * max(1.0, float(want[fin].abs().max()))
    valley = ref[1, 400:600]
    assert float(valley.max()) < float(ref[1].max()) - 2000, "the valleys must lie far beneath the window maximum"


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_windowed_and_exact_log_kernels_give_the_same_iterate(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The far-apart histograms switch to the log domain; the rest of the solve is the same iterate with the
    windowed LSE and with the two-pass one (WINDOW_BAND below every band)."""
    h = cases(40, np.random.default_rng(11))["far"]
    lam = torch.full((h.shape[0],), 1.0 / h.shape[0], dtype=torch.float64)
    kw = {"reg": 0.05, "stop_threshold": 0.0, "max_iter": 30}
    switches = []
    to_log = triton_solver._Blocks.to_log
    monkeypatch.setattr(triton_solver._Blocks, "to_log", lambda self: (switches.append(1), to_log(self)))
    triton_solver._cache.clear()
    windowed = triton_solver.barycenters_triton([torch.tensor(h, device=device)], lam, **kw)[0][0].cpu()
    monkeypatch.setattr(triton_solver, "WINDOW_BAND", -1)
    triton_solver._cache.clear()
    exact = triton_solver.barycenters_triton([torch.tensor(h, device=device)], lam, **kw)[0][0].cpu()
    triton_solver._cache.clear()
    assert len(switches) == 2
    assert float((windowed - exact).abs().max()) <= 1e-12 * float(exact.abs().max())


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_plain_kernels_carry_v_past_the_cpu_range_and_stay_pots_iterate(device: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU the plain kernels keep v in [1e-200, 1e200] (no subnormal penalty there), not the CPU solver's
    [1e-100, 1e100]: mixtures whose potentials reach ~1e190 within 60 iterations stay in the plain kernels all
    along and still give POT's sinkhorn_log iterate."""
    h = cases(40, np.random.default_rng(1))["mix"]
    lam = np.array([0.5, 0.5])
    its = 60
    switches = []
    to_log = triton_solver._Blocks.to_log
    monkeypatch.setattr(triton_solver._Blocks, "to_log", lambda self: (switches.append(1), to_log(self)))
    triton_solver._cache.clear()
    bs, segs, _ = triton_solver.barycenters_triton([torch.tensor(h, device=device)], torch.tensor(lam), reg=0.1,
                                                   stop_threshold=0.0, max_iter=its)
    (state,) = triton_solver._cache.values()
    v = state.v[:, state.lay.realf > 0].cpu()
    triton_solver._cache.clear()
    ref = ot.bregman.barycenter(h.T, cost(h.shape[1]), 0.1, weights=lam, method="sinkhorn_log", numItermax=its,
                                stopThr=0.0, warn=False)
    assert not switches, "v stayed inside the plain kernels' range"
    assert max(float(v.max()), 1 / float(v.min())) > 1e100, "the case must leave the CPU solver's plain range"
    assert segs[0].iterations == its
    ours = bs[0].cpu().numpy()
    assert np.abs(ours - ref).max() <= 1e-10 * np.abs(ref).max()
