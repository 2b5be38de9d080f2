"""The wide-range solver (an exponent per value) against the log-domain solver and POT, and its hand-over."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregator.fusion import fuse_with_report, sinkhorn_barycenter_1d
from aggregator.fusion import sinkhorn_fast as fast
from aggregator.fusion import sinkhorn_wide as wide
from tests.test_sinkhorn_fast import cases, segments


def _far(n: int = 120) -> np.ndarray:
    """Two disjoint blocks of mass: the potentials spread by hundreds of nats per iteration."""
    h = np.zeros((2, n))
    h[0, :10] = 1
    h[1, -10:] = 1
    return h / h.sum(1, keepdims=True)


def _log(h: np.ndarray, lam: np.ndarray, reg: float, iters: int, thr: float = 0.0):
    return sinkhorn_barycenter_1d(torch.tensor(h), torch.tensor(lam), reg=reg, max_iter=iters, stop_threshold=thr,
                                  warn=False)


def test_continuation_after_an_escape_equals_the_log_domain_one() -> None:
    """The plain solver escapes on far-apart mass; the wide and the log continuations are the same iterate."""
    h, lam = _far(), np.array([0.4, 0.6])
    kw = {"reg": 0.5, "stop_threshold": 1e-9, "max_iter": 400}
    (b_plain,), (seg,), (v,) = fast.plain_barycenters([h], lam, **kw)
    assert v is not None and 0 < seg.escaped_at < 50
    b, iterations, err, conv, _, _ = wide.wide_barycenter(h, lam, v, seg.escaped_at, **kw)
    ref, info = sinkhorn_barycenter_1d(torch.tensor(h), torch.tensor(lam), log_v0=torch.log(torch.from_numpy(v)),
                                       start=seg.escaped_at, warn=False, **kw)
    assert (iterations, conv) == (info.iterations, info.converged)
    assert abs(err - info.error) <= 1e-9 * max(info.error, 1e-300)
    assert np.abs(b - ref.numpy()).max() <= 1e-11 * float(ref.abs().max())


@pytest.mark.parametrize("reg", [0.05, 0.1, 1.0, 10.0])
def test_wide_from_the_start_equals_the_log_domain_solver_on_long_runs(reg: float) -> None:
    """600 iterations: potentials far outside float64's range (the far-apart case) and histograms with zeros."""
    rng = np.random.default_rng(5)
    for name, h in {**cases(160, rng), "far": _far()}.items():
        lam = rng.random(h.shape[0]) + 0.1
        lam /= lam.sum()
        ref, info = _log(h, lam, reg, 600)
        b, iterations, err, _, _, _ = wide.wide_barycenter(h, lam, np.ones(h.shape), 0, reg=reg, stop_threshold=0.0,
                                                        max_iter=600)
        assert iterations == info.iterations == 600
        assert np.abs(b - ref.numpy()).max() <= 1e-10 * float(ref.abs().max()), (name, reg)
        assert abs(err - info.error) <= 1e-8 * info.error + 1e-12, (name, reg)  # both at rounding level


def test_work_parameters_do_not_change_the_iterate() -> None:
    """Small chunks, a zero slope margin (u's promise breaks, iterations are redone) and stencils that always
    take the largest term's exponent give the same numbers as the defaults."""
    hists = segments((2500,), rows=4, seed=2) + [_far(300)[[0, 1, 0, 1]]]
    lam = np.array([0.1, 0.2, 0.3, 0.4])
    redone = 0
    for h in hists:
        for reg in (0.1, 10.0):
            kw = {"reg": reg, "stop_threshold": 0.0, "max_iter": 300}
            ref = wide.wide_barycenter(h, lam, np.ones(h.shape), 0, **kw)
            for opts in ({"chunk": 37}, {"u_margin": 0}, {"centre_limit": 0.0}, {"chunk": 64, "u_margin": 0}):
                got = wide.wide_barycenter(h, lam, np.ones(h.shape), 0, **kw, **opts)
                assert got[1:4] == pytest.approx(ref[1:4], rel=1e-12), opts  # iterations, error, converged
                assert np.abs(got.b - ref.b).max() <= 1e-11 * ref.b.max(), (reg, opts)  # summation order only
                redone += got.redone if opts.get("u_margin") == 0 else 0
    assert redone > 0  # the redo path ran


