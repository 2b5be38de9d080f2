"""GPU probe of the entropic solvers (issue 13): Triton and plain-torch variants, agreement with the CPU
reference from ``bench.gpu.make_ref``, 1,000 / 10,000 iterations, K = 2..64, n = 10^6, ``fuse()`` end to end.
Prints one JSON object per line (the figures of docs/benchmarks.md, CUDA section).

    python -m bench.gpu.probe cuda
"""
import json
import statistics
import sys
import time

import numpy as np
import torch

from aggregator.fusion import fuse_with_report, sinkhorn_barycenter_1d
from aggregator.fusion import sinkhorn_torch as st
from aggregator.fusion import sinkhorn_triton as stri
from bench.gpu.make_ref import REF

T0 = time.perf_counter()
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
d = np.load(REF)
sizes = d["sizes"].tolist()
H = torch.from_numpy(d["hists"]).to(dev)
hists = [x.contiguous() for x in torch.split(H, sizes, dim=1)]
lam = torch.full((10,), 0.1, dtype=torch.float64)


def out(**row):
    row["t"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(row), flush=True)


out(gpu=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", torch=torch.__version__,
    python=sys.version.split()[0])


def solve(hs, lm, iters, cont=False, solver="torch", **kw):
    torch.cuda.synchronize() if dev == "cuda" else None
    t = time.perf_counter()
    fn = stri.barycenters_triton if solver == "triton" else st.plain_barycenters_torch
    bs, segs, vs = fn(hs, lm, reg=0.1, stop_threshold=0.0, max_iter=iters, **kw)
    if cont:
        for i, (h, seg, v) in enumerate(zip(hs, segs, vs, strict=True)):
            if v is not None:
                bs[i], _ = sinkhorn_barycenter_1d(h, lm.to(h.device), reg=0.1, stop_threshold=0.0, max_iter=iters,
                                                  warn=False, log_v0=torch.log(v), start=seg.escaped_at)
    torch.cuda.synchronize() if dev == "cuda" else None
    return time.perf_counter() - t, bs, segs


def rel(bs, ref):
    got = torch.cat([b.double().cpu() for b in bs]).numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


variants = [("triton", True), ("triton", False), ("conv", True)]
try:  # the log-domain kernels alone: a plain range of [1, 1] sends the first block to them
    stri.RANGE_LO, stri.RANGE_HI = 1.0, 1.0
    solve(hists, lam, 30, solver="triton")
    tl_first, bs, segs = solve(hists, lam, 1000, solver="triton")
    out(case="K10_mlp_1000_log_kernels_only", s=tl_first, rel_vs_cpu=rel(bs, d["ref1000"]))
finally:
    stri.RANGE_LO, stri.RANGE_HI = 1e-100, 1e100
best = None
for sten, gr in variants:
    kw = {"solver": "triton"} if sten == "triton" else {"stencil": sten}
    try:
        first, bs, segs = solve(hists, lam, 1000, graphs=gr, **kw)
        times = [solve(hists, lam, 1000, graphs=gr, **kw)[0] for _ in range(3)]
        med = statistics.median(times)
        out(case="K10_mlp_1000", stencil=sten, graphs=gr, first_s=first, median_s=med, times=times,
            rel_vs_cpu=rel(bs, d["ref1000"]), band=segs[0].band, its=[s.iterations for s in segs],
            esc=[s.escaped_at for s in segs])
        if best is None or med < best[2]:
            best = (sten, gr, med)
    except Exception as exc:  # noqa: BLE001
        out(case="K10_mlp_1000", stencil=sten, graphs=gr, error=repr(exc)[:300])
sten, gr, _ = best
out(best=best)
bkw = {"solver": "triton"} if sten == "triton" else {"stencil": sten}
k5 = [h[:5].contiguous() for h in hists]
lam5 = torch.full((5,), 0.2, dtype=torch.float64)
solve(k5, lam5, 1000, graphs=gr, **bkw)
out(case="K5_mlp_1000", median_s=statistics.median(solve(k5, lam5, 1000, graphs=gr, **bkw)[0] for _ in range(3)))
# 10,000 iterations: the plain solve alone, then with the log-domain continuation of escaped tensors
t_plain, bs, segs = solve(hists, lam, 10000, graphs=gr, **bkw)
out(case="K10_mlp_10000_plain_only", s=t_plain, its=[s.iterations for s in segs], esc=[s.escaped_at for s in segs])
t_all, bs, segs = solve(hists, lam, 10000, cont=True, graphs=gr, **bkw)
out(case="K10_mlp_10000_with_log_continuation", s=t_all, rel_vs_cpu=rel(bs, d["ref10000"]))
for sz in (2, 16, 32, 64):  # K rows: the Triton tile holds all of them
    hk = [torch.cat([h] * (sz // 10 + 1))[:sz].contiguous() for h in hists]
    lk = torch.full((sz,), 1.0 / sz, dtype=torch.float64)
    solve(hk, lk, 20, graphs=gr, **bkw)
    out(case=f"K{sz}_mlp_1000", s=solve(hk, lk, 1000, graphs=gr, **bkw)[0])
g = torch.Generator(device=dev).manual_seed(0)
big = torch.rand(10, 10**6, generator=g, dtype=torch.float64, device=dev)
big /= big.sum(1, keepdim=True)
solve([big], lam, 20, graphs=gr, **bkw)
tb, _, segs = solve([big], lam, 1000, graphs=gr, **bkw)
out(case="K10_n1e6_1000", s=tb, band=segs[0].band)
# end to end through fuse (float32 models as agents send them), as the aggregator runs it
gm = torch.Generator().manual_seed(1)
shapes = {"fc1.weight": (200, 784), "fc1.bias": (200,), "fc2.weight": (200, 200), "fc2.bias": (200,),
          "fc3.weight": (10, 200), "fc3.bias": (10,)}
base = {n: torch.randn(s, generator=gm) * 0.05 for n, s in shapes.items()}
models = [{n: (t + 0.01 * torch.randn(t.shape, generator=gm)).to(dev) for n, t in base.items()} for _ in range(10)]
opts = {"reg": 0.1, "stop_threshold": 0.0, "max_iter": 1000, "warn": False}
fuse_with_report(models, [1.0] * 10, "fedwb-sinkhorn", **opts)
ts = []
for _ in range(3):
    torch.cuda.synchronize() if dev == "cuda" else None
    t = time.perf_counter()
    _, rep = fuse_with_report(models, [1.0] * 10, "fedwb-sinkhorn", **opts)
    torch.cuda.synchronize() if dev == "cuda" else None
    ts.append(time.perf_counter() - t)
out(case="fuse_K10_mlp_float32_1000", median_s=statistics.median(ts), solver=rep.sinkhorn_solver, times=ts)
t = time.perf_counter()
fuse_with_report(models, [1.0] * 10, "fedavg")
torch.cuda.synchronize() if dev == "cuda" else None
out(case="fedavg_K10_mlp", s=time.perf_counter() - t)
