r"""The update buffer: admission rules, one update per agent, quorum and staleness weights.

Pure logic, no I/O. For the current global version :math:`v` an update with base
version :math:`v_k` has staleness :math:`\tau_k = v - v_k`; updates with
:math:`\tau_k > \text{max\_staleness}` are dropped, the rest are fused with weight

.. math::
    \lambda_k \propto n_k (1 + \tau_k)^{-\alpha}

(``num_samples`` :math:`n_k`, ``staleness_alpha`` :math:`\alpha`; FedAsync-style).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from schemas import ModelUpdate


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REPLACED = "replaced"  # accepted, and it replaced an older update of the same agent
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Admission:
    """What happened to one update, and why (``reason`` is a counter key when rejected)."""

    outcome: Outcome
    reason: str = ""
    detail: str = ""
    replaced_id: str | None = None

    @property
    def kept(self) -> bool:
        return self.outcome in (Outcome.ACCEPTED, Outcome.REPLACED)


@dataclass
class Buffered:
    update: ModelUpdate
    arrived: float


@dataclass
class Round:
    """The updates taken out of the buffer for one fusion, with their weights."""

    updates: list[ModelUpdate]
    weights: list[float]
    staleness: list[int]
    version: int


@dataclass
class UpdateBuffer:
    """Buffered updates for the next fusion, keyed by agent (newest wins)."""

    job: str
    max_staleness: int = 10
    staleness_alpha: float = 0.5
    remember: int = 100_000  # how many recent update ids are kept for duplicate detection
    rate_limit: float | None = None  # most updates per agent per minute (None: no limit)
    max_update_norm: float | None = None  # reject ||W_k - W_global|| above this (None: off)
    items: dict[str, Buffered] = field(default_factory=dict)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _recent: dict[str, deque] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def mark_seen(self, update_id: str) -> None:
        """Remember ``update_id`` (also for updates fused before a restart)."""
        self._seen[update_id] = None
        self._seen.move_to_end(update_id)
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)

    def seen_ids(self) -> list[str]:
        return list(self._seen)

    def readmit(self, update: ModelUpdate, version: int, reference: dict[str, torch.Tensor],
                now: float) -> Admission:
        """Admit an update again that was buffered but never fused (restart, failed fusion)."""
        self._seen.pop(update.update_id, None)
        return self.admit(update, update.agent_id, version, reference, now)

    def admit(self, update: ModelUpdate, topic_agent: str | None, version: int,
              reference: dict[str, torch.Tensor], now: float) -> Admission:
        """Check ``update`` against the job, the current ``version`` and the global model's
        tensors (``reference``), then buffer it. Never raises on bad input."""
        verdict = self.check(update, topic_agent, version, reference)
        return verdict if verdict is not None else self.add(update, now)

    def add(self, update: ModelUpdate, now: float) -> Admission:
        """Buffer an update that ``check`` passed (newest per agent wins)."""
        old = self.items.get(update.agent_id)
        self.items[update.agent_id] = Buffered(update, now)
        self.mark_seen(update.update_id)
        if old is not None:
            return Admission(Outcome.REPLACED, replaced_id=old.update.update_id)
        return Admission(Outcome.ACCEPTED)

    def check(self, update: ModelUpdate, topic_agent: str | None, version: int,
              reference: dict[str, torch.Tensor]) -> Admission | None:
        """The reason ``update`` cannot be buffered, or None when it can."""
        if update.update_id in self._seen:
            return Admission(Outcome.DUPLICATE, "duplicate", f"update {update.update_id} already counted")
        if self.rate_limit is not None and not self._within_rate(update.agent_id):
            return Admission(Outcome.REJECTED, "rate_limited",
                             f"more than {self.rate_limit:g} updates per minute from {update.agent_id}")
        if update.job != self.job:
            return Admission(Outcome.REJECTED, "wrong_job", f"job {update.job!r} is not {self.job!r}")
        if topic_agent is not None and update.agent_id != topic_agent:
            return Admission(Outcome.REJECTED, "agent_mismatch",
                             f"agent_id {update.agent_id!r} published on {topic_agent!r}'s topic")
        if update.base_version > version:
            return Admission(Outcome.REJECTED, "from_future",
                             f"base_version {update.base_version} > current version {version}")
        tau = version - update.base_version
        if tau > self.max_staleness:
            return Admission(Outcome.STALE, "stale", f"staleness {tau} > max_staleness {self.max_staleness}")
        mismatch = shape_mismatch(update.weights, reference)
        if mismatch:
            return Admission(Outcome.REJECTED, "shape_mismatch", mismatch)
        if self.max_update_norm is not None:
            norm = update_norm(update.weights, reference)
            if norm > self.max_update_norm:
                return Admission(Outcome.REJECTED, "norm_bound",
                                 f"||update - global|| = {norm:.4g} > {self.max_update_norm:g}")
        held = self.items.get(update.agent_id)
        if held is not None and (held.update.base_version, held.update.sent_at) > (
                update.base_version, update.sent_at):
            return Admission(Outcome.REJECTED, "older_than_buffered",
                             "an update from a newer base version of this agent is buffered")
        return None

    def _within_rate(self, agent: str, now: float | None = None) -> bool:
        """Sliding one-minute window of this agent's arrivals (checked ones count too)."""
        now = time.monotonic() if now is None else now
        window = self._recent.setdefault(agent, deque())
        while window and now - window[0] > 60.0:
            window.popleft()
        if len(window) >= self.rate_limit:
            return False
        window.append(now)
        return True

    def take(self, version: int) -> Round:
        """Empty the buffer into a ``Round`` with staleness weights at ``version``."""
        items = sorted(self.items.values(), key=lambda b: b.arrived)  # arrival order: newest last
        self.items = {}
        updates = [b.update for b in items]
        staleness = [max(0, version - u.base_version) for u in updates]
        weights = [u.num_samples * (1.0 + t) ** -self.staleness_alpha
                   for u, t in zip(updates, staleness, strict=True)]
        return Round(updates, weights, staleness, version)

    def oldest_arrival(self) -> float | None:
        return min((b.arrived for b in self.items.values()), default=None)


def shape_mismatch(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str:
    """Empty when ``weights`` has exactly the reference's names, shapes and dtypes."""
    if set(weights) != set(reference):
        missing = sorted(set(reference) - set(weights))[:3]
        extra = sorted(set(weights) - set(reference))[:3]
        return f"tensor names differ from the global model (missing {missing}, extra {extra})"
    for name, ref in reference.items():
        t = weights[name]
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            return (f"{name}: {t.dtype}{list(t.shape)} does not match the global model's "
                    f"{ref.dtype}{list(ref.shape)}")
    return ""


def update_norm(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Euclidean norm of the update over all float tensors: ||W_k - W_global||."""
    total = 0.0
    for name, ref in reference.items():
        if ref.is_floating_point():
            total += float(((weights[name].double() - ref.double()) ** 2).sum())
    return math.sqrt(total)
