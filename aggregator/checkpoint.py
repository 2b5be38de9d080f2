"""Durable state: the global model (safetensors), the state (JSON), the inbox of accepted updates.

Every write is atomic (temporary file, fsync, rename). Layout of ``state_dir``::

    model-<version>.safetensors   the global model of that version (the latest two are kept)
    state.json                    version, policy, counters, history, ids of fused updates
    inbox/<update_id>.msgpack     accepted updates not yet fused (the raw wire payload)
    inbox/<update_id>.manifest    a chunked update (schemas.chunks): its manifest, and
    inbox/<update_id>.data        its data section, moved here from spool/ when complete
    spool/                        chunked updates still arriving
    partial.msgpack               a site aggregator's partial aggregate the center has not fused yet

An update is acknowledged to the broker only once it is in the inbox, so a ``kill -9``
at any moment loses nothing: either the broker redelivers it, or the inbox has it.
Inbox files are renamed into place but not fsynced by default (a process crash keeps the
page cache; ``fsync_inbox=True`` also survives power loss, at a cost in ingest rate).
Checkpoints are always fsynced.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE = "state.json"
INBOX = "inbox"
SPOOL = "spool"
PARTIAL = "partial.msgpack"  # a site's partial aggregate not yet in a central global model
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Checkpoint:
    """Reads and writes the aggregator's durable state in ``state_dir``."""

    def __init__(self, state_dir: str | Path, fsync_inbox: bool = False) -> None:
        self.fsync_inbox = fsync_inbox
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / INBOX).mkdir(exist_ok=True)
            probe = self.dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"--state-dir {state_dir}: {exc.strerror or exc}") from None

    def model_path(self, version: int) -> Path:
        return self.dir / f"model-{version}.safetensors"

    def save(self, version: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Write the model, then the state that points to it (the state is the commit)."""
        path = self.model_path(version)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _atomic_write(self.dir / STATE, json.dumps({**state, "version": version,
                                                    "model": path.name}, indent=1).encode())
        for old in self.dir.glob("model-*.safetensors"):
            try:
                if int(old.stem.split("-", 1)[1]) < version - 1:
                    old.unlink()
            except (ValueError, OSError):
                continue

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(version, weights, state)`` of the last commit, or None for a fresh directory."""
        path = self.dir / STATE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
            model, version = self.dir / str(state["model"]), int(state["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable fedwb state ({type(exc).__name__}: {exc}); restore it "
                             "or start over in an empty --state-dir") from None
        try:
            weights = load_file(str(model))
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"{model}, the model of version {version} that {path.name} names, cannot be read "
                             f"({exc}); restore it or start over in an empty --state-dir") from None
        return version, weights, state

    def put_partial(self, payload: bytes) -> None:
        """A site aggregator's partial aggregate, kept until the center's next global model arrives."""
        _atomic_write(self.dir / PARTIAL, payload)

    def get_partial(self) -> bytes | None:
        path = self.dir / PARTIAL
        return path.read_bytes() if path.exists() else None

    def drop_partial(self) -> None:
        (self.dir / PARTIAL).unlink(missing_ok=True)

    def inbox_put(self, update_id: str, payload: bytes) -> None:
        if not _SAFE_ID.match(update_id):
            raise ValueError(f"unsafe update id {update_id!r}")
        _atomic_write(self.dir / INBOX / f"{update_id}.msgpack", payload, fsync=self.fsync_inbox)

    def inbox_put_chunked(self, update_id: str, manifest: bytes, data: Path) -> Path:
        """A complete chunked update: its data file moves into the inbox, then its manifest is
        written (the manifest is what makes the entry count). Returns the data file's new path."""
        if not _SAFE_ID.match(update_id):
            raise ValueError(f"unsafe update id {update_id!r}")
        target = self.dir / INBOX / f"{update_id}.data"
        os.replace(data, target)
        if self.fsync_inbox:
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
        _atomic_write(self.dir / INBOX / f"{update_id}.manifest", manifest, fsync=self.fsync_inbox)
        return target

    @property
    def spool(self) -> Path:
        """Where chunked updates are reassembled (same file system as the inbox: moves are renames)."""
        path = self.dir / SPOOL
        path.mkdir(exist_ok=True)
        return path

    def inbox_drop(self, update_ids: list[str]) -> None:
        for uid in update_ids:
            if _SAFE_ID.match(uid):
                for suffix in (".msgpack", ".manifest", ".data"):
                    (self.dir / INBOX / f"{uid}{suffix}").unlink(missing_ok=True)

    def inbox(self) -> list[tuple[str, bytes | tuple[bytes, Path]]]:
        """The accepted, unfused updates, oldest first: ``(id, payload)``, or ``(id, (manifest,
        data file))`` for a chunked one (all payloads in memory: see ``inbox_entries`` to read one at a time)."""
        return list(self.inbox_entries())

    def inbox_entries(self) -> Iterator[tuple[str, bytes | tuple[bytes, Path]]]:
        """``inbox``, each payload read from disk only when its entry is reached, so a restart with a
        long backlog holds one stored payload at a time, not all of them at once."""
        files = [p for p in (self.dir / INBOX).iterdir() if p.suffix in (".msgpack", ".manifest")]
        entries = sorted((p for p in files if p.suffix == ".msgpack" or p.with_suffix(".data").exists()),
                         key=lambda p: p.stat().st_mtime)
        keep = {p.stem for p in entries}
        for p in (self.dir / INBOX).glob("*.data"):
            if p.stem not in keep:
                p.unlink(missing_ok=True)  # a crash between the move and the manifest: never confirmed
        for p in entries:
            try:
                raw = p.read_bytes()
            except FileNotFoundError:  # dropped since the listing (a replaced entry)
                continue
            yield (p.stem, raw) if p.suffix == ".msgpack" else (p.stem, (raw, p.with_suffix(".data")))

    def clear_spool(self) -> None:
        """Drop transfers that were still arriving (at start: their senders resend them)."""
        if (self.dir / SPOOL).exists():
            for p in (self.dir / SPOOL).iterdir():
                p.unlink(missing_ok=True)
