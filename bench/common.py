"""Helpers shared by the benchmarks: timing medians and machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return info


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print the result as JSON, or as indented JSON for humans."""
    print(json.dumps(result, indent=None if as_json else 2, default=str))


def round_records(path: Any) -> list[dict[str, Any]]:
    """The ``{"event": "round", ...}`` lines of a JSONL record file (none if it does not exist yet)."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return []
    return [r for r in (json.loads(ln) for ln in path.read_text().splitlines() if ln.strip())
            if r.get("event") == "round"]


def progress(msg: str) -> None:
    """Progress on stderr so stdout stays pure JSON."""
    print(msg, file=sys.stderr, flush=True)


def ensure_project_python(module: str, needs: tuple[str, ...] = ("torch", "aiomqtt", "numpy", "psutil")) -> None:
    """Re-run ``python -m module`` under the project's ``.venv`` when this interpreter lacks ``needs``.

    So ``python -m bench.X`` works from a checkout whatever ``python`` is; ``make setup``
    creates ``.venv`` first if it is missing. Nothing happens inside a working environment.
    """
    import importlib.util
    import subprocess
    from pathlib import Path

    if all(importlib.util.find_spec(n) is not None for n in needs):
        return
    root = Path(__file__).resolve().parents[1]
    venv_python = root / ".venv" / "bin" / "python"
    if os.environ.get("FEDWB_BENCH_REEXEC") or not (root / "Makefile").exists():
        missing = [n for n in needs if importlib.util.find_spec(n) is None]
        raise SystemExit(f"{module}: this interpreter lacks {missing}; run `make setup` and use .venv/bin/python")
    if not venv_python.exists():
        progress(f"{module}: creating the project environment first (make setup)")
        subprocess.run(["make", "-C", str(root), "setup"], check=True)
    progress(f"{module}: running under {venv_python}")
    os.environ["FEDWB_BENCH_REEXEC"] = "1"
    os.execv(str(venv_python), [str(venv_python), "-m", module, *sys.argv[1:]])
