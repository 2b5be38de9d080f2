"""The plain-domain entropic solvers (compiled CPU and torch) against POT's sinkhorn_log, step for step."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch

from aggregator.fusion import FusionReport, fuse_with_report, sinkhorn_barycenter_1d
from aggregator.fusion import sinkhorn_fast as fast
from aggregator.fusion import sinkhorn_torch as fast_torch
from aggregator.fusion import sinkhorn_wide as fast_wide

ITERS = 200  # the same iteration count on both sides: agreement is per iterate, not at convergence


def cost(n: int) -> np.ndarray:
    x = np.arange(n, dtype=np.float64)
    return (x[:, None] - x[None, :]) ** 2


def cases(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weight histograms (each row has an exact zero: its minimum), disjoint far supports, mixtures."""
    x = rng.standard_normal((4, n))
    weights = x - x.min(axis=1, keepdims=True)
    far = np.zeros((3, n))
    far[0, : n // 10] = 1
    far[1, -n // 6:] = 1
    far[2, n // 2: n // 2 + 5] = 1
    g = np.arange(n)
    mix = np.stack([np.exp(-((g - n / 6) ** 2) / 50) + 0.5 * np.exp(-((g - 0.7 * n) ** 2) / 200),
                    np.exp(-((g - 0.6 * n) ** 2) / 30)])
    out = {"weights": weights, "far": far, "mix": mix}
    return {k: v / v.sum(axis=1, keepdims=True) for k, v in out.items()}


def segments(sizes: tuple[int, ...], rows: int = 5, seed: int = 3) -> list[np.ndarray]:
    """Histograms of noisy copies of one random profile, one stack per size (each row's minimum is 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x = rng.standard_normal(n) + 0.2 * rng.standard_normal((rows, n))
        x = x - x.min(1, keepdims=True)
        out.append(x / x.sum(1, keepdims=True))
    return out


def solve(solver: str, hists: list[np.ndarray], lam: np.ndarray, reg: float, iters: int = ITERS,
          device: str = "cpu", cont: str = "", **options) -> list[np.ndarray]:
    """Run one plain solver (``options`` go to the torch one) and continue any escaped segment as ``fuse``
    does: with the wide-range solver on CPU, in the log domain elsewhere (or as ``cont`` says)."""
    kw = {"reg": reg, "stop_threshold": 1e-4, "max_iter": iters}
    cont = cont or ("wide" if device == "cpu" else "log")
    if solver == "wide":
        return [fast_wide.wide_barycenter(h, lam, np.ones(h.shape), 0, **kw).b for h in hists]
    if solver == "plain":
        bs, segs, vs = fast.plain_barycenters(hists, lam, **kw)
        bs = [torch.from_numpy(b) for b in bs]
        vs = [None if v is None else torch.from_numpy(v) for v in vs]
    else:
        bs, segs, vs = fast_torch.plain_barycenters_torch([torch.tensor(h, device=device) for h in hists],
                                                          torch.tensor(lam), **kw, **options)
    out = []
    for h, b, seg, v in zip(hists, bs, segs, vs, strict=True):
        if v is not None and cont == "wide":
            b = torch.from_numpy(fast_wide.wide_barycenter(h, lam, v.cpu().numpy(), seg.escaped_at, **kw).b)
        elif v is not None:
            b, _ = sinkhorn_barycenter_1d(torch.tensor(h, device=device), torch.tensor(lam, device=device),
                                          warn=False, log_v0=torch.log(v), start=seg.escaped_at, **kw)
        out.append(b.cpu().numpy())
    return out


CUDA = torch.cuda.is_available()
_GPU = pytest.mark.skipif(not CUDA, reason="no CUDA GPU here")
PLAIN_SOLVERS = [  # (solver, device, options): the compiled ones, and the torch one's stencils on CPU and CUDA
    ("plain", "cpu", {}), ("plain", "cpu", {"cont": "log"}), ("wide", "cpu", {}),
    ("plain-torch", "cpu", {"stencil": "shift"}), ("plain-torch", "cpu", {"stencil": "conv"}),
    pytest.param("plain-torch", "cuda", {"stencil": "shift"}, marks=_GPU),
    pytest.param("plain-torch", "cuda", {"stencil": "conv"}, marks=_GPU)]


@pytest.mark.parametrize(("solver", "device", "options"), PLAIN_SOLVERS)
@pytest.mark.parametrize("reg", [0.05, 0.1, 1.0, 10.0])
def test_plain_solvers_equal_pot_sinkhorn_log(solver: str, device: str, options: dict, reg: float) -> None:
    rng = np.random.default_rng(int(reg * 100))
    for name, h in cases(256, rng).items():
        lam = rng.random(h.shape[0]) + 0.1
        lam /= lam.sum()
        ref = ot.bregman.barycenter(h.T, cost(h.shape[1]), reg, weights=lam, method="sinkhorn_log",
                                    numItermax=ITERS, stopThr=1e-4, warn=False)
        (ours,) = solve(solver, [h], lam, reg, device=device, **options)
        assert np.abs(ours - ref).max() <= 1e-10 * np.abs(ref).max(), (name, reg, solver, device, options)


@pytest.mark.slow
def test_plain_solver_equals_pot_at_n_4096() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4096))
    h = x - x.min(axis=1, keepdims=True)
    h /= h.sum(axis=1, keepdims=True)
    lam = np.array([0.5, 0.3, 0.2])
    # 3 iterations: POT's dense log-domain step costs ~2.8 s at n = 4,096 (a 4096 x 4096 log-sum-exp per
    # histogram); the band and the division are exercised from the first one
    ref = ot.bregman.barycenter(h.T, cost(4096), 0.1, weights=lam, method="sinkhorn_log", numItermax=3,
                                stopThr=0.0, warn=False)
    (ours,) = solve("plain", [h], lam, 0.1, iters=3)
    assert np.abs(ours - ref).max() <= 1e-10 * np.abs(ref).max()


def test_segments_of_different_sizes_stop_on_their_own() -> None:
    """All tensors in one solve give what each gives alone (each stops when it converges)."""
    hists = segments((7, 300, 2000))
    lam = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    bs, segs, _ = fast.plain_barycenters(hists, lam, reg=1.0, stop_threshold=1e-4, max_iter=200)
    tbs, tsegs, _ = fast_torch.plain_barycenters_torch([torch.tensor(h) for h in hists], torch.tensor(lam), reg=1.0,
                                                 stop_threshold=1e-4, max_iter=200)
    for h, b, seg, tb, tseg in zip(hists, bs, segs, tbs, tsegs, strict=True):
        ref, info = sinkhorn_barycenter_1d(torch.tensor(h), lam, reg=1.0, max_iter=200, warn=False)
        assert seg.iterations == info.iterations == tseg.iterations
        assert seg.converged == info.converged
        assert np.abs(b - ref.numpy()).max() <= 1e-12 * float(ref.abs().max())
        assert np.abs(tb.numpy() - ref.numpy()).max() <= 1e-12 * float(ref.abs().max())
    assert segs[0].converged and not segs[2].converged  # the 7-point tensor stopped early


@pytest.mark.parametrize("tile", [37, 256])
def test_tiles_with_halos_give_the_same_iterate(tile: int) -> None:
    """Small tiles: every tile recomputes its halo over a block of iterations; results must not change."""
    hists = segments((5, 700, 3000), rows=4, seed=11)
    lam = np.array([0.25, 0.25, 0.3, 0.2])  # two rows share a weight: one log for both
    for reg in (0.1, 1.0, 10.0):
        bs, segs, _ = fast.plain_barycenters(hists, lam, reg=reg, stop_threshold=1e-4, max_iter=60, tile=tile)
        for h, b, seg in zip(hists, bs, segs, strict=True):
            ref, info = sinkhorn_barycenter_1d(torch.tensor(h), lam, reg=reg, max_iter=60, warn=False)
            assert seg.iterations == info.iterations and seg.converged == info.converged
            assert np.abs(b - ref.numpy()).max() <= 1e-12 * float(ref.abs().max()), (reg, h.shape)


@pytest.mark.parametrize("rows", [[1, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 2, 2], [5, 1, 1]])
def test_rows_taken_in_pairs_give_the_same_iterate(rows: list[int]) -> None:
    """The solver divides two rows at a time and takes the log of two rows' product within a weight group:
    groups of odd size, groups that start on an odd row and an odd row count (a row left single) give
    POT's iterate."""
    lam = np.array(rows, dtype=np.float64) / sum(rows)
    (h,) = segments((400,), rows=len(rows), seed=len(rows))
    for reg in (0.1, 1.0):
        ref = ot.bregman.barycenter(h.T, cost(400), reg, weights=lam, method="sinkhorn_log", numItermax=ITERS,
                                    stopThr=1e-4, warn=False)
        (ours,) = solve("plain", [h], lam, reg)
        assert np.abs(ours - ref).max() <= 1e-10 * np.abs(ref).max(), (rows, reg)


@pytest.mark.parametrize("reg", [0.01, 0.05, 0.1, 1.0])
def test_slope_sized_bands_give_the_same_iterate(reg: float) -> None:
    """Bands sized from the steepest step of log v (promised per block, checked on every value read) give
    the iterate of the spread-sized ones and of the log domain, including blocks redone after v outgrew
    its promise and, at reg 0.01, bands of 0 (a stencil that is the identity)."""
    hists = segments((9, 900, 5000), rows=4, seed=5)
    lam = np.array([0.4, 0.2, 0.25, 0.15])
    kw = {"reg": reg, "stop_threshold": 0.0, "max_iter": 120, "tile": 512}
    on, segs_on, _ = fast.plain_barycenters(hists, lam, slopes=True, **kw)
    off, segs_off, _ = fast.plain_barycenters(hists, lam, slopes=False, **kw)
    for h, b, b_off, seg in zip(hists, on, off, segs_on, strict=True):
        ref, _ = sinkhorn_barycenter_1d(torch.tensor(h), lam, reg=reg, max_iter=120, stop_threshold=0.0, warn=False)
        scale = float(ref.abs().max())
        assert np.abs(b - ref.numpy()).max() <= 1e-12 * scale, (reg, h.shape)
        assert np.abs(b - b_off).max() <= 1e-13 * scale, (reg, h.shape)
        assert seg.iterations == 120 and seg.escaped_at == -1
    if reg == 0.1:  # v steepens fastest in the first blocks: a promise was made, broke and was redone
        assert sum(s.slope_redone for s in segs_on) > 0
    assert sum(s.slope_redone for s in segs_off) == 0


def test_a_tile_sizes_its_band_for_the_promises_within_its_reach() -> None:
    """A tile's v band rests on the slopes of every v its stencils read or leave out, which lie in the
    tiles within its reach: the steepest promise among those (same segment only) is what it is sized for."""
    tile_seg = np.array([0, 0, 0, 0, 0, 1, 1], np.int64)
    tile_lo = np.array([0, 100, 200, 300, 400, 500, 600], np.int64)
    tile_hi = tile_lo + 100
    steep = np.array([1, 2, 30, 1, 1, 50, 3], np.int64)
    q = [fast.reach_steep(t, tile_seg, tile_lo, tile_hi, steep, 10) for t in range(7)]
    assert q == [2, 30, 30, 30, 1, 50, 50]  # tile 4 is out of tile 2's reach; tile 4 never sees segment 1
    q = [fast.reach_steep(t, tile_seg, tile_lo, tile_hi, steep, 150) for t in range(7)]
    assert q == [30, 30, 30, 30, 30, 50, 50]


@pytest.mark.parametrize("tile", [37, 500])
def test_a_steep_spot_beside_smooth_tiles_gives_the_same_iterate(tile: int) -> None:
    """Per-tile promises: dips of 10 and 27 binary orders (and a zero) at a tile seam, smooth tiles around
    them with narrower bands; the log domain's iterate, for small and large tiles."""
    g = np.arange(3000.0)
    rng = np.random.default_rng(1)
    for depth in (1e-3, 1e-8):
        h = (np.exp(-((g - 1400) ** 2) / 4e5) + 0.3) * (1 + 0.05 * rng.standard_normal((3, 3000)))
        h[0, 1499] *= depth
        h[1, 1500] *= depth
        h[2, 1502] = 0.0
        h /= h.sum(axis=1, keepdims=True)
        lam = np.array([0.5, 0.3, 0.2])
        for reg in (0.05, 0.1, 1.0):
            kw = {"reg": reg, "stop_threshold": 0.0, "max_iter": 150, "tile": tile}
            (b,), (seg,), _ = fast.plain_barycenters([h], lam, **kw)
            ref, _ = sinkhorn_barycenter_1d(torch.tensor(h), lam, reg=reg, max_iter=150, stop_threshold=0.0,
                                            warn=False)
            assert seg.iterations == 150 and seg.escaped_at == -1, (reg, tile, seg)
            assert np.abs(b - ref.numpy()).max() <= 1e-12 * float(ref.abs().max()), (reg, tile, seg)


def test_fuse_solvers_agree_on_mlp_shapes_and_report() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"fc1.weight": (200, 78), "fc1.bias": (200,), "fc2.weight": (10, 200), "fc2.bias": (10,),
              "scalar": (), "const": (5,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: (v + 0.2 * torch.randn(v.shape, generator=g)) if k != "const" else torch.full(v.shape, 3.0)
               for k, v in base.items()} for _ in range(5)]
    weights = [1.0, 2.0, 1.0, 3.0, 1.0]
    outs = {}
    for solver in ("log", "plain", "plain-torch"):
        outs[solver], rep = fuse_with_report(models, weights, "fedwb-sinkhorn", max_iter=100, warn=False,
                                             solver=solver)
        assert rep.as_dict()["sinkhorn_solver"] == solver
        assert rep.sinkhorn_iterations == 100
    for solver in ("plain", "plain-torch"):
        for k in shapes:
            ref = outs["log"][k]
            assert torch.allclose(outs[solver][k], ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max())), (solver, k)
    assert torch.equal(outs["plain"]["const"], torch.full((5,), 3.0))


def test_escape_to_the_log_domain_is_reported() -> None:
    """Off CPU (or without numba) escaped tensors continue in the log domain; the report says so (the CPU
    hand-over to the wide-range solver is in test_sinkhorn_wide)."""
    rep = FusionReport(method="fedwb-sinkhorn", sinkhorn_solver="plain-torch", sinkhorn_escaped=["w"],
                       sinkhorn_escaped_to="log")
    assert rep.as_dict()["sinkhorn_log_domain"] == {"tensors": ["w"],
                                                    "reason": "values left the plain range [1e-100, 1e100]"}
    assert "sinkhorn_wide_range" not in rep.as_dict()


def test_fuse_rejects_bad_solver_options() -> None:
    m = {"w": torch.rand(4)}
    with pytest.raises(ValueError, match="unknown entropic solver 'fast'"):
        fuse_with_report([m, m], [1, 1], "fedwb-sinkhorn", solver="fast")
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        fuse_with_report([m, m], [1, 1], "fedwb-sinkhorn", max_iter=0)
    with pytest.raises(ValueError, match="stop_threshold"):
        fuse_with_report([m, m], [1, 1], "fedwb-sinkhorn", stop_threshold=-1.0)


def test_vectorized_log_and_exp_are_within_two_ulp() -> None:
    x = np.exp(np.random.default_rng(0).uniform(-700, 700, 100_000))
    out = np.empty_like(x)
    fast.vlog_array(x, out)
    assert np.all(np.abs(out - np.log(x)) <= 2 * np.spacing(np.abs(np.log(x))) + 1e-300)
    y = np.random.default_rng(1).uniform(-700, 700, 100_000)
    fast.vexp_array(y, out)
    assert np.all(np.abs(out - np.exp(y)) <= 4 * np.spacing(np.exp(y)))


def test_band_halfwidth_bounds_the_left_out_mass() -> None:
    for reg in (0.05, 0.1, 1.0, 10.0):
        for spread in (0.0, 30.0, 400.0):
            d = fast.band_halfwidth(reg, spread, 10**6)
            assert (d + 1) ** 2 / reg >= spread + math.log(2e6) + 40.0


def test_unconverged_warning_names_the_knob() -> None:
    m = [{"w": torch.rand(50, dtype=torch.float64)} for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fuse_with_report(m, [1, 1, 1], "fedwb-sinkhorn", stop_threshold=1e-30, max_iter=12)
    assert any("raise max_iter or reg" in str(w.message) for w in caught)


def test_policy_carries_iterations_threshold_and_solver() -> None:
    import typer

    from aggregator.cli import policy_spec
    from aggregator.fusion.policy import method_options

    spec = policy_spec("fedwb-sinkhorn", None, None, None, None, max_iter="paper", stop_threshold=1e-6,
                       solver="log")
    assert (spec.max_iter, spec.stop_threshold, spec.solver) == (10_000, 1e-6, "log")
    assert method_options(spec)["solver"] == "log" and method_options(spec)["max_iter"] == 10_000
    with pytest.raises(typer.Exit) as exc:
        policy_spec("fedwb-sinkhorn", None, None, None, None, max_iter="lots")
    assert exc.value.exit_code == 2
    with pytest.raises(typer.Exit):
        policy_spec("fedwb-sinkhorn", None, None, None, None, solver="magic")


def test_pot_plain_reports_non_finite_tensors() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 512))
    models = [{"w": torch.tensor(r)} for r in x]
    out, rep = fuse_with_report(models, [1, 1, 1], "fedwb-sinkhorn", solver="pot-plain", reg=0.1, max_iter=200,
                                warn=False)
    d = rep.as_dict()
    assert d["sinkhorn_solver"] == "pot-plain"
    finite = bool(torch.isfinite(out["w"]).all())
    assert finite == ("pot_plain_non_finite" not in d)
    with pytest.raises(ValueError, match="pot-plain needs an n x n cost matrix"):
        fuse_with_report([{"w": torch.rand(9000)}] * 2, [1, 1], "fedwb-sinkhorn", solver="pot-plain")
