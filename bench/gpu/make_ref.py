"""CPU reference for the GPU probe (issue 13): K = 10 histograms shaped like the MNIST MLP, reg 0.1, 1,000 and
10,000 iterations, the compiled CPU solver with the log-domain continuation of tensors that leave the plain range.

    python -m bench.gpu.make_ref        # ~2.5 min on 2 cores; writes runs/gpu-ref.npz (about 19 MB)

Carry that file to the GPU host (the device tool: name ``runs`` in ``carry``) and run ``python -m bench.gpu.probe``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from aggregator.fusion import sinkhorn_barycenter_1d
from aggregator.fusion import sinkhorn_fast as sf
from bench.common import progress

REF = "runs/gpu-ref.npz"
SIZES = [200 * 784, 200, 200 * 200, 200, 10 * 200, 10]  # the MNIST MLP 784-200-200-10, flattened


def histograms(k: int = 10, seed: int = 0) -> list[np.ndarray]:
    """K noisy copies of one random profile per tensor, shifted to a zero minimum and normalized."""
    rng = np.random.default_rng(seed)
    out = []
    for n in SIZES:
        x = rng.standard_normal(n) * 0.05 + 0.01 * rng.standard_normal((k, n))
        x = x - x.min(1, keepdims=True)
        out.append(x / x.sum(1, keepdims=True))
    return out


def reference(hs: list[np.ndarray], lam: np.ndarray, iters: int) -> np.ndarray:
    """The barycenters after exactly ``iters`` iterations, concatenated (what ``fuse`` computes)."""
    bs, segs, vs = sf.plain_barycenters(hs, lam, reg=0.1, stop_threshold=0.0, max_iter=iters)
    for i, (h, seg, v) in enumerate(zip(hs, segs, vs, strict=True)):
        if v is not None:
            b, _ = sinkhorn_barycenter_1d(torch.from_numpy(h), torch.from_numpy(lam), reg=0.1, stop_threshold=0.0,
                                          max_iter=iters, warn=False, log_v0=torch.log(torch.from_numpy(v)),
                                          start=seg.escaped_at)
            bs[i] = b.numpy()
    return np.concatenate(bs)


def main() -> None:
    hs = histograms()
    lam = np.full(len(hs[0]), 0.1)
    out = {"hists": np.concatenate(hs, axis=1), "sizes": np.array(SIZES)}
    for iters in (1000, 10000):
        t0 = time.perf_counter()
        out[f"ref{iters}"] = reference(hs, lam, iters)
        progress(f"{iters} iterations: {time.perf_counter() - t0:.1f} s")
    Path(REF).parent.mkdir(parents=True, exist_ok=True)
    np.savez(REF, **out)
    progress(f"wrote {REF}")


if __name__ == "__main__":
    main()
