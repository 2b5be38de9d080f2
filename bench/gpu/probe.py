"""GPU probe of the Triton entropic solver (issue 13): K = 10 MNIST-MLP histograms at 1,000 iterations (median,
and the GPU time inside blocks vs the rest), K = 2..64, one tensor of 10^6 points and 10,000 iterations with the
log-domain continuation (each as the solver is, and with the CPU's plain range [1e-100, 1e100] and windowed or
exact two-pass log-domain LSE), ``fuse()`` end to end; agreement with the CPU reference from ``bench.gpu.make_ref``.
Prints one JSON object per line (the figures of docs/benchmarks.md, CUDA section).

    python -m bench.gpu.probe
"""
import json
import statistics
import time

import numpy as np
import torch

from aggregator.fusion import fuse_with_report, sinkhorn_barycenter_1d
from aggregator.fusion import sinkhorn_triton as new
from bench.gpu.make_ref import REF

T0 = time.perf_counter()
d = np.load(REF)
sizes = d["sizes"].tolist()
H = torch.from_numpy(d["hists"]).cuda()
hists = [x.contiguous() for x in torch.split(H, sizes, dim=1)]
lam = torch.full((10,), 0.1, dtype=torch.float64)


def out(**row):
    row["t"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(row), flush=True)


out(gpu=torch.cuda.get_device_name(0), torch=torch.__version__)


def solve(mod, hs, lm, iters, cont=False):
    torch.cuda.synchronize()
    t = time.perf_counter()
    bs, segs, vs = mod.barycenters_triton(hs, lm, reg=0.1, stop_threshold=0.0, max_iter=iters)
    if cont:
        for i, (h, seg, v) in enumerate(zip(hs, segs, vs, strict=True)):
            if v is not None:
                bs[i], _ = sinkhorn_barycenter_1d(h, lm.to(h.device), reg=0.1, stop_threshold=0.0, max_iter=iters,
                                                  warn=False, log_v0=torch.log(v), start=seg.escaped_at)
    torch.cuda.synchronize()
    return time.perf_counter() - t, bs, segs


def rel(bs, ref):
    got = torch.cat([b.double().cpu() for b in bs]).numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def timed(name, mod, hs, lm, iters, reps=3, ref=None, cont=False):
    try:
        first, bs, segs = solve(mod, hs, lm, iters, cont)
        times = [solve(mod, hs, lm, iters, cont)[0] for _ in range(reps)]
        row = {"case": name, "first_s": round(first, 4), "median_s": round(statistics.median(times), 4),
               "times": [round(x, 4) for x in times], "band": segs[0].band, "esc": [s.escaped_at for s in segs]}
        if ref is not None:
            row["rel_vs_cpu"] = rel(bs, ref)
        out(**row)
    except Exception as exc:  # noqa: BLE001
        out(case=name, error=repr(exc)[:400])




def breakdown(mod, name):
    evs = []
    orig_run = mod._Blocks.run

    def run(self, *key):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        orig_run(self, *key)
        b.record()
        evs.append((a, b))
    mod._Blocks.run = run
    try:
        tot, bs, _ = solve(mod, hists, lam, 1000)
    finally:
        mod._Blocks.run = orig_run
    in_blocks = sum(a.elapsed_time(b) for a, b in evs) / 1000
    out(case=name + "_breakdown", total_s=round(tot, 4), in_blocks_gpu_s=round(in_blocks, 4), blocks=len(evs),
        rel_vs_cpu=rel(bs, d["ref1000"]))


timed("K10_1000", new, hists, lam, 1000, reps=5, ref=d["ref1000"])
breakdown(new, "K10_1000")
k5 = [h[:5].contiguous() for h in hists]
timed("K5_1000", new, k5, torch.full((5,), 0.2, dtype=torch.float64), 1000)
for sz in (2, 64):
    hk = [torch.cat([h] * (sz // 10 + 1))[:sz].contiguous() for h in hists]
    timed(f"K{sz}_1000", new, hk, torch.full((sz,), 1.0 / sz, dtype=torch.float64), 1000, reps=2)
g = torch.Generator(device="cuda").manual_seed(0)
big = torch.rand(10, 10**6, generator=g, dtype=torch.float64, device="cuda")
big /= big.sum(1, keepdim=True)


VARIANTS = (  # (label, module settings): today's solver, then the CPU's plain range with windowed / exact log kernels
    ("default", {}),
    ("range1e100_windowed", {"PLAIN_LO": 1e-100, "PLAIN_HI": 1e100}),
    ("range1e100_exact", {"PLAIN_LO": 1e-100, "PLAIN_HI": 1e100, "WINDOW_BAND": -1}),
)


def variants(name, hs, lm, iters, reps, ref=None, cont=False):
    """The same case with the solver as it is and with the settings of ``VARIANTS`` (restored after)."""
    for label, settings in VARIANTS:
        saved = {k: getattr(new, k) for k in settings}
        for k, v in settings.items():
            setattr(new, k, v)
        new._cache.clear()
        try:
            timed(f"{name}_{label}", new, hs, lm, iters, reps=reps, ref=ref, cont=cont)
        finally:
            for k, v in saved.items():
                setattr(new, k, v)
            new._cache.clear()


variants("K10_n1e6_1000", [big], lam, 1000, reps=2)
variants("K10_10000_with_log_continuation", hists, lam, 10000, reps=2, ref=d["ref10000"], cont=True)
gm = torch.Generator().manual_seed(1)
shapes = {"fc1.weight": (200, 784), "fc1.bias": (200,), "fc2.weight": (200, 200), "fc2.bias": (200,),
          "fc3.weight": (10, 200), "fc3.bias": (10,)}
base = {n: torch.randn(s, generator=gm) * 0.05 for n, s in shapes.items()}
models = [{n: (t + 0.01 * torch.randn(t.shape, generator=gm)).cuda() for n, t in base.items()} for _ in range(10)]
opts = {"reg": 0.1, "stop_threshold": 0.0, "max_iter": 1000, "warn": False}
for k in (5, 10):
    fuse_with_report(models[:k], [1.0] * k, "fedwb-sinkhorn", **opts)
    ts = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        _, rep = fuse_with_report(models[:k], [1.0] * k, "fedwb-sinkhorn", **opts)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    out(case=f"fuse_K{k}_mlp_float32_1000", median_s=round(statistics.median(ts), 4), solver=rep.sinkhorn_solver,
        times=[round(x, 4) for x in ts])
t = time.perf_counter()
fuse_with_report(models, [1.0] * 10, "fedavg")
torch.cuda.synchronize()
out(case="fedavg_K10_mlp", s=round(time.perf_counter() - t, 5))
