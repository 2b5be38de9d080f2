r"""The update buffer: admission rules, one update per agent, quorum and staleness weights.

Pure logic, no I/O. For the current global version :math:`v` an update with base
version :math:`v_k` has staleness :math:`\tau_k = v - v_k`; updates with
:math:`\tau_k > \text{max\_staleness}` are dropped, the rest are fused with weight

.. math::
    \lambda_k \propto n_k (1 + \tau_k)^{-\alpha}

(``num_samples`` :math:`n_k`, ``staleness_alpha`` :math:`\alpha`; FedAsync-style), where
:math:`n_k` is first capped at ``max_num_samples`` (or the agent's own cap from the agents
file). Order and freshness are the server's: a newer arrival replaces the buffered update
of the same agent unless it starts from an older ``base_version``; a client's ``sent_at``
only counts to reject clocks more than ``max_clock_skew`` seconds ahead.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from aggregator.fusion.robust import delta_norm as update_norm
from schemas import ModelUpdate
from schemas.chunks import tensor_meta


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
    samples_capped: list[str] = field(default_factory=list)  # agents whose num_samples hit the cap


@dataclass
class UpdateBuffer:
    """Buffered updates for the next fusion, keyed by agent (newest wins)."""

    job: str
    max_staleness: int = 10
    staleness_alpha: float = 0.5
    remember: int = 100_000  # how many recent update ids are kept for duplicate detection
    rate_limit: float | None = None  # most updates per agent per minute (None: no limit)
    max_update_norm: float | None = None  # reject ||W_k - W_global|| above this (None: off)
    max_num_samples: int | None = None  # cap on any update's num_samples (None: no cap)
    agent_caps: dict[str, int | None] | None = None  # the agents file: allowed ids and their own caps
    max_clock_skew: float | None = 300.0  # reject sent_at further ahead of our clock (None: off)
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
        sender = self._sender(update, topic_agent)
        if sender is not None:
            return sender
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
        if self.max_clock_skew is not None and update.sent_at > time.time() + self.max_clock_skew:
            return Admission(Outcome.REJECTED, "clock_skew",
                             f"sent_at is {update.sent_at - time.time():.0f}s ahead of the aggregator's clock "
                             f"(tolerance {self.max_clock_skew:g}s)")
        held = self.items.get(update.agent_id)
        if held is not None and held.update.base_version > update.base_version:
            return Admission(Outcome.REJECTED, "older_than_buffered",
                             f"an update from base version {held.update.base_version} of this agent is buffered")
        return None

    def precheck(self, update: ModelUpdate, topic_agent: str | None,
                 reference: dict[str, torch.Tensor]) -> Admission | None:
        """The verdicts that need no tensor bytes and cannot change while a chunked update arrives
        (duplicate, unknown agent, job, sender, names/shapes/dtypes); ``check`` runs in full later."""
        if update.update_id in self._seen:
            return Admission(Outcome.DUPLICATE, "duplicate", f"update {update.update_id} already counted")
        sender = self._sender(update, topic_agent)
        if sender is not None:
            return sender
        mismatch = shape_mismatch(update.weights, reference)
        return Admission(Outcome.REJECTED, "shape_mismatch", mismatch) if mismatch else None

    def _sender(self, update: ModelUpdate, topic_agent: str | None) -> Admission | None:
        """Refusals about who sent it: an agent not in the agents file, another job, another agent's topic."""
        if self.agent_caps is not None and update.agent_id not in self.agent_caps:
            return Admission(Outcome.REJECTED, "unknown_agent", f"agent {update.agent_id!r} is not in the agents file")
        if update.job != self.job:
            return Admission(Outcome.REJECTED, "wrong_job", f"job {update.job!r} is not {self.job!r}")
        if topic_agent is not None and update.agent_id != topic_agent:
            return Admission(Outcome.REJECTED, "agent_mismatch",
                             f"agent_id {update.agent_id!r} published on {topic_agent!r}'s topic")
        return None

    def sample_cap(self, agent: str) -> int | None:
        """The most ``num_samples`` counted for ``agent``: its own cap, else the global one."""
        own = (self.agent_caps or {}).get(agent)
        if own is not None and self.max_num_samples is not None:
            return min(own, self.max_num_samples)
        return own if own is not None else self.max_num_samples

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
        """Empty the buffer into a ``Round`` with staleness weights at ``version``.

        The round is built first and the buffer emptied last, so a failure here loses nothing.
        """
        items = sorted(self.items.values(), key=lambda b: b.arrived)  # arrival order: newest last
        updates = [b.update for b in items]
        staleness = [max(0, version - u.base_version) for u in updates]
        counted, capped = [], []
        for u in updates:
            cap = self.sample_cap(u.agent_id)
            counted.append(u.num_samples if cap is None else min(u.num_samples, cap))
            if counted[-1] < u.num_samples:
                capped.append(u.agent_id)
        weights = [float(n) * (1.0 + t) ** -self.staleness_alpha for n, t in zip(counted, staleness, strict=True)]
        rnd = Round(updates, weights, staleness, version, capped)
        self.items = {}
        return rnd

    def restore(self, rnd: Round, now: float) -> None:
        """Put a round's updates back after a failed fusion (a newer update of an agent stays)."""
        for u in rnd.updates:
            if u.agent_id not in self.items:
                self.items[u.agent_id] = Buffered(u, now)

    def oldest_arrival(self) -> float | None:
        return min((b.arrived for b in self.items.values()), default=None)


def shape_mismatch(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str:
    """Empty when ``weights`` has exactly the reference's names, shapes and dtypes."""
    if set(weights) != set(reference):
        missing = sorted(set(reference) - set(weights))[:3]
        extra = sorted(set(weights) - set(reference))[:3]
        return f"tensor names differ from the global model (missing {missing}, extra {extra})"
    for name, ref in reference.items():
        shape, dtype = tensor_meta(weights, name)  # a chunked update's tensors are not read for this
        if shape != tuple(ref.shape) or dtype != ref.dtype:
            return (f"{name}: {dtype}{list(shape)} does not match the global model's "
                    f"{ref.dtype}{list(ref.shape)}")
    return ""
