"""CPU seconds of process trees and loopback bytes, sampled in a background thread.

A system under test is a set of root processes (broker, aggregator, agents; or
SuperLink and SuperNodes). Every ``period`` seconds the sampler records

    cpu(t)   = sum over each root and its live descendants of
               user + system + children_user + children_system
    bytes(t) = bytes received on the loopback interface (``/proc/net/dev``, ``lo``)

``children_*`` hold the CPU of descendants that already exited and were reaped (such
as Flower's per-round ClientApp processes), so ``cpu(t)`` stays continuous when they
exit; a cumulative maximum hides the short dip when one exits before it is reaped.
``cpu_between(a, b)`` interpolates linearly between samples, so its error is at most
one period's worth of CPU at each end. Loopback bytes count everything on ``lo``
(every hop, protocol overhead included) and so assume a quiet machine.

The sampler must not be a load itself: walking each root's descendants scans all of
``/proc``, so the trees are rescanned once per ``rescan`` seconds (one scan for all roots) and
each sample reads only the cached processes' times. A descendant born between scans is
counted from the next scan on, or through its parent's ``children_*`` once it is reaped.
(Walking every tree at every 0.1 s sample cost 7 % of a 2-core machine in bench.vs_flower's
fedwb phase: 12 roots x ~110 processes of ``/proc`` ten times a second.)
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import psutil


def loopback_bytes() -> int | None:
    """Bytes received so far on ``lo`` (equal to bytes sent on a loopback), or None if unknown."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cpu(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` and of their reaped children (gone ones count 0)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def trees(roots: list[int]) -> dict[int, list[psutil.Process]]:
    """Each live root pid -> [root, *its live descendants], from one scan of the process table."""
    kids: dict[int, list[psutil.Process]] = {}
    for p in psutil.process_iter(["ppid"]):
        kids.setdefault(p.info["ppid"], []).append(p)
    out: dict[int, list[psutil.Process]] = {}
    for pid in roots:
        try:
            tree = [psutil.Process(pid)]
        except psutil.Error:
            continue
        for p in tree:  # grows while walked: breadth-first over the snapshot
            tree.extend(q for q in kids.get(p.pid, []) if q.pid != pid)
        out[pid] = tree
    return out


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes, their live descendants and reaped children."""
    return sum(_cpu(tree) for tree in trees(pids).values())


class Sampler:
    """Sample ``tree_cpu_seconds`` of the watched roots and ``loopback_bytes`` every ``period`` s."""

    def __init__(self, period: float = 0.1, rescan: float = 1.0) -> None:
        self.period = period
        self.rescan = rescan
        self.roles: dict[int, str] = {}  # watched root pid -> role
        self._trees: dict[int, list[psutil.Process]] = {}  # root pid -> its processes at the last scan
        self._scanned = -float("inf")  # monotonic time of the last scan
        self.times: list[float] = []
        self.cpu_by_role: dict[str, list[float]] = {}  # cumulative CPU seconds per role, one value per time
        self.net: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def watch(self, pid: int, role: str = "other") -> None:
        """Sample ``pid`` and its descendants from now on, accounted under ``role``."""
        self.roles[pid] = role
        self._scanned = -float("inf")  # a new root: scan at the next sample

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.period):
                self.sample()
                return

    def sample(self) -> None:
        """Record one sample now."""
        roles = dict(self.roles)  # watch() runs in another thread
        if time.monotonic() - self._scanned >= self.rescan:
            self._scanned = time.monotonic()
            self._trees = trees(list(roles))
        per_role: dict[str, float] = {}
        for pid, role in roles.items():
            per_role[role] = per_role.get(role, 0.0) + _cpu(self._trees.get(pid, []))
        net = loopback_bytes()
        self.times.append(time.time())
        for role, cpu in per_role.items():
            series = self.cpu_by_role.setdefault(role, [0.0] * (len(self.times) - 1))
            series.append(max(cpu, series[-1]) if series else cpu)
        self.net.append(float(net) if net is not None else float("nan"))

    def cpu_between_by_role(self, a: float, b: float) -> dict[str, float]:
        """CPU seconds each role's trees used between wall-clock times ``a`` and ``b``."""
        return {role: float(np.interp(b, self.times, series) - np.interp(a, self.times, series))
                for role, series in self.cpu_by_role.items()}

    def cpu_between(self, a: float, b: float) -> float:
        """CPU seconds all watched trees used between ``a`` and ``b``."""
        return sum(self.cpu_between_by_role(a, b).values())

    def bytes_between(self, a: float, b: float) -> float | None:
        """Loopback bytes between ``a`` and ``b`` (None when ``/proc/net/dev`` is unavailable)."""
        if not self.net or np.isnan(self.net[0]):
            return None
        return float(np.interp(b, self.times, self.net) - np.interp(a, self.times, self.net))