def test_stops_where_pot_stops() -> None:
    h = segments((7,), rows=3, seed=4)[0]
    lam = np.array([0.3, 0.3, 0.4])
    ref, info = _log(h, lam, 1.0, 500, thr=1e-4)
    b, iterations, _, conv, _, _ = wide.wide_barycenter(h, lam, np.ones(h.shape), 0, reg=1.0, stop_threshold=1e-4,
                                                     max_iter=500)
    assert info.converged and conv and iterations == info.iterations < 500
    assert np.abs(b - ref.numpy()).max() <= 1e-12 * float(ref.abs().max())


def test_slope_band_bounds_the_left_out_terms() -> None:
    """Every term beyond the band is below e^-40 / 2n of the centre for potentials of that slope."""
    for reg in (0.05, 0.1, 1.0, 10.0):
        for slope in (0.0, 5.0, 50.0, 500.0):
            n = 10**6
            d = wide.slope_band(reg, slope, n)
            far = np.arange(d + 1, d + 2000, dtype=np.float64)
            assert np.all(slope * far - far**2 / reg <= -(40 + np.log(2 * n)) + 1e-9), (reg, slope, d)


def test_kernel_weights_split_exactly_and_reach_below_float64() -> None:
    mant, ex = wide.kernel_weights(0.1, 40)
    assert np.all((mant >= 1.0) & (mant < 2.0))
    assert np.array_equal(np.ldexp(mant[:20], ex[:20]), np.exp(-np.arange(20.0) ** 2 / 0.1))
    assert np.allclose(ex[40] + np.log2(mant[40]), -1600 / (0.1 * np.log(2)), rtol=1e-13)


def test_fuse_continues_escaped_tensors_in_the_wide_solver_and_says_so() -> None:
    h = torch.from_numpy(_far())
    models = [{"w": row} for row in h]
    out, rep = fuse_with_report(models, [1, 1], "fedwb-sinkhorn", reg=0.5, max_iter=200, warn=False, solver="plain")
    d = rep.as_dict()
    assert d["sinkhorn_wide_range"] == {"tensors": ["w"], "reason": "values left the plain range [1e-100, 1e100]"}
    assert "sinkhorn_log_domain" not in d
    ref, _ = fuse_with_report(models, [1, 1], "fedwb-sinkhorn", reg=0.5, max_iter=200, warn=False, solver="log")
    assert torch.allclose(out["w"], ref["w"], rtol=1e-10, atol=1e-13)
    direct, rep_w = fuse_with_report(models, [1, 1], "fedwb-sinkhorn", reg=0.5, max_iter=200, warn=False,
                                     solver="wide")
    assert rep_w.sinkhorn_solver == "wide" and torch.allclose(direct["w"], ref["w"], rtol=1e-10, atol=1e-13)


def test_start_outside_the_iterations_is_one_clear_error() -> None:
    h = _far()
    with pytest.raises(ValueError, match="start must be in"):
        wide.wide_barycenter(h, np.array([0.5, 0.5]), np.ones(h.shape), 10, reg=0.1, stop_threshold=0.0, max_iter=10)


def test_saved_round_bench_times_real_updates(tmp_path, capsys) -> None:
    """bench.trained_round saves trained updates; bench.fusion --models times the paper's fusion on them."""
    import json

    from bench import fusion as bench_fusion
    from bench import trained_round

    trained_round.main(["--out", str(tmp_path), "--agents", "2", "--rounds", "1", "--partition", "iid",
                        "--method", "fedavg"])
    saved = torch.load(tmp_path / "round1.pt", weights_only=True)
    assert len(saved["updates"]) == 2 and len(saved["lam"]) == 2
    capsys.readouterr()
    bench_fusion.main(["--json", "--models", str(tmp_path / "round1.pt"), "--repeats", "1", "--max-iter", "30"])
    row = json.loads(capsys.readouterr().out)["saved_round"]
    assert row["K"] == 2 and row["params"] == 199_210
    assert row["auto_s"] > 0 and row["wide_s"] > 0
    assert row["wide_max_rel_diff_vs_auto"] <= 1e-9
    with pytest.raises(SystemExit):
        bench_fusion.main(["--models", str(tmp_path / "missing.pt")])
    assert "no such file" in capsys.readouterr().err
