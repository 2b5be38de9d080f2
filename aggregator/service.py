"""The aggregator service: subscribe, admit, buffer, fuse off the loop, publish, persist.

One MQTT session (clean_session off, a stable client id) so the broker queues updates
while the service is down. Updates are acknowledged only after they are in the durable
inbox (``aggregator.checkpoint``). Fusion runs in a worker thread on the chosen device;
the event loop keeps admitting updates and publishing status meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import torch

import schemas
from aggregator.buffer import Admission, Outcome, Round, UpdateBuffer, shape_mismatch
from aggregator.checkpoint import Checkpoint
from aggregator.fusion import (
    PolicyState,
    decide,
    dispersion,
    fuse_with_report,
    needs_dispersion,
    pick_solver,
    sinkhorn_wide,
)
from aggregator.fusion.fedavg import server_step
from aggregator.fusion.robust import bound_influence
from aggregator.metrics import Metrics
from aggregator.settings import AggregatorSettings
from aggregator.transfers import Transfers
from schemas import (
    AggregatorStatus,
    BrokerAddress,
    CommandAck,
    GlobalModel,
    ModelUpdate,
    PolicyCommand,
    PolicySpec,
    Topics,
    UpdateAck,
    WireError,
)
from schemas.backlog import bound_backlog
from schemas.chunks import (
    CHUNK,
    MANIFEST,
    FileWeights,
    Outgoing,
    build_message,
    envelope_message,
    model_bytes,
    peek_kind,
    travels_chunked,
    unpack_chunk,
    unpack_manifest,
)
from schemas.codec import all_finite
from schemas.connection import credentials_refused, outage, run_loop
from schemas.heap import keep_heap, return_big_buffers
from schemas.receive import fast_publish
from schemas.send import fast_send
from schemas.signing import load_private_key, sign
from schemas.topics import UPSTREAM_PREFIX
from schemas.wire import MQTT_MAX_PACKET

log = logging.getLogger("fedwb.aggregator")
HISTORY_LIMIT = 10_000
PARTIAL_RESEND = 10.0  # seconds before a site resends a partial the center has not confirmed
WARN_PER_MINUTE = 20  # rejection warnings logged per minute at most (the counters see everything)
FUSION_RETRY_S, FUSION_RETRY_MAX_S = 1.0, 60.0  # back-off after a failed fusion: first wait, longest wait
COMMAND_STATUS_S = 0.5  # under a stream of control commands, at most one acknowledging status per this many s
INLINE_DECODE_BYTES = 4 * 1024 * 1024  # smaller payloads decode on the loop (~0.6 ms at 4 MB; a thread hop costs more)


def wire_reason(exc: WireError) -> str:
    """A counter key for a codec error."""
    text = str(exc)
    for key, reason in (("outside its tensor data", "metadata_size"), ("invalid ModelUpdate", "invalid_field"),
                        ("tensors, ", "tensor_count"), ("NaN", "non_finite"),
                        ("exceeds the limit", "oversize"), ("schema version", "schema_version"),
                        ("needs", "shape_bytes"), ("(too_many)", "too_many_transfers"),
                        ("msgpack", "not_msgpack"), ("dtype", "dtype"), ("anifest", "invalid_manifest"),
                        ("transfer id", "invalid_manifest"), ("ModelChunk", "malformed_chunk")):
        if key in text:
            return reason
    return "malformed"


def too_big(what: str, version: int, size: int) -> str:
    """The one-line error for a model that one MQTT packet cannot carry and chunking is off for."""
    return (f"{what} (v{version}) is {size:,} bytes: over MQTT's limit of {MQTT_MAX_PACKET:,} bytes per packet, "
            "and chunked transfer is off (--chunk-mib 0); turn it on to send models this large")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def load_agents_file(path: str | None) -> dict[str, int | None] | None:
    """The agents file: ``{agent_id: {"max_num_samples": N | null}}`` (or a list of ids); None without one."""
    if path is None:
        return None
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"agents file {path}: {exc}") from None
    if isinstance(data, list):
        data = {str(a): {} for a in data}
    if not isinstance(data, dict):
        raise ValueError(f"agents file {path}: expected a JSON object of agent ids")
    caps: dict[str, int | None] = {}
    for agent, entry in data.items():
        cap = entry.get("max_num_samples") if isinstance(entry, dict) else None
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(f"agents file {path}: {agent}: max_num_samples must be a positive integer, got {cap!r}")
        caps[str(agent)] = cap
    return caps


@dataclass
class Counters:
    accepted: int = 0
    replaced: int = 0
    duplicate: int = 0
    stale: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    bounded: dict[str, int] = field(default_factory=dict)  # updates whose influence a default bound limited

    def count(self, adm: Admission) -> None:
        if adm.outcome == Outcome.ACCEPTED:
            self.accepted += 1
        elif adm.outcome == Outcome.REPLACED:
            self.accepted += 1
            self.replaced += 1
        elif adm.outcome == Outcome.DUPLICATE:
            self.duplicate += 1
        elif adm.outcome == Outcome.STALE:
            self.stale += 1
        else:
            self.reject(adm.reason)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class Aggregator:
    """The service. ``await Aggregator(settings).run()`` until ``stop()`` or ``max_rounds``."""

    def __init__(self, settings: AggregatorSettings, *, logger: logging.Logger | None = None) -> None:
        self.s = settings
        self.log = logger or log
        self.topics = Topics(settings.job, settings.prefix)
        self.up_topics = Topics(settings.job, UPSTREAM_PREFIX) if settings.upstream else None
        self._awaiting_central = False  # a site aggregator sent its partial and waits for the center's global
        self._partial: tuple[str, bytes, float] | None = None  # (update id, payload, sent at) until confirmed
        self.address = BrokerAddress.parse(settings.broker, username=settings.username,
                                           password=settings.password, tls_ca=settings.tls_ca,
                                           tls_cert=settings.tls_cert, tls_key=settings.tls_key)
        self.address.client_kwargs()  # TLS files that do not load fail here, not in the reconnect loop
        self.device = resolve_device(settings.device)
        self.checkpoint = Checkpoint(settings.state_dir, settings.fsync_inbox) if settings.state_dir else None
        self.buffer = UpdateBuffer(settings.job, settings.max_staleness, settings.staleness_alpha,
                                   rate_limit=settings.rate_limit, max_update_norm=settings.max_update_norm,
                                   max_num_samples=settings.max_num_samples,
                                   agent_caps=load_agents_file(settings.agents_file),
                                   max_clock_skew=settings.max_clock_skew)
        self.counters = Counters()
        self.metrics = Metrics(settings.metrics_port)
        self.metrics.watch_backlog(self.backlog_stats)
        self.version = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.policy: PolicySpec = settings.policy
        self.policy_state = PolicyState()
        self._warming: asyncio.Task | None = None  # the entropic kernels compiling at start (see _warm_up)
        self.pending: PolicyCommand | None = None
        self.last_command: CommandAck | None = None
        self.applied_command: str | None = None
        self.last_choice: tuple[str, str] | None = None
        self.last_fusion_seconds: float | None = None
        self.last_quorum_wait: float | None = None
        self.last_quorum_at: float | None = None  # wall clock when the last fused round's quorum completed
        self.history: list[dict[str, Any]] = []
        self.round_started = time.monotonic()
        self.published_version = -1
        self._stopping = asyncio.Event()
        self._fusing: asyncio.Task | None = None
        self._retry_at, self._retry_in = 0.0, 0.0  # a failed fusion's back-off (monotonic time, seconds)
        self._command_status_at = -COMMAND_STATUS_S  # when a command's status was last published (monotonic)
        self._status_due = False  # a command's status was held back: the ticker publishes it
        self.fusion_failures = 0
        self.last_fusion_error: str | None = None
        self._client: aiomqtt.Client | None = None
        self._backlog: Any = None  # the incoming queue of the current connection (schemas.backlog)
        self._backlog_past = {"pauses": 0, "stalls": 0}  # of the connections before it
        self._warned: set[tuple[str, str]] = set()
        self._warn_window: list = [time.monotonic(), 0, 0]  # window start, warnings, suppressed
        self._acks: dict[str, UpdateAck] = {}
        self._ack_ready = asyncio.Event()
        self._chain: list | None = None
        self._clip_reference: float | None = None  # the last round's median delta norm
        self._prepared = False
        self._connected = False  # a session came up since the last connection error
        self._ever_connected = False
        self.fatal: str | None = None  # why the service gave up (its first connection was refused)
        self.reconnects = 0  # sessions lost (a kick by another client with our id would count here)
        self._signing_key = load_private_key(settings.signing_key) if settings.signing_key else None
        self._publish_lock = asyncio.Lock()
        self._spool_tmp: str | None = None  # the spool directory when there is no state dir
        self.transfers: Transfers | None = None  # opened with the first chunked update

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {
            "job": self.s.job, "policy": self.policy.model_dump(),
            "policy_state": {"fusions": self.policy_state.fusions, "switched": self.policy_state.switched},
            "applied_command": self.applied_command,
            "counters": asdict(self.counters),
            "history": self.history[-HISTORY_LIMIT:],
            "seen_ids": self.buffer.seen_ids()[-20_000:], "clip_reference": self._clip_reference,
            "buffered_ids": [b.update.update_id for b in self.buffer.items.values()],  # counted as accepted
        }

    def _restore(self) -> None:
        loaded = self.checkpoint.load() if self.checkpoint else None
        if loaded is None:
            self.weights = self._initial_weights()
            self.version = 0
            if self.checkpoint:
                self.checkpoint.save(0, self.weights, self._state())
            self.log.info("job %s: initialized version 0 (%d tensors, %d parameters)", self.s.job,
                          len(self.weights), sum(t.numel() for t in self.weights.values()))
            return
        self.version, self.weights, st = loaded
        if st.get("job") not in (None, self.s.job):
            raise ValueError(f"state dir belongs to job {st.get('job')!r}, not {self.s.job!r}")
        self.policy = PolicySpec.model_validate(st.get("policy", {}))
        ps = st.get("policy_state", {})
        self.policy_state = PolicyState(ps.get("fusions", 0), ps.get("switched", False))
        self.applied_command = st.get("applied_command")
        c = st.get("counters", {})
        self.counters = Counters(**{**c, "rejected": dict(c.get("rejected", {})),
                                    "bounded": dict(c.get("bounded", {}))})
        self._clip_reference = st.get("clip_reference")
        payload = self.checkpoint.get_partial() if self.up_topics is not None else None
        if payload is not None and st.get("partial_id"):  # sent (or about to be) before the restart: resend it
            self._partial, self._awaiting_central = (st["partial_id"], payload, 0.0), True
        self.history = list(st.get("history", []))
        for uid in st.get("seen_ids", []):
            self.buffer.mark_seen(uid)
        fused = {uid for h in self.history[-50:] for uid in h.get("update_ids", [])}
        counted = set(st.get("buffered_ids", []))
        restored = 0
        self.checkpoint.clear_spool()  # transfers still arriving at the crash: their senders resend them
        for uid, payload in self.checkpoint.inbox_entries():  # one stored payload in memory at a time
            if uid in fused:
                self.checkpoint.inbox_drop([uid])
                continue
            try:
                upd = self._stored_update(payload)
            except (WireError, OSError):
                self.checkpoint.inbox_drop([uid])
                continue
            adm = self.buffer.readmit(upd, self.version, self.weights, time.monotonic())
            restored += adm.outcome == Outcome.ACCEPTED  # a replacement keeps the agent's count
            if adm.kept and uid not in counted:  # accepted after the last checkpoint: count it now (crash-safe)
                self.counters.accepted += 1
            drop = [adm.replaced_id] if adm.replaced_id else [] if adm.kept else [uid]
            self.checkpoint.inbox_drop(drop)  # a replaced or no longer admissible update never comes back
        self.log.info("job %s: resumed at version %d (policy %s), %d buffered updates restored",
                      self.s.job, self.version, self.policy.describe(), restored)

    def _stored_update(self, payload: bytes | tuple[bytes, Path]) -> ModelUpdate:
        """An inbox entry as an update: a one-packet payload, or a chunked one's manifest and data file."""
        if isinstance(payload, bytes):
            return schemas.unpack(payload, ModelUpdate, max_bytes=self.s.max_payload_bytes)
        manifest = unpack_manifest(payload[0], max_bytes=self.s.max_model_bytes)
        if payload[1].stat().st_size != manifest.total_bytes:
            raise WireError(f"{payload[1]}: not the size its manifest says")
        return build_message(ModelUpdate, manifest, FileWeights(payload[1], manifest))

    def _initial_weights(self) -> dict[str, torch.Tensor]:
        """Version 0, from ``--init`` or the task; an unreadable file, no tensors or a non-finite value is the
        operator's error (a NaN in version 0 would reach every agent and every fusion)."""
        if self.s.init:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            source = f"--init {self.s.init}"
            try:
                weights = load_file(self.s.init)
            except (OSError, SafetensorError) as exc:
                raise ValueError(f"{source}: not a readable safetensors file ({exc})") from None
        else:
            task = self._task()
            self._chain = task.layer_chain() or []  # kept: building a task again (MNIST loads its data) is slow
            source, weights = f"task {self.s.task!r}", task.initial_weights()
        if not weights:
            raise ValueError(f"{source}: the model has no tensors")
        bad = [name for name, t in weights.items() if t.is_floating_point() and not all_finite(t.cpu())]
        if bad:
            raise ValueError(f"{source}: NaN or infinite values in {', '.join(bad[:5])}"
                             + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""))
        return weights

    def _task(self):  # noqa: ANN202 - a Task, imported lazily
        from edge_agent.tasks import get_task

        return get_task(self.s.task, seed=self.s.seed, **self.s.task_options)

    def _layer_chain(self) -> list | None:
        """The task's layer chain (for fedwb-neurons); None with --init only or a task without one."""
        if self._chain is None and self.s.task and not self.s.init:
            self._chain = self._task().layer_chain() or []
        return self._chain or None

    # ------------------------------------------------------------------ status
    def status(self, state: str = "running") -> AggregatorStatus:
        return AggregatorStatus(
            job=self.s.job, state="fusing" if self._fusing and state == "running" else state,
            version=self.version, policy=self.policy,
            pending_policy=self.pending.policy if self.pending else None,
            last_choice=self.last_choice[0] if self.last_choice else None,
            last_choice_reason=self.last_choice[1] if self.last_choice else None,
            buffer_fill=len(self.buffer), quorum=self.s.quorum, accepted=self.counters.accepted,
            rejected=dict(self.counters.rejected), stale=self.counters.stale,
            duplicate=self.counters.duplicate, replaced=self.counters.replaced, bounded=dict(self.counters.bounded),
            last_fusion_seconds=self.last_fusion_seconds,
            last_quorum_wait_seconds=self.last_quorum_wait, last_quorum_at=self.last_quorum_at,
            last_command=self.last_command, fusion_failures=self.fusion_failures,
            last_fusion_error=self.last_fusion_error)

    async def _publish_status(self, state: str = "running") -> None:
        if self._client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.publish(self.topics.aggregator_status, schemas.pack(self.status(state)),
                                       qos=1, retain=True)

    async def _publish_global(self) -> None:
        async with self._publish_lock:  # one version's chunks never interleave with the next one's
            await self._publish_global_locked()

    async def _publish_global_locked(self) -> None:
        if self._client is None or self.published_version >= self.version:
            return
        version = self.version
        last = self.history[-1] if self.history and self.history[-1]["version"] == version else {}
        msg = GlobalModel(job=self.s.job, version=version, policy=last.get("policy", "init"),
                          method=last.get("method", "init"), weights=self.weights,
                          contributors=last.get("contributors", []),
                          info={k: v for k, v in last.items() if k not in ("update_ids",)})
        if self._signing_key is not None:
            msg = await asyncio.to_thread(sign, msg, self._signing_key)
        size = model_bytes(self.weights)
        if travels_chunked(size, self.s.chunk_bytes, self.s.chunk_above):
            await self._publish_chunked(msg)
        else:
            if size > MQTT_MAX_PACKET:
                raise ValueError(too_big("global model", version, size))
            payload = await asyncio.to_thread(schemas.pack, msg)
            await self._client.publish(self.topics.global_model, payload, qos=1, retain=True)
        self.published_version = version

    async def _publish_chunked(self, msg: GlobalModel) -> None:
        """The manifest (retained, on the global topic) first, then each chunk retained on its own
        topic: a subscriber that joins at any moment gets the newest manifest and, from the retained
        chunks, every piece of it (older versions' chunks fail the manifest's digests and are ignored)."""
        out = await asyncio.to_thread(Outgoing, msg, f"global-v{msg.version}", self.s.chunk_bytes)
        await self._client.publish(self.topics.global_model, out.manifest_payload(), qos=1, retain=True)
        chunks = out.chunk_payloads()
        for index in range(out.n_chunks):
            payload = await asyncio.to_thread(next, chunks)
            await self._client.publish(self.topics.global_chunk(index), payload, qos=1, retain=True)
        self.log.info("global v%d published in %d chunks (%s bytes)", msg.version, out.n_chunks,
                      f"{out.total:,}")

    # ------------------------------------------------------------------ messages
    async def _on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes | bytearray | memoryview) else b""
        try:
            if topic == self.topics.control:
                await self._on_control(bytes(payload))
            elif self.up_topics is not None and topic == self.up_topics.global_model:
                await self._on_central_global(bytes(payload))
            elif self.up_topics is not None and topic == self.up_topics.ack(self.s.site):
                self._on_central_ack(bytes(payload))
            else:
                await self._on_update(topic, payload)  # a view of the packet (fast_publish views): no copy
        finally:
            self._ack(message)
        self._maybe_fuse()

    def _ack(self, message: aiomqtt.Message) -> None:
        if message.qos > 0 and self._client is not None:
            self._client._client.ack(message.mid, message.qos)

    def _warn_once(self, agent: str, reason: str, detail: str) -> None:
        """Warn once per (agent, reason), and at most ``WARN_PER_MINUTE`` times a minute in all (floods)."""
        if (agent, reason) in self._warned:
            return
        now = time.monotonic()
        if now - self._warn_window[0] > 60.0:
            if self._warn_window[2]:
                self.log.warning("%d more rejection warnings suppressed in the last minute (see the status "
                                 "counters)", self._warn_window[2])
            self._warn_window = [now, 0, 0]
        if self._warn_window[1] >= WARN_PER_MINUTE or len(self._warned) >= 10_000:
            self._warn_window[2] += 1
            return
        self._warn_window[1] += 1
        self._warned.add((agent, reason))
        self.log.warning("rejected update from %s: %s (%s)", agent, reason, detail)

    def _decode(self, payload: bytes) -> ModelUpdate:
        return schemas.unpack(payload, ModelUpdate, max_bytes=self.s.max_payload_bytes,
                              tensors=len(self.weights) or None)

    async def _on_update(self, topic: str, payload: bytes | memoryview) -> None:
        agent = self.topics.agent_of(topic) or "?"
        kind = peek_kind(payload)
        if kind == MANIFEST:
            await self._on_manifest(agent, bytes(payload))
            return
        if kind == CHUNK:
            await self._on_chunk(agent, bytes(payload))
            return
        try:  # cheap envelope checks first (size, tensor count); big payloads decode off the event loop
            if len(payload) < INLINE_DECODE_BYTES:
                update = self._decode(payload)
            else:
                update = await self._in_thread(self._decode, payload)
        except WireError as exc:
            self._reject_wire(agent, exc)
            return

        async def persist() -> None:
            if self.checkpoint is not None:
                await self._in_thread(self.checkpoint.inbox_put, update.update_id, payload)

        await self._admit(agent, update, persist)

    def backlog_stats(self) -> dict[str, float]:
        """The incoming backlog now (bytes, messages, paused) and its pauses and stalls since start."""
        q = self._backlog
        now = {"bytes": q.bytes, "messages": q.qsize(), "paused": float(q.paused)} if q is not None else {}
        return {**now, **{k: v + (getattr(q, k) if q is not None else 0) for k, v in self._backlog_past.items()}}

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a thread, for message handling that needs nothing from the MQTT reader while it runs
        (decodes, inbox writes, chunks): the backlog's bound holds through it (``Backlog.working``)."""
        with self._backlog.working() if self._backlog is not None else contextlib.nullcontext():
            return await asyncio.to_thread(fn, *args)

    def _reject_wire(self, agent: str, exc: WireError) -> None:
        self._reject(agent, wire_reason(exc), str(exc))

    def _reject(self, agent: str, reason: str, detail: str) -> None:
        """Count a payload that was not taken, under ``reason``, and warn (rate-limited)."""
        self.counters.reject(reason)
        self.metrics.update(reason)
        self._warn_once(agent, reason, detail)

    async def _admit(self, agent: str, update: ModelUpdate, persist: Any) -> Admission:
        """Check, persist (``await persist()``), buffer, count and confirm one decoded update."""
        adm = self.buffer.check(update, agent, self.version, self.weights)
        if adm is None:
            try:
                await persist()
            except OSError as exc:  # the inbox cannot take it (disk full, read-only, quota)
                return await self._unstored(agent, update.update_id, exc)
            adm = self.buffer.add(update, time.monotonic())  # checked once: a second check counts the rate twice
            if adm.replaced_id:
                self._forget([adm.replaced_id])
        self._verdict(agent, update.update_id, update.agent_id, adm)
        return adm

    async def _unstored(self, agent: str, update_id: str, exc: OSError) -> Admission:
        """An update the durable inbox could not store: counted (``storage``), logged, its partial entry
        removed, and *not* confirmed, so its agent resends it (after ``confirm_timeout`` or a reconnect)
        once there is room; taking it into memory only would confirm what a crash can lose."""
        with contextlib.suppress(OSError):
            await self._in_thread(self.checkpoint.inbox_drop, [update_id])
        self._reject(agent, "storage", f"update {update_id} not stored in {self.s.state_dir} ({exc}); not "
                                       "confirmed, its agent will resend it")
        return Admission(Outcome.REJECTED, "storage", str(exc))

    def _verdict(self, agent: str, update_id: str, claimed: str, adm: Admission) -> None:
        """Count an admission, confirm it to its publisher, warn about rejections."""
        self.counters.count(adm)
        self.metrics.update(adm.reason or adm.outcome.value)
        if agent == claimed:  # confirm to the publisher (durable by now), never to a third party
            self._queue_ack(UpdateAck(job=self.s.job, agent_id=agent, update_id=update_id,
                                      outcome=adm.outcome.value, reason=adm.reason, version=self.version))
        if adm.outcome == Outcome.REJECTED:
            self._warn_once(agent, adm.reason, adm.detail)
        elif adm.outcome == Outcome.STALE:
            self.log.info("dropped stale update from %s: %s", agent, adm.detail)

    # ------------------------------------------------------------------ chunked updates
    def _spool(self) -> Transfers:
        if self.transfers is None:
            if self.checkpoint is not None:
                spool = self.checkpoint.spool
            else:
                import tempfile

                self._spool_tmp = tempfile.mkdtemp(prefix="fedwb-spool-")
                spool = Path(self._spool_tmp)
            self.transfers = Transfers(spool, self.s.max_transfers, self.s.transfer_timeout, self.s.max_spool_bytes)
        return self.transfers

    async def _on_manifest(self, agent: str, payload: bytes) -> None:
        """Open a chunked update after the checks that need no tensor bytes (job, sender, names,
        shapes, dtypes, size, duplicate); a verdict here is confirmed at once, before any chunk."""
        transfers = self._spool()
        decode = functools.partial(unpack_manifest, payload, max_bytes=self.s.max_model_bytes,
                                   tensors=len(self.weights) or None)
        try:
            manifest = decode() if len(payload) < INLINE_DECODE_BYTES else await self._in_thread(decode)
            envelope = envelope_message(ModelUpdate, manifest)
            if manifest.transfer_id != envelope.update_id:
                raise WireError("a chunked update's transfer id must be its update id")
        except WireError as exc:
            self._reject_wire(agent, exc)
            return
        envelope.__dict__["weights"] = manifest.meta_weights()  # shapes and dtypes only
        early = self.buffer.precheck(envelope, agent, self.weights)
        if early is not None:
            self._verdict(agent, envelope.update_id, envelope.agent_id, early)
            return
        try:
            opened = await self._in_thread(transfers.start, agent, manifest, payload)
        except (WireError, OSError) as exc:
            self._reject_wire(agent, WireError(str(exc)))
            return
        self.log.info("chunked update %s from %s %s: %d chunks, %s bytes", envelope.update_id, agent, opened,
                      manifest.n_chunks(), f"{manifest.total_bytes:,}")
        if manifest.n_chunks() == 0:
            await self._complete(agent)

    async def _on_chunk(self, agent: str, payload: bytes) -> None:
        transfers = self._spool()
        try:
            transfer_id, index, data = unpack_chunk(payload)
        except WireError as exc:
            self._reject_wire(agent, exc)
            return
        held = transfers.get(agent, transfer_id)
        if held is None:
            return  # a chunk of a transfer already decided (duplicate, rejected, done) or expired: dropped
        try:
            await self._in_thread(held.reassembly.add, index, data)
        except (WireError, OSError) as exc:
            self._reject(agent, "bad_chunk", str(exc))
            return
        if held.reassembly.complete:
            await self._complete(agent)

    async def _complete(self, agent: str) -> None:
        """A transfer has all its chunks: check the tensors (one at a time), then admit the update."""
        held = self._spool().finish(agent)
        try:
            weights = await self._in_thread(held.reassembly.weights)
            update = build_message(ModelUpdate, held.manifest, weights)
        except (WireError, OSError) as exc:
            held.reassembly.discard()
            self._reject_wire(agent, exc if isinstance(exc, WireError) else WireError(str(exc)))
            return

        async def persist() -> None:
            if self.checkpoint is not None:
                path = await self._in_thread(self.checkpoint.inbox_put_chunked, update.update_id, held.payload,
                                             held.path)
                update.__dict__["weights"] = FileWeights(path, held.manifest)

        adm = await self._admit(agent, update, persist)
        if not adm.kept:
            held.reassembly.discard()

    def _forget(self, update_ids: list[str]) -> None:
        """Updates that are fused, replaced or no longer admissible: their stored copies go."""
        if self.checkpoint is not None:
            self.checkpoint.inbox_drop(update_ids)
        if self.transfers is not None:
            for uid in update_ids:
                (self.transfers.spool / f"{Path(uid).name}.data").unlink(missing_ok=True)

    def _queue_ack(self, ack: UpdateAck) -> None:
        """Acks are coalesced per agent (retained: the latest is what counts) and sent by ``_acker``."""
        self._acks[ack.agent_id] = ack
        self._ack_ready.set()

    async def _acker(self, client: aiomqtt.Client) -> None:
        """Publish queued acks without holding up the message loop."""
        while True:
            await self._ack_ready.wait()
            self._ack_ready.clear()
            await self._flush_acks(client)

    async def _flush_acks(self, client: aiomqtt.Client) -> None:
        batch, self._acks = self._acks, {}
        for agent, ack in batch.items():
            await client.publish(self.topics.ack(agent), schemas.pack(ack), qos=1, retain=True)

    async def _on_control(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained command
        try:
            cmd = schemas.unpack(payload, PolicyCommand)
        except WireError as exc:  # counted; logged once per reason and minute budget; the ticker publishes it
            self.counters.reject("bad_command")
            self.last_command = CommandAck(command_id="?", accepted=False, reason=str(exc)[:500])
            self._warn_once("control", wire_reason(exc), str(exc)[:500])
            return
        if cmd.command_id == self.applied_command:
            return  # the retained command we already applied (seen again after a restart)
        if cmd.job != self.s.job:
            self.last_command = CommandAck(command_id=cmd.command_id, accepted=False,
                                           reason=f"command for job {cmd.job!r}, this is {self.s.job!r}")
        else:
            self.pending = cmd
            self.last_command = CommandAck(command_id=cmd.command_id, accepted=True,
                                           reason=f"{cmd.policy.describe()} applies at the next fusion")
            self.log.info("policy command %s accepted: %s at the next fusion", cmd.command_id,
                          cmd.policy.describe())
        await self._command_status()

    async def _command_status(self) -> None:
        """The status that answers a command: at once, or, within ``COMMAND_STATUS_S`` of the last one,
        with the ticker's next tick (0.2 s), so a stream of commands (well-formed ones too, for another
        job or not) is not a stream of retained statuses; the latest answer is what gets published."""
        now = time.monotonic()
        if now - self._command_status_at < COMMAND_STATUS_S:
            self._status_due = True
            return
        self._command_status_at = now
        await self._publish_status()

    # ------------------------------------------------------------------ fusion
    def _ready(self) -> bool:
        n = len(self.buffer)
        if (n == 0 or self._fusing is not None or self._stopping.is_set() or self._awaiting_central
                or time.monotonic() < self._retry_at):
            return False
        if n >= self.s.quorum:
            return True
        waited = time.monotonic() - self.round_started
        return self.s.deadline is not None and waited >= self.s.deadline and n >= self.s.min_updates

    def _maybe_fuse(self) -> None:
        if self._ready():
            self._fusing = asyncio.create_task(self._fuse())

    async def _fuse(self) -> None:
        try:
            await self._fuse_round()
            self._retry_in = 0.0
            self.last_fusion_error = None
        except Exception as exc:  # noqa: BLE001 - a failed fusion must not kill the service
            # retried after a back-off (1 s, doubling to 60 s): a cause that lasts (a full disk) must not turn
            # into a loop of fusions and log lines
            self._retry_in = min(FUSION_RETRY_MAX_S, max(FUSION_RETRY_S, 2 * self._retry_in))
            self._retry_at = time.monotonic() + self._retry_in
            self.fusion_failures += 1
            self.last_fusion_error = f"{type(exc).__name__}: {exc}"[:300]
            self.log.error("fusion of v%d failed (%s: %s); the round's updates are kept, next try in %.0f s",
                           self.version + 1, type(exc).__name__, exc, self._retry_in)
            self.log.debug("fusion failure", exc_info=True)
        finally:
            self._fusing = None
        await self._publish_status()
        if self.s.max_rounds is not None and self.version >= self.s.max_rounds:
            self.stop()
            return
        self._maybe_fuse()

    async def _fuse_round(self) -> None:
        """One round. Everything that can fail runs before the commit; on failure the round's
        updates go back into the buffer (and stay in the inbox), so nothing is lost."""
        started, quorum_at = time.monotonic(), time.time()
        quorum_wait = started - self.round_started
        pending = self.pending
        policy, policy_state = (pending.policy, PolicyState()) if pending else (self.policy, self.policy_state)
        rnd = self.buffer.take(self.version)
        try:
            record, fused, choice, report, clip_ref = await self._compute_round(rnd, policy, policy_state)
            record.update(quorum_wait_seconds=round(quorum_wait, 4), quorum_at=quorum_at,
                          fusion_seconds=round(time.monotonic() - started, 4))
            new_state = policy_state.after_fusion(choice, policy)
            site = self.up_topics is not None  # a site's fusion is a partial: its own model stays the center's
            if site:
                record.update(version=self.version, partial=True)
                partial = await asyncio.to_thread(self._build_partial, rnd, fused, record)
                if self.checkpoint is not None:  # kept until the center has it, across a restart too
                    await asyncio.to_thread(self.checkpoint.put_partial, partial[1])
            if self.checkpoint is not None:
                state = self._state()
                state.update(policy=policy.model_dump(), applied_command=pending.command_id if pending
                             else self.applied_command, history=(self.history + [record])[-HISTORY_LIMIT:],
                             policy_state={"fusions": new_state.fusions, "switched": new_state.switched},
                             clip_reference=clip_ref, partial_id=record.get("partial_update_id"))
                await asyncio.to_thread(self.checkpoint.save, self.version if site else self.version + 1,
                                        self.weights if site else fused, state)
            if site:  # the fused model goes up as one update; the site's own version is not committed
                await self._send_partial(partial)
        except BaseException:
            self.buffer.restore(rnd, time.monotonic())
            raise
        if site:
            self._apply_command(pending)
            self.history.append(record)
            self.policy, self.policy_state, self._clip_reference = policy, new_state, clip_ref
            self.round_started = time.monotonic()
            self._forget(record["update_ids"])
            return
        self._commit(rnd, record, fused, choice, report, policy, new_state, pending, clip_ref)
        await self._publish_after_fusion()
        self._forget(record["update_ids"])

    async def _compute_round(self, rnd: Round, policy: PolicySpec, policy_state: PolicyState) -> tuple:
        """Bound each update's influence, pick the method, fuse (off the loop); returns the round record."""
        models, lam, bounds = await asyncio.to_thread(
            bound_influence, [u.weights for u in rnd.updates], rnd.weights, self.weights,
            share_cap=self.s.share_cap, clip_factor=self.s.clip_factor, previous=self._clip_reference)
        disp = None
        if needs_dispersion(policy, policy_state):
            disp = await asyncio.to_thread(dispersion, models, lam)
        choice = decide(policy, policy_state, disp)
        extra = {"chain": await asyncio.to_thread(self._layer_chain)} if choice.method == "fedwb-neurons" else {}
        fused, report = await asyncio.to_thread(
            fuse_with_report, models, lam, choice.method, device=self.device, warn=False, **choice.options, **extra)
        if self.s.server_lr != 1.0:
            fused = await asyncio.to_thread(server_step, self.weights, fused, self.s.server_lr)
        agents = [u.agent_id for u in rnd.updates]
        defense = {"share_cap": bounds["share_cap"], "shares_capped": [agents[i] for i in bounds["capped"]],
                   "norms_clipped": [agents[i] for i in bounds.get("clipped", [])],
                   "samples_capped": list(rnd.samples_capped)}
        if "clip_bound" in bounds:
            defense.update(clip_reference=bounds["clip_reference"], clip_bound=bounds["clip_bound"])
        record = {
            "version": self.version + 1, "policy": choice.family, "method": choice.method,
            "reason": choice.reason, "contributors": agents,
            "base_versions": [u.base_version for u in rnd.updates], "staleness": rnd.staleness,
            "weights": [round(w, 6) for w in lam], "dispersion": disp, "defense": defense,
            "server_lr": self.s.server_lr,
            "report": report.as_dict(), "created_at": time.time(), "update_ids": [u.update_id for u in rnd.updates],
            "agent_metrics": {u.agent_id: u.metrics for u in rnd.updates},
        }
        return record, fused, choice, report, bounds.get("clip_reference", self._clip_reference)

    def _build_partial(self, rnd: Round, fused: dict, record: dict) -> tuple[str, bytes]:
        """The site's fused model as one update for the center, weighted by its contributors'.

        Its ``num_samples`` is the sum of the round's weights (``n_k (1+tau_k)^-alpha``), so the
        center's FedAvg of the sites' partials equals the flat FedAvg of all updates.
        """
        size = model_bytes(fused)
        if size > MQTT_MAX_PACKET:
            raise ValueError(f"a partial aggregate of {size:,} bytes is over MQTT's limit of "
                             f"{MQTT_MAX_PACKET:,} bytes per packet; chunked transfer between a site and the "
                             "center is not supported yet")
        weight = max(1, round(math.fsum(rnd.weights)))
        partial = ModelUpdate(job=self.s.job, agent_id=self.s.site, base_version=self.version, num_samples=weight,
                              weights=fused, metrics={"contributors": float(len(rnd.updates))})
        record.update(partial_update_id=partial.update_id, partial_weight=weight)
        return partial.update_id, schemas.pack(partial)

    async def _send_partial(self, partial: tuple[str, bytes]) -> None:
        """Publish the partial; then the site waits for the center's next global model before it fuses
        again (two partials from one site for one central version would replace each other there)."""
        if self._client is None:
            raise aiomqtt.MqttError("not connected: the partial aggregate is kept for the next try")
        await self._client.publish(self.up_topics.update(self.s.site), partial[1], qos=1)
        self._awaiting_central = True
        self._partial = (partial[0], partial[1], time.monotonic())
        self.log.info("site %s: partial %s sent upstream for central v%d", self.s.site, partial[0], self.version)

    def _on_central_ack(self, payload: bytes) -> None:
        """The center confirmed the partial: stop keeping it for resends."""
        try:
            ack = schemas.unpack(payload, UpdateAck)
        except WireError:
            return
        if self._partial is not None and ack.update_id == self._partial[0]:
            self._partial = None
            if ack.outcome in ("rejected", "stale"):  # it will never be fused: fuse the next round afresh
                self.log.warning("site %s: the center did not take the partial: %s %s", self.s.site, ack.outcome,
                                 ack.reason)
                self._awaiting_central = False

    async def _resend_partial(self, force: bool = False) -> None:
        """Publish the unconfirmed partial again after a reconnect or ``PARTIAL_RESEND`` seconds (the
        center drops duplicates by id): a site broker that crashed before its bridge forwarded it loses nothing."""
        if self._partial is None or self._client is None:
            return
        uid, payload, sent = self._partial
        if force or time.monotonic() - sent > PARTIAL_RESEND:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.publish(self.up_topics.update(self.s.site), payload, qos=1)
                self._partial = (uid, payload, time.monotonic())
                self.log.info("site %s: partial %s sent again (not confirmed yet)", self.s.site, uid)

    async def _on_central_global(self, payload: bytes) -> None:
        """A site adopts the center's global model (same version number) and relays it to its agents."""
        try:
            g = schemas.unpack(payload, GlobalModel, max_bytes=self.s.max_payload_bytes)
        except WireError as exc:
            self._warn_once("upstream", wire_reason(exc), str(exc))
            return
        if g.job != self.s.job or g.version <= self.version:
            return
        mismatch = shape_mismatch(g.weights, self.weights)
        if mismatch:
            self._warn_once("upstream", "shape_mismatch", mismatch)
            return
        record = {"version": g.version, "policy": g.policy, "method": g.method, "reason": "central global",
                  "contributors": list(g.contributors), "update_ids": [], "created_at": time.time(),
                  "fusion_seconds": 0.0, "quorum_wait_seconds": 0.0, "quorum_at": time.time()}
        if self.checkpoint is not None:
            state = self._state()
            state.update(history=(self.history + [record])[-HISTORY_LIMIT:])
            await asyncio.to_thread(self.checkpoint.save, g.version, g.weights, state)
        self.weights, self.version, self._awaiting_central, self._partial = g.weights, g.version, False, None
        if self.checkpoint is not None:
            self.checkpoint.drop_partial()
        self.history.append(record)
        self.round_started = time.monotonic()
        self.log.info("site %s: central v%d adopted (%s from %s)", self.s.site, g.version, g.method,
                      ",".join(g.contributors))
        await self._publish_after_fusion()
        self._maybe_fuse()

    def _apply_command(self, pending: PolicyCommand | None) -> None:
        """The policy command this round used is applied: say so in the ack."""
        if pending is None:
            return
        self.applied_command = pending.command_id
        self.last_command = self.last_command.model_copy(update={"applied_at_version": self.version + 1}) \
            if self.last_command and self.last_command.command_id == pending.command_id \
            else CommandAck(command_id=pending.command_id, accepted=True, applied_at_version=self.version + 1)
        if self.pending is pending:
            self.pending = None

    def _commit(self, rnd: Round, record: dict, fused: dict, choice: Any, report: Any, policy: PolicySpec,
                policy_state: PolicyState, pending: PolicyCommand | None, clip_ref: float | None) -> None:
        """Make the fused round the current state (no I/O, cannot fail halfway)."""
        self._apply_command(pending)
        self.policy, self.policy_state, self._clip_reference = policy, policy_state, clip_ref
        self.weights = fused
        self.version += 1
        self.history.append(record)
        defense = record["defense"]
        for key in ("shares_capped", "norms_clipped", "samples_capped"):
            if defense[key]:
                self.counters.bounded[key] = self.counters.bounded.get(key, 0) + len(defense[key])
        self.last_choice = (choice.method, choice.reason)
        self.last_fusion_seconds = record["fusion_seconds"]
        self.last_quorum_wait = record["quorum_wait_seconds"]
        self.last_quorum_at = record["quorum_at"]
        self.round_started = time.monotonic()
        self.metrics.fused(self.version, record["fusion_seconds"])
        extra = ""
        if report.method == "fedwb-sinkhorn":
            extra = f" sinkhorn {report.sinkhorn_iterations} it, err {report.sinkhorn_error:.2g}"
        bounded = {k: v for k, v in defense.items() if k.endswith("capped") or k == "norms_clipped"}
        if any(bounded.values()):
            extra += " bounded " + ", ".join(f"{k}={v}" for k, v in bounded.items() if v)
        self.log.info("v%d %s (%s) from %d updates [%s] staleness %s, quorum wait %.2fs, fused in %.3fs%s",
                      self.version, choice.method, choice.reason, len(rnd.updates),
                      ",".join(record["contributors"]), rnd.staleness, self.last_quorum_wait,
                      self.last_fusion_seconds, extra)

    async def _publish_after_fusion(self) -> None:
        """Publish the new global model; a failure is logged in one line, the model is kept and retried."""
        try:
            await self._publish_global()
        except aiomqtt.MqttError:
            pass  # published after the reconnect (``_session`` publishes the current version)
        except (ValueError, OSError) as exc:
            self.log.error("could not publish global v%d: %s", self.version, exc)

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        """Idempotent shutdown request."""
        self._stopping.set()

    async def _ticker(self) -> None:
        last_status = 0.0
        while not self._stopping.is_set():
            self._maybe_fuse()
            await self._resend_partial()
            now = time.monotonic()
            if self.transfers is not None:
                for agent in self.transfers.expire(now):
                    self.log.warning("chunked update from %s: no chunk for %.0fs, dropped (the agent resends it)",
                                     agent, self.s.transfer_timeout)
            if now - last_status >= self.s.status_interval or (
                    self._status_due and now - self._command_status_at >= COMMAND_STATUS_S):
                last_status = now
                if self._status_due:
                    self._status_due, self._command_status_at = False, now
                await self._publish_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.2)

    async def _session(self) -> None:
        will = aiomqtt.Will(self.topics.aggregator_status,
                            schemas.pack(AggregatorStatus(job=self.s.job, state="offline")), qos=1, retain=True)
        client = aiomqtt.Client(**self.address.client_kwargs(), identifier=self.s.identifier,
                                clean_session=False, will=will, keepalive=30,
                                max_queued_outgoing_messages=None)
        client._client.manual_ack_set(True)
        fast_publish(client, views=True)  # updates are read into one buffer each and never copied after
        fast_send(client)  # a global model leaves through views of its packet, not a copy per partial write
        if self._backlog is not None:
            self._backlog_past = {k: v + getattr(self._backlog, k) for k, v in self._backlog_past.items()}
        self._backlog = bound_backlog(client)  # behind: leave the backlog in the broker, not in our memory
        async with client:
            self._client = client
            self._connected = self._ever_connected = True
            try:
                await client.subscribe(self._subscriptions())
                self.published_version = -1  # the broker may have lost the retained global: publish it again
                await self._publish_global()
                await self._resend_partial(force=True)
                await self._publish_status()
                self.log.info("connected to %s as %s; job %s at version %d, policy %s, quorum %d",
                              self.address.url, self.s.identifier, self.s.job, self.version,
                              self.policy.describe(), self.s.quorum)
                ticker = asyncio.create_task(self._ticker())
                messages = asyncio.create_task(self._consume(client))
                stopper = asyncio.create_task(self._stopping.wait())
                acker = asyncio.create_task(self._acker(client))
                done, _ = await asyncio.wait({ticker, messages, stopper, acker}, return_when=asyncio.FIRST_COMPLETED)
                for t in (ticker, messages, stopper, acker):
                    t.cancel()
                for t in done:
                    if t is not stopper and t.exception() is not None:
                        raise t.exception()
                if self._fusing is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.wait_for(asyncio.shield(self._fusing), 600)
                with contextlib.suppress(aiomqtt.MqttError):  # confirm what was admitted before leaving
                    await self._flush_acks(client)
                await self._publish_status("stopped")
            finally:
                self._client = None

    def _subscriptions(self) -> list[tuple[str, int]]:
        """What this aggregator reads, all at QoS 1: its job's updates and control, and a site's upstream."""
        subs = [(self.topics.updates, 1), (self.topics.control, 1)]
        if self.up_topics is not None:
            subs += [(self.up_topics.global_model, 1), (self.up_topics.ack(self.s.site), 1)]
        return subs

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            await self._on_message(message)

    def prepare(self) -> None:
        """Load or create the state and open the metrics port (idempotent; errors are the operator's)."""
        if self._prepared:
            return
        self._restore()
        size = model_bytes(self.weights)
        if travels_chunked(size, self.s.chunk_bytes, self.s.chunk_above):
            return_big_buffers()  # chunked transfers ahead; never for small models (2.5x slower rounds at 4 MB)
        elif size > MQTT_MAX_PACKET:
            raise ValueError(too_big("the model", self.version, size))
        self.metrics.start()
        self._prepared = True

    def _uses_compiled_solver(self) -> bool:
        """Whether the policy in force will run the compiled entropic solver (CPU, fedwb-sinkhorn)."""
        spec = self.policy
        method = spec.wb_method if spec.name == "hybrid" and not self.policy_state.switched else spec.name
        return (method == "fedwb-sinkhorn" and pick_solver(spec.solver, self.device) in ("plain", "wide")
                and (spec.name != "hybrid" or spec.switch_after != 0))

    async def _warm_up(self) -> None:
        """Compile the entropic kernels while the agents train their first round, not in it."""
        seconds = await asyncio.to_thread(sinkhorn_wide.warm_up)
        self.log.info("entropic solver ready (%.1fs to compile or load)", seconds)

    async def run(self) -> None:
        """Connect (reconnecting with backoff), serve until stopped, then disconnect cleanly."""
        await asyncio.to_thread(self.prepare)
        if self._uses_compiled_solver():
            self._warming = asyncio.create_task(self._warm_up())
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                await self._session()
                backoff = 0.5
            except aiomqtt.MqttError as exc:
                if self._stopping.is_set():
                    break
                self.fatal = credentials_refused(exc, self._ever_connected, self.address)
                if self.fatal is not None:  # wrong credentials, not an outage: say so, stop
                    self._stopping.set()
                    break
                self.reconnects += 1
                if self._connected:  # the session was up: a fresh outage starts the backoff again
                    backoff, self._connected = 0.5, False
                delay = backoff * (1 + random.random())
                what = outage(exc, self._ever_connected, self.address)
                self.log.warning("%s; reconnecting in %.1fs", what, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                backoff = min(backoff * 2, 30.0)
        if self.checkpoint is not None:  # the records as they are at a clean stop (counters, seen, buffered ids)
            partial_id = self._partial[0] if self._partial else None
            if partial_id is None and self._awaiting_central and self.history:  # confirmed, not yet adopted
                partial_id = self.history[-1].get("partial_update_id")
            state = {**self._state(), "partial_id": partial_id}
            await asyncio.to_thread(self.checkpoint.save, self.version, self.weights, state)
        if self.transfers is not None:
            self.transfers.close()
        if self._spool_tmp is not None:
            import shutil

            shutil.rmtree(self._spool_tmp, ignore_errors=True)
        self.metrics.stop()
        self.log.info("aggregator stopped at version %d", self.version)


def run_service(settings: AggregatorSettings) -> int:
    """Run until SIGINT/SIGTERM or ``max_rounds``; returns the exit code."""
    keep_heap()
    try:
        agg = Aggregator(settings)
        agg.prepare()
    except Exception as exc:  # noqa: BLE001 - a setup error is the operator's: one line, exit 2
        detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        sys.stderr.write(f"error: {detail}\n")
        return 2

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            log.info("received %s, shutting down", sig.name)
            agg.stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await agg.run()

    run_loop(main())
    if agg.fatal is not None:
        sys.stderr.write(f"error: {agg.fatal}\n")
        return 2
    return 0


__all__ = ["Aggregator", "run_service", "wire_reason"]
