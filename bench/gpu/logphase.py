"""Where the log-domain phase of the Triton entropic solver spends its time (issue 13), on a GPU.

K = 10 MNIST-MLP histograms (``bench.gpu.make_ref``), reg 0.1, 10,000 iterations with the CPU's plain range
[1e-100, 1e100] (with the GPU's wider one this case has no log phase): the time before and after the switch to log
kernels, the blocks run in each domain, then on the final log state: each kernel of one
windowed iteration timed alone (CUDA events, median of 20) for a few window sizes and warp counts, and the share
of windows whose band sums fall under ``LOG_TINY`` (those take the exact two-pass recomputation).
Prints one JSON object per line.

    python -m bench.gpu.logphase
"""
from __future__ import annotations

import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
import triton

from aggregator.fusion import sinkhorn_triton as tri
from bench.gpu.make_ref import REF

T0 = time.perf_counter()


def out(**row) -> None:
    row["t"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(row), flush=True)


def schedule(hists: list[torch.Tensor], lam: torch.Tensor, iters: int) -> tri._Blocks:
    """One solve with the block schedule and the switch time recorded; returns its (final) state."""
    blocks_run: list[tuple[bool, int]] = []
    switched: list[float] = []
    run, to_log = tri._Blocks.run, tri._Blocks.to_log

    def rec_run(self, *key):
        blocks_run.append((key[0], key[1]))
        return run(self, *key)

    def rec_to_log(self):
        torch.cuda.synchronize()
        switched.append(time.perf_counter())
        return to_log(self)

    tri._Blocks.run, tri._Blocks.to_log = rec_run, rec_to_log
    try:
        tri._cache.clear()
        tri.barycenters_triton(hists, lam, reg=0.1, stop_threshold=0.0, max_iter=iters)  # compile, capture
        blocks_run.clear()
        switched.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tri.barycenters_triton(hists, lam, reg=0.1, stop_threshold=0.0, max_iter=iters)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
    finally:
        tri._Blocks.run, tri._Blocks.to_log = run, to_log
    plain = [s for log, s in blocks_run if not log]
    logs = [s for log, s in blocks_run if log]
    ts = switched[-1] if switched else t1
    out(case="schedule", total_s=round(t1 - t0, 4), plain_s=round(ts - t0, 4), log_s=round(t1 - ts, 4),
        plain_blocks=len(plain), plain_iters=sum(plain), log_blocks=len(logs), log_iters=sum(logs),
        log_steps=sorted(set(logs)))
    (state,) = tri._cache.values()
    return state


def med_ms(fn, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return round(statistics.median(times), 4)


def bad_windows(x: torch.Tensor, w: torch.Tensor, gap: int, band: int, window: int) -> tuple[float, float]:
    """Share of windows (and of points) whose band sum against the window's maximum is under e^LOG_TINY."""
    k_rows, n = x.shape
    span = window - 2 * band
    tiles = triton.cdiv(n, span)
    pad = torch.full((k_rows, tiles * span + 2 * band + window), -math.inf, dtype=x.dtype, device=x.device)
    pad[:, band:band + n] = x
    win = pad.unfold(1, window, span)[:, :tiles]  # (K, tiles, window): columns t span - band + p
    r = win.amax(-1, keepdim=True)
    r = torch.where(r > -math.inf, r, 0.0)
    e = torch.exp(win - r).reshape(-1, 1, window)
    ker = w[gap - band:gap + band + 1].reshape(1, 1, -1)
    s = F.conv1d(e, ker).reshape(k_rows, tiles, window - 2 * band)
    fin = F.conv1d((win > -math.inf).to(x.dtype).reshape(-1, 1, window), torch.ones_like(ker))
    fin = fin.reshape(k_rows, tiles, window - 2 * band) > 0
    cols = (torch.arange(tiles, device=x.device)[:, None] * span + torch.arange(span, device=x.device)) < n
    bad = fin & cols & ((s == 0) | (torch.log(s) < tri.LOG_TINY))
    return float(bad.any(-1).double().mean()), float(bad.double().sum() / (fin & cols).double().sum())


def windowed_ms(state: tri._Blocks, band: int, window: int, warps: int) -> tuple[float, float]:
    """Median time of the f kernel (from G) and of the l kernel (from f) with this window and warp count."""
    span = window - 2 * band
    tiles = triton.cdiv(state.length, span)
    scratch = torch.empty(state.k_rows * tiles * window, dtype=torch.float64, device="cuda")
    counts = torch.empty(state.k_rows * tiles * window, dtype=torch.int32, device="cuda")

    def step(src: torch.Tensor, dst: torch.Tensor, sub_a: bool) -> None:
        tri._lse_rows[(tiles, state.k_rows)](
            src, state.loga, dst, scratch, counts, state.w, state.cost, state.gap, state.length, span, band,
            DS=min(band, tri.UNROLL), BW=window, SUB_A=sub_a, LOG_TINY=tri.LOG_TINY, num_warps=warps)

    step(state.g, state.work, True)
    return med_ms(lambda: step(state.g, state.work, True)), med_ms(lambda: step(state.work, state.ell, False))


def kernels(state: tri._Blocks, band: int) -> None:
    """Each launch of one windowed log iteration alone, for window sizes and warp counts."""
    for window in (512, 1024, 2048):
        for warps in (4, 8):
            ms_f, ms_l = windowed_ms(state, band, window, warps)
            out(case="windowed_kernels", window=window, warps=warps, band=band, f_ms=ms_f, l_ms=ms_l)
    err, g, logb = state.err_all[0], state.g.clone(), state.logb.clone()
    ms_u = med_ms(lambda: tri._log_update[(triton.cdiv(state.length, state.bn),)](
        state.ell, g, state.lam, state.livef, logb, err, state.run_min, state.run_max,
        state.length, state.k_rows, KP=state.kp, BN=state.bn, CHECK=False))
    ms_x = med_ms(lambda: tri._lse_f[(triton.cdiv(state.length, state.bn),)](
        state.g, state.loga, state.work, state.cost, state.gap, state.length, state.k_rows,
        D=band, KP=state.kp, BN=state.bn))
    out(case="other_kernels", update_ms=ms_u, exact_lse_f_ms=ms_x)


def main() -> None:
    d = np.load(REF)
    sizes = d["sizes"].tolist()
    hists = [x.contiguous() for x in torch.split(torch.from_numpy(d["hists"]).cuda(), sizes, dim=1)]
    lam = torch.full((10,), 0.1, dtype=torch.float64)
    out(gpu=torch.cuda.get_device_name(0))
    tri.PLAIN_LO, tri.PLAIN_HI = 1e-100, 1e100  # the CPU's plain range: the MLP case then has a log phase to study
    state = schedule(hists, lam, 10000)
    band = 8
    for part in (lambda: fallback(state, band), lambda: kernels(state, band)):
        try:
            part()
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others' figures
            out(case="error", error=repr(exc)[:600])


def fallback(state: tri._Blocks, band: int) -> None:
    fb_g = bad_windows(state.g, state.w, state.gap, band, tri.WINDOW)
    tri._lse_f[(triton.cdiv(state.length, state.bn),)](state.g, state.loga, state.work, state.cost, state.gap,
                                                     state.length, state.k_rows, D=band, KP=state.kp, BN=state.bn)
    fb_f = bad_windows(state.work, state.w, state.gap, band, tri.WINDOW)
    out(case="fallback_share", g_windows=fb_g[0], g_points=fb_g[1], f_windows=fb_f[0], f_points=fb_f[1])

if __name__ == "__main__":
    main()
