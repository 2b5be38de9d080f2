"""Bounded influence and the robust rules (aggregator.fusion.robust): invariants and references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.fusion import fuse_with_report
from aggregator.fusion.robust import (
    bound_influence,
    cap_shares,
    clip_to_median,
    coordinate_median,
    delta_norm,
    krum_index,
    trimmed_mean,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e15)), min_size=1, max_size=12)  # fusion weights are
       .filter(lambda w: sum(w) > 0), st.floats(0.05, 1.0))  # n (1+tau)^-alpha >= 1e-6; near 1e-308 shares lose digits
def test_cap_shares_invariants(raw: list[float], cap: float) -> None:
    total = math.fsum(raw)
    lam = [w / total for w in raw]
    shares, capped = cap_shares(lam, cap)
    bound = max(cap, 1 / len(lam))
    assert math.isclose(math.fsum(shares), 1.0, rel_tol=1e-9)
    assert all(s <= bound * (1 + 1e-9) for s in shares)
    assert all(s >= 0 for s in shares)
    for i in range(len(lam)):  # lowered only to the cap, and only those reported
        if i in capped:
            assert shares[i] == pytest.approx(bound) and lam[i] > shares[i]
        else:
            assert shares[i] >= lam[i] * (1 - 1e-9)


def test_cap_shares_takes_the_hijack_share_down() -> None:
    shares, capped = cap_shares([10 / (20 + 1e15), 10 / (20 + 1e15), 1e15 / (20 + 1e15)], 2 / 3)
    assert capped == [2] and shares[2] == pytest.approx(2 / 3) and shares[0] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="share cap"):
        cap_shares([1.0], 0.0)


def _model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 4, generator=g) * scale, "b": torch.randn(4, generator=g) * scale,
            "steps": torch.tensor(seed)}


def test_clip_to_median_bounds_every_delta_and_keeps_the_honest() -> None:
    ref = _model(0)
    honest = [{k: v + 0.1 * _model(i)[k] if v.is_floating_point() else v for k, v in ref.items()} for i in (1, 2, 3)]
    attacker = {k: (torch.full_like(v, 1e30) if v.is_floating_point() else v) for k, v in ref.items()}
    out, clip = clip_to_median([*honest, attacker], ref, 3.0)
    assert clip.clipped == [3]
    assert clip.reference == sorted(clip.norms)[1]  # lower median of four
    assert delta_norm(out[3], ref) == pytest.approx(clip.bound, rel=1e-6)
    for before, after in zip(honest, out[:3], strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(out[3]["steps"], attacker["steps"])


def test_clip_with_two_updates_uses_the_smaller_and_the_previous_reference() -> None:
    ref = _model(0)
    small = {k: v + 0.01 if v.is_floating_point() else v for k, v in ref.items()}
    huge = {k: v + 100.0 if v.is_floating_point() else v for k, v in ref.items()}
    _, clip = clip_to_median([small, huge], ref, 2.0)
    assert clip.reference == pytest.approx(delta_norm(small, ref)) and clip.clipped == [1]
    _, alone = clip_to_median([huge], ref, 2.0, previous=1.0)
    assert alone.reference == 1.0 and alone.clipped == [0]


def test_bound_influence_moves_the_model_at_most_factor_times_median() -> None:
    ref = _model(0)
    honest = [{k: v + 0.05 * _model(i)[k] if v.is_floating_point() else v for k, v in ref.items()}
              for i in (1, 2)]
    attacker = {k: (v + 1e6 if v.is_floating_point() else v) for k, v in ref.items()}
    models, lam, rep = bound_influence([*honest, attacker], [10, 10, 1e15], ref, share_cap=2 / 3, clip_factor=3.0)
    fused, _ = fuse_with_report(models, lam, "fedavg")
    assert max(lam) <= 2 / 3 + 1e-12 and rep["capped"] == [2] and rep["clipped"] == [2]
    assert delta_norm(fused, ref) <= rep["clip_bound"] * (1 + 1e-9)


def test_median_and_trimmed_mean_match_numpy() -> None:
    models = [_model(i) for i in range(5)]
    stack = np.stack([m["w"].numpy() for m in models]).astype(np.float64)
    med = coordinate_median(models)
    assert np.allclose(med["w"].numpy(), np.median(stack, axis=0), atol=1e-6)
    tm = trimmed_mean(models, 0.2)
    srt = np.sort(stack, axis=0)[1:4].mean(axis=0)
    assert np.allclose(tm["w"].numpy(), srt, atol=1e-6)
    assert torch.equal(med["steps"], models[-1]["steps"])
    with pytest.raises(ValueError, match="trim_ratio"):
        trimmed_mean(models, 0.5)


def test_krum_picks_an_honest_model_among_outliers() -> None:
    honest = [_model(1, 1.0)] + [{k: v + 0.01 * i if v.is_floating_point() else v for k, v in _model(1).items()}
                                 for i in range(1, 5)]
    bad = [{k: v + 50.0 if v.is_floating_point() else v for k, v in _model(2).items()} for _ in range(2)]
    chosen, scores = krum_index(honest + bad, byzantine=2)
    assert chosen < 5 and len(scores) == 7
    with pytest.raises(ValueError, match="at least 7"):
        krum_index(honest[:4] + bad[:2], byzantine=2)


@pytest.mark.parametrize("method", ["median", "trimmed-mean", "krum"])
def test_robust_methods_are_registered_fusion_rules(method: str) -> None:
    models = [_model(i) for i in range(5)]
    fused, report = fuse_with_report(models, [1] * 5, method, trim_ratio=0.2)
    assert set(fused) == set(models[0]) and fused["w"].dtype == models[0]["w"].dtype
    assert report.method == method and report.model_level


def test_server_step_is_an_ema_of_the_fusions() -> None:
    from aggregator.fusion.fedavg import server_step

    old = {"w": torch.zeros(3), "steps": torch.tensor(1)}
    fused = {"w": torch.full((3,), 4.0), "steps": torch.tensor(5)}
    assert server_step(old, fused, 1.0) is fused
    half = server_step(old, fused, 0.5)
    assert torch.equal(half["w"], torch.full((3,), 2.0)) and half["w"].dtype == torch.float32
    assert torch.equal(half["steps"], torch.tensor(5))  # integers: the fusion's value
