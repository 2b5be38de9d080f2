"""Fusion math against POT and hand-computed values, plus hypothesis invariants."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.fusion import (
    barycenter_1d,
    barycenter_objective,
    fuse,
    fuse_with_report,
    log_gauss_conv,
    sinkhorn_barycenter_1d,
)


def _cost(n: int) -> np.ndarray:
    x = np.arange(n, dtype=np.float64)
    return (x[:, None] - x[None, :]) ** 2


def _objective(b: np.ndarray, hists: np.ndarray, w: np.ndarray) -> float:
    m = _cost(hists.shape[1])
    return float(sum(w[k] * ot.emd2(b, hists[k], m) for k in range(len(w))))


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n, k = int(rng.integers(8, 33)), int(rng.integers(2, 5))
    h = rng.random((k, n)) * (rng.random((k, n)) < 0.35)
    h[np.arange(k), rng.integers(0, n, k)] += 0.05  # every row has mass
    h /= h.sum(axis=1, keepdims=True)
    w = rng.random(k) + 0.05
    return h, w / w.sum()


@pytest.mark.parametrize("method", ["merge", "sort"])
def test_exact_barycenter_matches_pot_lp(method: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(60):
        h, w = _random_case(rng)
        b = barycenter_1d(torch.tensor(h), w, method=method).numpy()
        assert b.min() >= 0 and abs(b.sum() - 1) < 1e-12
        ref = ot.lp.barycenter(h.T, _cost(h.shape[1]), w)
        ours, theirs = _objective(b, h, w), _objective(ref, h, w)
        assert ours <= theirs * (1 + 1e-7) + 1e-12


def test_merge_and_sort_paths_agree_and_chunks_do_not_matter() -> None:
    from aggregator.fusion.barycenter import _merge_barycenter

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 5000))
    h = x - x.min(axis=1, keepdims=True)
    w = rng.random(6) + 0.1
    w /= w.sum()
    cum = np.cumsum(h, axis=1)
    one, many = _merge_barycenter(cum, w, 1), _merge_barycenter(cum, w, 7)
    by_sort = barycenter_1d(torch.tensor(h), w, method="sort").numpy()
    hn = torch.tensor(h / h.sum(1, keepdims=True))
    objs = [barycenter_objective(torch.tensor(b), hn, w) for b in (one, many, by_sort)]
    assert max(objs) - min(objs) <= 1e-9 * max(objs)
    assert np.abs(one - by_sort).sum() < 1e-3  # differs only at exact rounding ties


def test_barycenter_of_two_diracs_is_their_midpoint() -> None:
    h = torch.zeros(2, 11, dtype=torch.float64)
    h[0, 2] = 1
    h[1, 8] = 1
    b = barycenter_1d(h, [0.5, 0.5])
    assert b[5] == 1.0
    b = barycenter_1d(h, [0.25, 0.75])  # 2 + 0.75 * 6 = 6.5: a tie, either neighbour
    assert float(b[6] + b[7]) == 1.0


def test_barycenter_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        barycenter_1d(torch.zeros(2, 4), [1, 1])
    with pytest.raises(ValueError, match="weights"):
        barycenter_1d(torch.ones(2, 4), [1, -1])
    with pytest.raises(ValueError, match="unknown barycenter method"):
        barycenter_1d(torch.ones(2, 4), [1, 1], method="magic")


def test_quantile_objective_equals_pot_emd() -> None:
    rng = np.random.default_rng(11)
    for _ in range(10):
        h, w = _random_case(rng)
        b = rng.random(h.shape[1])
        b /= b.sum()
        assert abs(barycenter_objective(torch.tensor(b), torch.tensor(h), w) - _objective(b, h, w)) < 1e-9


ITERS = 1000  # the iterations are step for step POT's, so agreement at 1000 implies it at 5000


def _pot_pipeline(models: list[np.ndarray], lam: np.ndarray, reg: float) -> np.ndarray:
    x = np.stack([m.reshape(-1) for m in models]).astype(np.float64)
    mins = x.min(axis=1)
    shifted = x - mins[:, None]
    sums = shifted.sum(axis=1)
    hists = shifted / sums[:, None]
    b = ot.bregman.barycenter(hists.T, _cost(x.shape[1]), reg, lam, method="sinkhorn_log",
                              stopThr=1e-9, numItermax=ITERS, warn=False)
    return b * (lam @ sums) + lam @ mins


@pytest.mark.parametrize("reg", [0.1, 1.0, 10.0, 100.0])
def test_sinkhorn_fuse_matches_pot_dense_pipeline(reg: float) -> None:
    rng = np.random.default_rng(int(reg * 10))
    for n in (16, 97, 256):
        base = rng.standard_normal(n)
        models = [base + 0.3 * rng.standard_normal(n) for _ in range(3)]
        lam = np.array([0.2, 0.5, 0.3])
        ref = _pot_pipeline(models, lam, reg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fuse([{"w": torch.tensor(m)} for m in models], lam, method="fedwb-sinkhorn",
                       reg=reg, stop_threshold=1e-9, max_iter=ITERS)["w"].numpy()
        assert np.linalg.norm(out - ref) <= 1e-4 * np.linalg.norm(ref)


def test_sinkhorn_matches_pot_when_mass_travels_far() -> None:
    n = 120
    h = np.zeros((2, n))
    h[0, :10] = 1
    h[1, -10:] = 1
    h /= h.sum(axis=1, keepdims=True)
    for reg in (0.5, 10.0):
        ref = ot.bregman.barycenter(h.T, _cost(n), reg, [0.5, 0.5], method="sinkhorn_log",
                                    stopThr=1e-9, numItermax=1000, warn=False)
        b, info = sinkhorn_barycenter_1d(torch.tensor(h), [0.5, 0.5], reg=reg, stop_threshold=1e-9,
                                         max_iter=1000, warn=False)
        assert np.abs(b.numpy() - ref).sum() <= 1e-6 * np.abs(ref).sum()
        assert info.band > 5  # the band widened with the potentials


def test_log_gauss_conv_equals_dense_logsumexp() -> None:
    rng = np.random.default_rng(1)
    for spread in (1.0, 50.0, 2000.0):  # the last one takes the two-pass path
        g = torch.tensor(rng.random((3, 64)) * spread)
        for reg in (0.1, 3.0):
            dense = torch.logsumexp(g[:, None, :] - torch.tensor(_cost(64))[None] / reg, dim=2)
            ours, _ = log_gauss_conv(g, reg)
            assert torch.allclose(ours, dense, rtol=1e-12, atol=1e-9)


def test_sinkhorn_reports_non_convergence() -> None:
    h = torch.rand(3, 50, dtype=torch.float64)
    h /= h.sum(1, keepdim=True)
    with pytest.warns(RuntimeWarning, match="raise max_iter or reg"):
        _, info = sinkhorn_barycenter_1d(h, [1, 1, 1], reg=0.1, stop_threshold=1e-30, max_iter=12)
    assert info.iterations == 12 and not info.converged


def test_fedavg_is_weighted_mean_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = fuse([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert int(out["n"]) == 5  # integers: newest (last) model


@pytest.mark.parametrize("method", ["fedwb", "fedwb-sinkhorn"])
def test_identical_models_are_returned(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    m = {"w": torch.randn(30, 20, generator=g), "b": torch.randn(20, generator=g),
         "s": torch.tensor(2.5), "c": torch.full((4, 4), 3.0)}
    out = fuse([m, m, m], [1, 2, 3], method=method, warn=False)
    tol = 1e-5 if method == "fedwb" else 1e-3  # the entropic kernel blurs by e^(-1/reg)
    for k in m:
        assert torch.allclose(out[k], m[k], rtol=tol, atol=tol * float(m[k].abs().max())), k
        assert out[k].dtype == m[k].dtype


def test_fuse_validates_inputs() -> None:
    m = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="unknown fusion method 'avg'"):
        fuse([m], [1], method="avg")
    with pytest.raises(ValueError, match="sum to zero"):
        fuse([m, m], [0, 0])
    with pytest.raises(ValueError, match="different tensors"):
        fuse([m, {"v": torch.ones(3)}], [1, 1])
    with pytest.raises(ValueError, match="model 1 has"):
        fuse([m, {"w": torch.ones(4)}], [1, 1])
    with pytest.raises(ValueError, match="no models"):
        fuse([], [])


@pytest.mark.parametrize("method", ["fedavg", "fedwb-sinkhorn", "median"])
def test_weights_whose_sum_overflows_are_normalized_not_an_overflow(method: str) -> None:
    a, b = {"w": torch.tensor([0.0, 1.0, 2.0])}, {"w": torch.tensor([2.0, 1.0, 0.0])}
    big = fuse([a, b], [1e308, 1e308], method=method, warn=False)
    small = fuse([a, b], [1.0, 1.0], method=method, warn=False)
    assert torch.equal(big["w"], small["w"])


def test_bias_option_and_report() -> None:
    g = torch.Generator().manual_seed(1)
    models = [{"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)} for _ in range(3)]
    out, rep = fuse_with_report(models, [1, 1, 1], "fedwb", biases="fedavg")
    assert rep.rules == {"fedwb": 1, "fedavg": 1}
    assert torch.allclose(out["b"], sum(m["b"] for m in models) / 3, atol=1e-6)


def test_half_precision_and_device_option() -> None:
    models = [{"w": torch.randn(64).to(torch.bfloat16)} for _ in range(2)]
    out = fuse(models, [1, 1], method="fedwb", device="cpu")
    assert out["w"].dtype == torch.bfloat16


float_lists = st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=2, max_size=24)


@st.composite
def model_sets(draw):  # K models of one tensor of length n, positive weights
    n = draw(st.integers(2, 24))
    k = draw(st.integers(1, 4))
    # values on a 1e-6 grid: a weight like 1e-38 vanishes when every model is shifted by 7 (7 + 1e-38 == 7),
    # so shift invariance can only hold where the shift does not round values away
    value = st.floats(-50, 50, allow_nan=False).map(lambda x: round(x, 6))
    rows = [draw(st.lists(value, min_size=n, max_size=n)) for _ in range(k)]
    w = draw(st.lists(st.floats(0.1, 10), min_size=k, max_size=k))
    return [torch.tensor(r, dtype=torch.float64) for r in rows], w


@settings(max_examples=80, deadline=None)
@given(model_sets(), st.sampled_from(["fedavg", "fedwb", "fedwb-sinkhorn"]))
def test_invariants(case, method: str) -> None:
    rows, w = case
    models = [{"w": r} for r in rows]
    opts = {"warn": False, "max_iter": 200}
    out = fuse(models, w, method=method, **opts)["w"]
    lam = torch.tensor(w, dtype=torch.float64) / sum(w)
    scale = max(1.0, float(torch.stack(rows).abs().max()))
    # the weighted-mean sum is kept (entropic: with renormalize=True)
    kept = out
    if method == "fedwb-sinkhorn":
        kept = fuse(models, w, method=method, renormalize=True, **opts)["w"]
    assert abs(float(kept.sum()) - float((lam * torch.stack(rows).sum(1)).sum())) <= 1e-6 * scale * len(out)
    # order does not matter
    perm = list(reversed(range(len(rows))))
    out_perm = fuse([models[i] for i in perm], [w[i] for i in perm], method=method, **opts)["w"]
    assert torch.allclose(out, out_perm, atol=1e-6 * scale)
    # shifting every model by c shifts the result by c
    shifted = fuse([{"w": r + 7.0} for r in rows], w, method=method, **opts)["w"]
    assert torch.allclose(shifted, out + 7.0, atol=1e-6 * scale)
    # K = 1 is the identity (the entropic barycenter blurs by e^(-1/reg) per grid step)
    one = fuse([models[0]], [1.0], method=method, **opts)["w"]
    tol = 1e-6 if method != "fedwb-sinkhorn" else 1e-3
    assert torch.allclose(one, rows[0], atol=tol * scale)
    if method == "fedavg":
        assert torch.allclose(out, (lam[:, None] * torch.stack(rows)).sum(0), atol=1e-9 * scale)
