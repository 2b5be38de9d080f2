"""Fusion benchmark: speed of fedavg / fedwb / fedwb-sinkhorn, POT's dense way, fidelity.

    python -m bench.fusion --json [--quick] [--device cpu|cuda] [--threads 2]
    python -m bench.fusion --json --models runs/rounds/fashion/round1.pt [--with-log]

Prints one JSON document: medians in seconds, ratios to FedAvg measured in the same
process, POT's ``ot.bregman.barycenter`` on the dense n x n cost with its peak memory,
and a fidelity table (relative distance of each method's result to FedAvg and to the
common model, for clients spread around a common model). ``--models`` times the paper's
fusion on a saved round of trained updates instead (``bench.trained_round`` makes them).
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import torch

from aggregator.fusion import fuse_with_report, sinkhorn_wide
from bench.common import emit, machine, median_seconds, progress

SINKHORN_MAX_KN = 1_000_000  # above this the entropic runs take minutes: reported as skipped


def _models(k: int, n: int, spread: float, device: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return [{"w": (base + spread * torch.randn(n, generator=g)).to(device)} for _ in range(k)]


def weighted_sum_baseline(models: list[dict[str, torch.Tensor]], lam: list[float]) -> torch.Tensor:
    """A plain float32 weighted sum, what FedAvg costs: sum_k lam_k W_k, one new tensor."""
    acc = models[0]["w"] * lam[0]
    for m, w in zip(models[1:], lam[1:], strict=True):
        acc.add_(m["w"], alpha=w)
    return acc


def speed(ks: list[int], ns: list[int], regs: list[float], repeats: int, device: str) -> list[dict]:
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for k in ks:
        for n in ns:
            models = _models(k, n, 0.2, device)
            lam = [1.0 / k] * k

            def run(method: str, models=models, **opts) -> None:
                fuse_with_report(models, [1.0] * len(models), method, warn=False, **opts)
                sync()

            row: dict = {"K": k, "n": n}
            row["weighted_sum_s"] = median_seconds(lambda models=models, lam=lam: (
                weighted_sum_baseline(models, lam), sync()), max(repeats, 5))
            row["fedavg_s"] = median_seconds(lambda: run("fedavg"), max(repeats, 5))
            row["fedwb_s"] = median_seconds(lambda: run("fedwb"), repeats)
            for reg in regs:
                key = f"fedwb_sinkhorn_reg{reg:g}"
                if k * n > SINKHORN_MAX_KN:
                    row[key + "_s"] = None
                    continue
                t0 = time.perf_counter()
                _, rep = fuse_with_report(models, [1.0] * k, "fedwb-sinkhorn", reg=reg, warn=False)
                sync()
                row[key + "_s"] = time.perf_counter() - t0
                row[key + "_iterations"] = rep.sinkhorn_iterations
                row[key + "_error"] = rep.sinkhorn_error
            for key in [c for c in row if c.endswith("_s") and c not in ("fedavg_s",)]:
                if row[key] is not None:
                    row[key.removesuffix("_s") + "_over_fedavg"] = row[key] / row["fedavg_s"]
            if row["fedwb_s"] is not None:
                row["fedwb_over_weighted_sum"] = row["fedwb_s"] / row["weighted_sum_s"]
            progress(f"  K={k} n={n}: fedavg {row['fedavg_s'] * 1e3:.1f} ms, "
                     f"fedwb {row['fedwb_s'] * 1e3:.1f} ms")
            rows.append(row)
    return rows


def pot_dense(ns: list[int], k: int, reg: float) -> list[dict]:
    """The paper's way: POT's Sinkhorn barycenter on the dense n x n cost matrix."""
    import ot

    out = []
    for n in ns:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(n) + 0.2 * rng.standard_normal((k, n))
        h = x - x.min(axis=1, keepdims=True)
        h /= h.sum(axis=1, keepdims=True)
        grid = np.arange(n, dtype=np.float64)
        tracemalloc.start()
        t0 = time.perf_counter()
        cost = (grid[:, None] - grid[None, :]) ** 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ot.bregman.barycenter(h.T, cost, reg, np.full(k, 1.0 / k))  # POT default: "sinkhorn"
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        t1 = time.perf_counter()
        _, rep = fuse_with_report([{"w": torch.from_numpy(r)} for r in x], [1.0] * k,
                                  "fedwb-sinkhorn", reg=reg, warn=False)
        ours = time.perf_counter() - t1
        out.append({"n": n, "K": k, "reg": reg, "pot_seconds": seconds,
                    "pot_peak_mib": peak / 2**20, "ours_seconds": ours,
                    "ours_iterations": rep.sinkhorn_iterations})
        progress(f"  POT dense n={n}: {seconds:.2f} s, peak {peak / 2**20:.0f} MiB; ours {ours:.2f} s")
    return out


def fidelity(spreads: list[float], n: int = 400, k: int = 5) -> list[dict]:
    """Relative distance of each method's fused model to FedAvg and to the common model."""
    out = []
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    for spread in spreads:
        models = [{"w": base + spread * base.abs().mean() * torch.randn(n, generator=g,
                                                                        dtype=torch.float64)}
                  for _ in range(k)]
        avg = fuse_with_report(models, [1.0] * k, "fedavg")[0]["w"]
        row: dict = {"spread": spread, "n": n, "K": k,
                     "client_to_common": float(np.mean([float((m["w"] - base).norm() / base.norm())
                                                        for m in models]))}
        variants = [("fedavg", {}), ("fedwb", {})] + [
            (f"fedwb-sinkhorn reg={r:g}", {"reg": r}) for r in (0.1, 1.0, 10.0)]
        for name, opts in variants:
            method = name.split()[0]
            w = fuse_with_report(models, [1.0] * k, method, warn=False, **opts)[0]["w"]
            row[name] = {"to_fedavg": float((w - avg).norm() / avg.norm()),
                         "to_common": float((w - base).norm() / base.norm())}
        out.append(row)
    return out


