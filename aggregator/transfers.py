"""Chunked updates on their way in: one open transfer per agent, bounded, spooled to disk.

A ``ChunkManifest`` on an agent's update topic opens a transfer (its data section is a
file in the spool directory, pre-sized); the agent's ``ModelChunk`` s fill it, each checked
against its digest; the complete transfer becomes an update whose tensors are read from
that file one at a time (``schemas.chunks.FileWeights``). Bounds: at most ``max_open``
transfers and ``max_bytes`` per transfer; a transfer with no chunk for ``timeout`` seconds
is dropped (its sender resends after its confirmation timeout). A manifest sent again for
the transfer already open (a resend after a reconnect) keeps the chunks already written:
transfers resume.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from schemas import WireError
from schemas.chunks import ChunkManifest, FileStore, Reassembly

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass
class Open:
    """One transfer in flight."""

    manifest: ChunkManifest
    payload: bytes  # the manifest as received: what the inbox keeps beside the data
    reassembly: Reassembly
    path: Path
    last_seen: float = field(default_factory=time.monotonic)


class Transfers:
    """The open chunked transfers of an aggregator, by agent."""

    def __init__(self, spool: Path, max_open: int, timeout: float, max_bytes: int | None = None) -> None:
        self.spool, self.max_open, self.timeout = spool, max_open, timeout
        self.max_bytes = max_bytes  # the open transfers' sizes together (disk), None: no bound
        self.open: dict[str, Open] = {}
        self.orphan_chunks = 0  # chunks of no open transfer (a rejected, finished or expired one): dropped

    def start(self, agent: str, manifest: ChunkManifest, payload: bytes) -> str:
        """Open (or resume) ``agent``'s transfer; returns ``opened`` or ``resumed``.

        ``WireError`` when the transfer id is not a safe file name or too many are open.
        A different transfer from the same agent replaces the one in flight.
        """
        if not _SAFE.match(manifest.transfer_id):
            raise WireError(f"transfer id {manifest.transfer_id[:40]!r} is not a safe name")
        held = self.open.get(agent)
        if held is not None and held.manifest == manifest:
            held.last_seen = time.monotonic()
            return "resumed"
        if held is not None:
            self.drop(agent)
        if len(self.open) >= self.max_open:
            raise WireError(f"{len(self.open)} chunked transfers are open, the limit is {self.max_open} (too_many)")
        spooled = sum(o.manifest.total_bytes for o in self.open.values())
        if self.max_bytes is not None and spooled + manifest.total_bytes > self.max_bytes:
            raise WireError(f"open chunked transfers hold {spooled:,} bytes; {manifest.total_bytes:,} more would pass "
                            f"the spool limit of {self.max_bytes:,} (too_many)")
        path = self.spool / f"{manifest.transfer_id}.data"
        self.open[agent] = Open(manifest, payload, Reassembly(manifest, FileStore(path, manifest.total_bytes)), path)
        return "opened"

    def get(self, agent: str, transfer_id: str) -> Open | None:
        held = self.open.get(agent)
        if held is None or held.manifest.transfer_id != transfer_id:
            self.orphan_chunks += 1
            return None
        held.last_seen = time.monotonic()
        return held

    def finish(self, agent: str) -> Open:
        """Hand over a complete transfer (its file now belongs to the caller)."""
        return self.open.pop(agent)

    def drop(self, agent: str) -> None:
        held = self.open.pop(agent, None)
        if held is not None:
            held.reassembly.discard()

    def expire(self, now: float | None = None) -> list[str]:
        """Drop transfers idle for longer than ``timeout``; returns their agents."""
        now = time.monotonic() if now is None else now
        stale = [a for a, o in self.open.items() if now - o.last_seen > self.timeout]
        for agent in stale:
            self.drop(agent)
        return stale

    def close(self) -> None:
        for agent in list(self.open):
            self.drop(agent)