def _sinkhorn_default_child(k: int, n: int, threads: int, conn) -> None:
    import resource

    torch.set_num_threads(threads)
    models = _models(k, n, 0.2, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _, rep = fuse_with_report(models, [1.0] * k, "fedwb-sinkhorn", warn=False)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send({"K": k, "n": n, "reg": 0.1, "seconds": seconds, "peak_rss_growth_mib": (after - before) / 1024,
               "iterations": rep.sinkhorn_iterations, "error": rep.sinkhorn_error,
               "converged": rep.sinkhorn_converged})


def sinkhorn_default_case(k: int, n: int, threads: int) -> dict:
    """fedwb-sinkhorn at its defaults (reg 0.1, 1000 iterations) in a fresh process: time and peak memory."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_sinkhorn_default_child, args=(k, n, threads, child))
    p.start()
    out = parent.recv()
    p.join()
    progress(f"  sinkhorn default K={k} n={n}: {out['seconds']:.1f}s, +{out['peak_rss_growth_mib']:.0f} MiB")
    return out


MLP_SHAPES = {"fc1.weight": (200, 784), "fc1.bias": (200,), "fc2.weight": (200, 200), "fc2.bias": (200,),
              "fc3.weight": (10, 200), "fc3.bias": (10,)}  # the MNIST MLP 784-200-200-10


def _mlp_models(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=g, dtype=torch.float64) * 0.05 for name, shape in MLP_SHAPES.items()}
    return [{name: t + 0.01 * torch.randn(t.shape, generator=g, dtype=torch.float64) for name, t in base.items()}
            for _ in range(k)]  # float64, so the two solvers' agreement is not hidden by a float32 rounding


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].double() - b[n].double().to(a[n].device)).abs().max() / b[n].double().abs().max())
               for n in a)


def entropic(ks: list[int], iters: int, big_n: int, device: str, log_solver: bool, repeats: int = 3) -> dict:
    """The paper's fusion (reg 0.1, ``iters`` iterations, no early stop) on the MNIST MLP's shapes.

    Rows: the plain-domain solver (compiled on CPU, torch on CUDA; median of ``repeats`` runs after
    one untimed) against today's log-domain one in the same run (one run: it takes 10-30 s), with
    their largest relative difference; and K = 10 x one tensor of ``big_n`` weights with the plain
    solver (one run).
    """
    opts = {"reg": 0.1, "stop_threshold": 0.0, "max_iter": iters, "warn": False}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for k in ks:
        models = _mlp_models(k)
        row: dict = {"K": k, "params": sum(int(np.prod(s)) for s in MLP_SHAPES.values()), "iterations": iters}
        fast, rep = fuse_with_report(models, [1.0] * k, "fedwb-sinkhorn", solver="plain", **opts)
        row["plain_cpu_s"] = median_seconds(lambda models=models, k=k: fuse_with_report(
            models, [1.0] * k, "fedwb-sinkhorn", solver="plain", **opts), repeats, warmup=0)
        row["plain_log_domain_handover"] = rep.as_dict().get("sinkhorn_log_domain")
        w = [1.0 + 0.1 * i for i in range(k)]  # distinct weights: one log per row and point
        row["plain_cpu_unequal_weights_s"] = median_seconds(lambda models=models, w=w: fuse_with_report(
            models, w, "fedwb-sinkhorn", solver="plain", **opts), repeats, warmup=0)
        if log_solver:
            t0 = time.perf_counter()
            slow, _ = fuse_with_report(models, [1.0] * k, "fedwb-sinkhorn", solver="log", **opts)
            row["log_domain_s"] = time.perf_counter() - t0
            row["speedup_vs_log_domain"] = row["log_domain_s"] / row["plain_cpu_s"]
            row["max_rel_diff_vs_log_domain"] = _rel(fast, slow)
        if device == "cuda":
            on_gpu = [{n: t.to("cuda") for n, t in m.items()} for m in models]
            fuse_with_report(on_gpu, [1.0] * k, "fedwb-sinkhorn", **{**opts, "max_iter": 5})  # warm-up
            sync()
            for n_it, key, reps in ((iters, "cuda_s", 3), (10 * iters, "cuda_10x_iterations_s", 1)):
                secs = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    gpu, grep = fuse_with_report(on_gpu, [1.0] * k, "fedwb-sinkhorn", **{**opts, "max_iter": n_it})
                    sync()
                    secs.append(time.perf_counter() - t0)
                row[key] = statistics.median(secs)
                if n_it == iters:
                    row["cuda_solver"] = grep.sinkhorn_solver
                    row["cuda_max_rel_diff_vs_cpu"] = _rel(gpu, fast)
                else:
                    row["cuda_10x_log_domain_handover"] = grep.as_dict().get("sinkhorn_log_domain")
        progress(f"  entropic MLP K={k}: plain {row['plain_cpu_s']:.2f}s"
                 + (f", log-domain {row['log_domain_s']:.1f}s (x{row['speedup_vs_log_domain']:.0f})"
                    if log_solver else ""))
        rows.append(row)
    big = _models(10, big_n, 0.2, "cpu")
    t0 = time.perf_counter()
    fuse_with_report(big, [1.0] * 10, "fedwb-sinkhorn", solver="plain", **opts)
    big_row = {"K": 10, "n": big_n, "iterations": iters, "plain_cpu_s": time.perf_counter() - t0}
    progress(f"  entropic K=10 n={big_n}: plain {big_row['plain_cpu_s']:.2f}s")
    return {"mlp": rows, "one_big_tensor": big_row, "goals": {
        "mlp_K10_plain_cpu_s_max": 2.5, "speedup_vs_log_domain_min": 20, "big_K10_n1e6_s_max": 10,
        "cuda_K10_s_max": 0.1, "cuda_K10_10x_iterations_s_max": 1.0}}


def saved_round(path: str, with_log: bool, repeats: int, max_iter: int = 1000) -> dict:
    """The paper's fusion (reg 0.1, ``max_iter`` iterations, POT's threshold) on a saved round of trained updates.

    ``auto`` (the compiled plain solver, escaped tensors continued by the wide-range one) and
    ``wide`` from the start, medians; with ``with_log`` the torch log-domain solver once (slow).
    """
    data = torch.load(path, weights_only=True)
    updates, lam = data["updates"], data.get("lam") or [1.0] * len(data["updates"])
    opts = {"reg": 0.1, "max_iter": max_iter, "warn": False}
    row: dict = {"models": path, "K": len(updates), "params": sum(t.numel() for t in updates[0].values())}
    results = {}
    for solver in ("auto", "wide") + (("log",) if with_log else ()):
        secs = []
        for _ in range(repeats if solver != "log" else 1):
            t0 = time.perf_counter()
            results[solver], rep = fuse_with_report(updates, lam, "fedwb-sinkhorn", solver=solver, **opts)
            secs.append(time.perf_counter() - t0)
        d = rep.as_dict()
        row[f"{solver}_s"] = statistics.median(secs)
        row[f"{solver}_error"] = d["sinkhorn_error"]
        if solver == "auto":
            row["auto_solver"] = d["sinkhorn_solver"]
            row["auto_handover"] = d.get("sinkhorn_wide_range") or d.get("sinkhorn_log_domain")
        progress(f"  {solver}: {row[f'{solver}_s']:.2f}s, error {row[f'{solver}_error']:.4g}")
    row["wide_max_rel_diff_vs_auto"] = _rel(results["wide"], results["auto"])
    if with_log:
        row["log_max_rel_diff_vs_auto"] = _rel(results["log"], results["auto"])
        row["speedup_auto_vs_log"] = row["log_s"] / row["auto_s"]
    return row


def neurons(k: int = 10, repeats: int = 3) -> dict:
    """fedwb-neurons on K MNIST MLPs from their own random inits (the case it exists for)."""
    from edge_agent.tasks.mnist import MLP

    chain = [("net.0.weight", "net.0.bias", 1), ("net.2.weight", "net.2.bias", 1), ("net.4.weight", "net.4.bias", 1)]
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append({n: t.detach().clone() for n, t in MLP().state_dict().items()})
    row: dict = {"K": k, "params": sum(t.numel() for t in models[0].values())}
    for transport in ("exact", "entropic"):
        secs = median_seconds(lambda transport=transport: fuse_with_report(
            models, [1.0] * k, "fedwb-neurons", chain=chain, transport=transport), repeats)
        _, rep = fuse_with_report(models, [1.0] * k, "fedwb-neurons", chain=chain, transport=transport)
        row[f"{transport}_s"] = secs
        row[f"{transport}_iterations"] = rep.model_level.get("iterations")
    row["fedavg_s"] = median_seconds(lambda: fuse_with_report(models, [1.0] * k, "fedavg"), repeats)
    row["goal_s_max"] = 1.0
    progress(f"  fedwb-neurons K={k}: exact {row['exact_s']:.2f}s, entropic {row['entropic_s']:.2f}s")
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="one-line JSON on stdout")
    p.add_argument("--quick", action="store_true", help="a ~30 s subset")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch and numba CPU threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", choices=["entropic", "neurons"], help="run one section only")
    p.add_argument("--models", help="time the entropic fusion on this saved round (bench.trained_round) only")
    p.add_argument("--with-log", action="store_true", help="with --models: also the log-domain solver (slow)")
    p.add_argument("--max-iter", type=int, default=1000, help="with --models: entropic iterations")
    args = p.parse_args(argv)
    if args.models and not Path(args.models).is_file():
        p.error(f"--models {args.models}: no such file (make one with python -m bench.trained_round)")
    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    if args.quick:
        ks, ns, regs, pot_ns, spreads, repeats = [10], [10**4, 10**6], [1.0], [256, 1024], [0.19], 3
    else:
        ks, ns, regs, pot_ns = [2, 10, 50], [10**4, 10**5, 10**6], [1.0, 10.0], [256, 1024, 2048, 4096]
        spreads, repeats = [0.05, 0.19, 0.5], args.repeats
    t0 = time.perf_counter()
    progress("warming up (numba compile/cache load)")
    fuse_with_report(_models(2, 100, 0.1, "cpu"), [1, 1], "fedwb")
    sinkhorn_wide.warm_up()  # both compiled entropic solvers
    result = {"benchmark": "fusion", "machine": machine(), "device": args.device}
    if args.models:
        progress(f"entropic FedWB on the saved round {args.models}")
        result["saved_round"] = saved_round(args.models, args.with_log, args.repeats, args.max_iter)
        result["total_seconds"] = time.perf_counter() - t0
        emit(result, args.json)
        return
    progress("fedwb-neurons (barycenter over hidden units), K=10 MNIST MLPs from their own inits")
    result["neurons"] = neurons(10, 3 if not args.quick else 1)
    if args.only == "neurons":
        result["total_seconds"] = time.perf_counter() - t0
        emit(result, args.json)
        return
    progress("entropic FedWB (the paper's fusion), plain vs log domain")
    result["entropic"] = entropic([5, 10], 100 if args.quick else 1000, 10**5 if args.quick else 10**6,
                                  args.device, log_solver=True)
    if args.only == "entropic":
        result["total_seconds"] = time.perf_counter() - t0
        emit(result, args.json)
        return
    progress("speed")
    result["speed"] = speed(ks, ns, regs, repeats, args.device)
    # The acceptance case: K = 10 models of one 1000x1000 float32 tensor.
    models = [{"w": torch.randn(1000, 1000).to(args.device)} for _ in range(10)]
    lam = [0.1] * 10
    ws = median_seconds(lambda: weighted_sum_baseline(models, lam), 9)
    naive = median_seconds(lambda: sum(w * m["w"] for w, m in zip(lam, models, strict=True)), 9)
    fw = median_seconds(lambda: fuse_with_report(models, [1.0] * 10, "fedwb"), repeats)
    result["fedwb_1000x1000_K10"] = {"weighted_sum_inplace_s": ws, "weighted_sum_naive_s": naive,
                                     "fedwb_s": fw, "ratio_inplace": fw / ws, "ratio_naive": fw / naive}
    progress("fedwb-sinkhorn at its defaults, K=10, n=1e5")
    result["sinkhorn_default_K10_n1e5"] = sinkhorn_default_case(10, 100_000, args.threads)
    progress("POT dense")
    result["pot_dense"] = pot_dense(pot_ns, 5, 1.0)
    progress("fidelity")
    result["fidelity"] = fidelity(spreads)
    result["total_seconds"] = time.perf_counter() - t0
    emit(result, args.json)


if __name__ == "__main__":
    main()
