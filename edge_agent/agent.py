"""The edge agent: wait for the global model, train locally, publish the update, repeat.

Choice on a global model that arrives mid-training: training is not interrupted; the
update is published with the base version it started from (the aggregator weighs its
staleness), and the next local round starts from the newest global model. The "local
boundary" is therefore the end of one local budget (epochs or steps).

Straggler simulation knobs (used by ``fedwb sim``, harmless on real devices):
``slowdown`` (training takes that many times as long), ``delay`` (a sampler of seconds
before each publish), ``drop`` (probability to skip publishing a round), ``crash``
(probability per round to drop the connection and rejoin after ``rejoin_after`` s).

Training and the connection are two tasks: a broker outage never loses a round; the
finished update waits in a one-slot outbox and is published after the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import torch

import schemas
from schemas import AgentStatus, BrokerAddress, GlobalModel, ModelUpdate, Topics, UpdateAck, WireError
from schemas.chunks import (
    MANIFEST,
    MemoryStore,
    Outgoing,
    Reassembly,
    build_message,
    envelope_message,
    model_bytes,
    peek_kind,
    tensor_meta,
    travels_chunked,
    unpack_chunk,
    unpack_manifest,
)
from schemas.connection import credentials_refused, outage, run_loop
from schemas.heap import keep_heap, return_big_buffers
from schemas.receive import fast_publish
from schemas.send import fast_send
from schemas.wire import CHUNK_ABOVE, CHUNK_BYTES, MAX_MODEL_BYTES, MQTT_MAX_PACKET

log = logging.getLogger("fedwb.agent")


@dataclass
class AgentSettings:
    broker: str = "mqtt://127.0.0.1:1883"
    job: str = "default"
    agent_id: str = "agent-0"
    task: str = "mnist"
    task_options: dict[str, Any] = field(default_factory=dict)
    budget: int = 1  # local epochs (mnist) or environment steps (cartpole)
    max_rounds: int | None = None
    seed: int = 0
    device: str = "cpu"
    prefix: str = "fedwb"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_payload_bytes: int = 256 * 1024 * 1024
    slowdown: float = 1.0
    delay: Callable[[random.Random], float] | None = None
    drop: float = 0.0
    crash: float = 0.0
    rejoin_after: float = 2.0
    init: str = "global"  # first round from: the global model | "own" (the task's init, this agent's seed) | a file
    pretrain: int = 0  # with init own/file: extra local budget before the first update ("trained apart")
    verify_key: str | None = None  # Ed25519 public key (PEM): accept only global models the aggregator signed
    threads: int | None = None  # torch threads for local training (default: at most 2)
    max_memory_mb: float | None = None  # memory guard: leave (exit 3) when the RSS passes this after a round
    confirm_timeout: float = 60.0  # resend an update the aggregator has not confirmed after this many seconds
    exit_wait: float = 30.0  # at the natural end (max_rounds), wait this long for the last confirmation
    chunk_bytes: int = CHUNK_BYTES  # updates over chunk_above bytes go as a manifest + chunks; 0: never
    chunk_above: int = CHUNK_ABOVE
    max_model_bytes: int = MAX_MODEL_BYTES  # the largest chunked global model accepted


class _Crash(Exception):
    """Simulated crash: leave without a clean disconnect."""


class Agent:
    """One edge device's runtime. ``await Agent(settings).run()``."""

    def __init__(self, settings: AgentSettings, task: Any = None) -> None:
        self.s = settings
        self.topics = Topics(settings.job, settings.prefix)
        self.address = BrokerAddress.parse(settings.broker, username=settings.username,
                                           password=settings.password, tls_ca=settings.tls_ca,
                                           tls_cert=settings.tls_cert, tls_key=settings.tls_key)
        self.address.client_kwargs()  # TLS files that do not load fail here, not in the reconnect loop
        if task is None:
            from edge_agent.tasks import get_task

            task = get_task(settings.task, seed=settings.seed, device=settings.device, **settings.task_options)
        self.task = task
        self.rng = random.Random(settings.seed)
        self.latest: GlobalModel | None = None
        self._new_global = asyncio.Event()
        self.trained_from = -1
        self.rounds = 0
        self.pending: tuple[str, bytes | Outgoing] | None = None  # (update_id, payload or chunks) not yet published
        self.unconfirmed: tuple[str, bytes | Outgoing] | None = None  # published, not confirmed by the aggregator
        self._incoming: Reassembly | None = None  # a chunked global model on its way
        self._published_at = 0.0
        self.resends = 0
        self.started = time.monotonic()
        self.over_memory = False
        self.last_error: str | None = None
        self._connected = False  # a session came up since the last connection error
        self._ever_connected = False
        self.fatal: str | None = None  # why the agent gave up (its first connection was refused)
        self.verdicts: dict[str, int] = {}  # the aggregator's acks by outcome
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # the session has something to do
        self._sent = asyncio.Event()
        self._sent.set()
        self._crash = asyncio.Event()
        self._trainer_running = True
        self.state = "online"
        self.reconnects = 0
        self.refused: dict[str, int] = {}  # global models refused, by reason
        self._shapes = model_shapes(task)
        meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in self._shapes.items()}
        if travels_chunked(model_bytes(meta), settings.chunk_bytes, settings.chunk_above):
            return_big_buffers()  # chunked transfers ahead; small models keep glibc's faster adaptive malloc
        self._verify_key = None
        if settings.verify_key:
            from schemas.signing import load_public_key

            self._verify_key = load_public_key(settings.verify_key)

    def stop(self) -> None:
        self._stopping.set()
        self._new_global.set()
        self._wake.set()

    def _status(self, state: str) -> bytes:
        """The retained health record: state, versions seen and trained from, rounds, uptime, last error."""
        return schemas.pack(AgentStatus(job=self.s.job, agent_id=self.s.agent_id, state=state,
                                        version_seen=self.latest.version if self.latest else None,
                                        trained_from=self.trained_from if self.trained_from >= 0 else None,
                                        rounds=self.rounds, uptime_seconds=round(time.monotonic() - self.started, 1),
                                        last_error=self.last_error))

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            # a read-only view of this packet's own buffer (fast_publish views): a global model's tensors view it too
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes | bytearray | memoryview) else b""
            if topic == self.topics.ack(self.s.agent_id):
                self._on_ack(bytes(payload))
                continue
            if topic != self.topics.global_model:
                await self._on_global_chunk(client, bytes(payload))
                continue
            if peek_kind(payload) == MANIFEST:
                await self._on_global_manifest(client, bytes(payload))
                continue
            try:  # off the event loop: a model of many tensors takes ~0.2 s per 20,000 to decode
                g = await asyncio.to_thread(schemas.unpack, payload, GlobalModel, max_bytes=self.s.max_payload_bytes)
            except WireError as exc:
                log.warning("%s: ignored a malformed global model: %s", self.s.agent_id, exc)
                continue
            await self._offer(g)

    async def _offer(self, g: GlobalModel) -> None:
        """Take ``g`` as the model of the next round unless it is old news or refused."""
        if self.latest is not None and g.version <= self.latest.version and g.job == self.s.job:
            return  # a redelivery or an older version: nothing new
        problem = await asyncio.to_thread(self._refusal, g)
        if problem:
            self._refuse(g, *problem)
            return
        self.latest = g  # only the newest is kept: bounded memory
        self._new_global.set()

    async def _on_global_manifest(self, client: aiomqtt.Client, payload: bytes) -> None:
        """A global model in chunks: check what needs no tensor bytes, then collect its chunks
        (subscribing to them now delivers the retained ones, whatever arrived before)."""
        try:
            manifest = unpack_manifest(payload, max_bytes=self.s.max_model_bytes)
            g = envelope_message(GlobalModel, manifest)
        except WireError as exc:
            log.warning("%s: ignored a malformed chunked global model: %s", self.s.agent_id, exc)
            return
        if (self.latest is not None and g.version <= self.latest.version and g.job == self.s.job) or \
                (self._incoming is not None and self._incoming.manifest == manifest):
            return
        g.__dict__["weights"] = manifest.meta_weights()
        problem = self._refusal(g, signature=False)
        if problem:
            self._refuse(g, *problem)
            return
        self._incoming = Reassembly(manifest, MemoryStore(manifest.total_bytes))
        await client.subscribe(self.topics.global_chunks, qos=1)

    async def _on_global_chunk(self, client: aiomqtt.Client, payload: bytes) -> None:
        incoming = self._incoming
        if incoming is None:
            return
        try:
            transfer_id, index, data = unpack_chunk(payload)
            if transfer_id != incoming.manifest.transfer_id:
                return  # a retained chunk of another version
            await asyncio.to_thread(incoming.add, index, data)
            if not incoming.complete:
                return
            g = build_message(GlobalModel, incoming.manifest, await asyncio.to_thread(incoming.weights))
        except WireError as exc:
            log.warning("%s: ignored a global model chunk: %s", self.s.agent_id, exc)
            return
        self._incoming = None
        await client.unsubscribe(self.topics.global_chunks)
        await self._offer(g)

    def _on_ack(self, payload: bytes) -> None:
        """The aggregator confirmed an update: stop keeping it (any verdict ends the resends)."""
        try:
            ack = schemas.unpack(payload, UpdateAck)
        except WireError:
            return
        if self.unconfirmed is None or ack.update_id != self.unconfirmed[0]:
            return  # an older update's ack (retained), or one we already saw
        self.unconfirmed = None
        self.verdicts[ack.outcome] = self.verdicts.get(ack.outcome, 0) + 1
        log.info("%s: update %s confirmed: %s at v%d", self.s.agent_id, ack.update_id, ack.outcome, ack.version)
        if ack.outcome in ("rejected", "stale"):
            log.warning("%s: the aggregator did not take update %s: %s %s", self.s.agent_id, ack.update_id,
                        ack.outcome, ack.reason)
        if self.pending is None:
            self._sent.set()
        self._wake.set()

    def _refusal(self, g: GlobalModel, signature: bool = True) -> tuple[str, str] | None:
        """Why ``g`` is not a global model of this job to train from: (reason, detail), or None."""
        if g.job != self.s.job:
            return "wrong_job", f"job {g.job!r}"
        shapes = {n: tensor_meta(g.weights, n) for n in g.weights}
        if shapes != self._shapes:
            bad = sorted(n for n in set(shapes) | set(self._shapes) if shapes.get(n) != self._shapes.get(n))
            return "shape_mismatch", f"tensors {bad[:3]} differ from this task's model"
        if self._verify_key is not None and signature:
            from schemas.signing import verify

            if not g.signature:
                return "unsigned", "no signature (this agent has --verify-key)"
            if not verify(g, self._verify_key):
                return "bad_signature", "the signature does not match the aggregator's key"
        return None

    def _refuse(self, g: GlobalModel, reason: str, detail: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.last_error = f"refused global v{g.version}: {reason}"
        if self.refused[reason] == 1 or self.refused[reason] % 100 == 0:
            log.warning("%s: refused global model v%d: %s (%s; %d refused for this reason)", self.s.agent_id,
                        g.version, reason, detail, self.refused[reason])

    async def _next_global(self) -> GlobalModel | None:
        while not self._stopping.is_set():
            if self.latest is not None and self.latest.version > self.trained_from:
                return self.latest
            self._new_global.clear()
            await self._new_global.wait()
        return None

    def _starting_point(self, g: GlobalModel) -> tuple[dict[str, Any], int]:
        """The weights and budget of this round: the global model, except on the first round with --init."""
        if self.rounds > 0 or self.s.init == "global":
            return dict(g.weights), self.s.budget
        if self.s.init == "own":
            own = self.task.initial_weights()
        else:
            from safetensors.torch import load_file

            own = load_file(self.s.init)
        bad = sorted(n for n in g.weights if n not in own or own[n].shape != g.weights[n].shape)
        if bad or set(own) != set(g.weights):
            log.error("agent %s: --init %s does not match the job's model (%s); starting from the global model",
                      self.s.agent_id, self.s.init, (bad or sorted(set(own) ^ set(g.weights)))[:3])
            return dict(g.weights), self.s.budget
        log.info("agent %s: first round from %s (+%d pretraining)", self.s.agent_id, self.s.init, self.s.pretrain)
        return own, self.s.budget + self.s.pretrain

    async def _train_round(self) -> None:
        g = await self._next_global()
        if g is None:
            return
        self.trained_from = g.version
        self.state = "training"
        self._wake.set()
        t0 = time.monotonic()
        # The decoded tensors view (or copy) their own packet's buffer, which nothing else uses, and this
        # version is never trained again, so the task gets them without another 4 bytes/param copy.
        weights, budget = self._starting_point(g)
        result = await asyncio.to_thread(self.task.train, weights, budget)
        spent = time.monotonic() - t0
        if self.s.slowdown > 1.0:
            await self._pause(spent * (self.s.slowdown - 1.0))
        self.rounds += 1
        self.state = "online"
        rss = rss_mb()
        if self.s.max_memory_mb is not None and rss > self.s.max_memory_mb:
            self.last_error = f"memory guard: RSS {rss:.0f} MB > {self.s.max_memory_mb:g} MB"
            log.error("%s: %s after round %d; leaving (exit 3) so the service manager restarts it",
                      self.s.agent_id, self.last_error, self.rounds)
            self.over_memory = True
            self.stop()
            return
        if self.s.crash and self.rng.random() < self.s.crash:
            self._crash.set()
            self._wake.set()
            log.warning("%s: simulated crash after round %d", self.s.agent_id, self.rounds)
            return
        if self.s.drop and self.rng.random() < self.s.drop:
            log.info("%s: dropped round from v%d (simulated)", self.s.agent_id, g.version)
            return
        update = ModelUpdate(job=self.s.job, agent_id=self.s.agent_id, base_version=g.version,
                             num_samples=result.num_samples, weights=result.weights,
                             metrics={**result.metrics, "train_seconds": spent})
        if travels_chunked(model_bytes(result.weights), self.s.chunk_bytes, self.s.chunk_above):
            payload: bytes | Outgoing = await asyncio.to_thread(Outgoing, update, update.update_id,
                                                                self.s.chunk_bytes)
        else:
            payload = await asyncio.to_thread(schemas.pack, update)
            if len(payload) > MQTT_MAX_PACKET:
                log.error("%s: update of round %d is %s bytes, over MQTT's limit of %s bytes per packet, and "
                          "chunked transfer is off (--chunk-mib 0); not sent", self.s.agent_id, self.rounds,
                          f"{len(payload):,}", f"{MQTT_MAX_PACKET:,}")
                return
        if self.s.delay is not None:
            await self._pause(self.s.delay(self.rng))
        self.pending = (update.update_id, payload)  # one slot: a newer update replaces an unsent older one
        self.unconfirmed = None  # and supersedes an unconfirmed one (the aggregator keeps the newest anyway)
        self._sent.clear()
        self._wake.set()
        log.info("%s: round %d from v%d ready as update %s (%d samples, %.2fs) %s", self.s.agent_id, self.rounds,
                 g.version, update.update_id, result.num_samples, spent,
                 {k: round(v, 4) for k, v in result.metrics.items()})

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))

    def _done(self) -> bool:
        return self._stopping.is_set() or (self.s.max_rounds is not None and self.rounds >= self.s.max_rounds)

    async def _trainer(self) -> None:
        """Train round after round, independent of the connection; hand updates to the outbox."""
        while not self._done():
            await self._train_round()
        with contextlib.suppress(TimeoutError):  # the last update is confirmed (or we gave up) before we leave
            await asyncio.wait_for(self._sent.wait(), self.s.exit_wait)
        self.stop()

    async def _session(self) -> None:
        """One connection: consume global models, publish the outbox and status."""
        will = aiomqtt.Will(self.topics.agent_status(self.s.agent_id), self._status("offline"), qos=1, retain=True)
        client = aiomqtt.Client(**self.address.client_kwargs(), identifier=f"fedwb-agent-{self.s.job}-"
                                f"{self.s.agent_id}", will=will, keepalive=30)
        fast_publish(client, views=True)  # a global model is read into one buffer and never copied after
        fast_send(client)  # an update leaves through views of its packet, not a copy per partial write
        async with client:
            self._connected = self._ever_connected = True
            await client.subscribe([(self.topics.global_model, 1), (self.topics.ack(self.s.agent_id), 1)])
            if self.unconfirmed is not None and self.pending is None:
                self.pending, self.unconfirmed = self.unconfirmed, None  # a new session: resend what is unconfirmed
                self.resends += 1
            consumer = asyncio.create_task(self._consume(client))
            published_state = None
            try:
                while not (self._stopping.is_set() and self.pending is None):
                    # Clear before looking at the state, never after: a stop() or a new update that lands
                    # while a publish below is awaited must still wake the wait at the end of this pass.
                    self._wake.clear()
                    if self._crash.is_set():
                        raise _Crash()
                    health = (self.state, self.rounds, self.last_error)
                    if published_state != health:
                        await client.publish(self.topics.agent_status(self.s.agent_id), self._status(self.state),
                                             qos=1, retain=True)
                        published_state = health
                    if self.pending is not None:
                        item = self.pending
                        await self._publish_update(client, item)
                        if self.pending is item:
                            self.pending, self.unconfirmed = None, item
                            self._published_at = time.monotonic()
                        continue
                    wait = None
                    if self.unconfirmed is not None:
                        wait = self._published_at + self.s.confirm_timeout - time.monotonic()
                        if wait <= 0:  # no confirmation in time: resend (a duplicate is dropped and confirmed)
                            self.pending, self.unconfirmed = self.unconfirmed, None
                            self.resends += 1
                            continue
                    waker = asyncio.create_task(self._wake.wait())
                    done, _ = await asyncio.wait({waker, consumer}, timeout=wait,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    waker.cancel()
                    if consumer in done:
                        consumer.result()  # raises the MqttError that ended the session
                await client.publish(self.topics.agent_status(self.s.agent_id), self._status("offline"), qos=1,
                                     retain=True)
            finally:
                consumer.cancel()

    async def _publish_update(self, client: aiomqtt.Client, item: tuple[str, bytes | Outgoing]) -> None:
        """One packet, or the manifest and each chunk in order (stopping if a newer update replaced it)."""
        topic = self.topics.update(self.s.agent_id)
        if isinstance(item[1], bytes):
            await client.publish(topic, item[1], qos=1)
            return
        await client.publish(topic, item[1].manifest_payload(), qos=1)
        chunks = item[1].chunk_payloads()
        for _ in range(item[1].n_chunks):
            if self.pending is not item:
                return
            await client.publish(topic, await asyncio.to_thread(next, chunks), qos=1)

    async def _connection(self) -> None:
        """Keep a session up until stopped; reconnect with exponential backoff and jitter."""
        backoff = 0.5
        while not (self._stopping.is_set() and self.pending is None):
            try:
                await self._session()
                backoff = 0.5
            except _Crash:
                self.reconnects += 1
                await asyncio.sleep(self.s.rejoin_after)  # simulated downtime, not synchronization
                self._crash.clear()
            except aiomqtt.MqttError as exc:
                self.fatal = credentials_refused(exc, self._ever_connected, self.address)
                if self.fatal is not None:  # wrong credentials, not an outage: say so, stop
                    self.pending = self.unconfirmed = None
                    self.stop()
                    self._sent.set()
                    return
                self.reconnects += 1
                self.last_error = outage(exc, self._ever_connected, self.address)
                if self._connected:  # the session was up: a fresh outage starts the backoff again
                    backoff, self._connected = 0.5, False
                delay = backoff * (0.5 + self.rng.random())
                log.warning("%s: %s; reconnecting in %.1fs", self.s.agent_id, self.last_error, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)
                if self._stopping.is_set() and not self._trainer_running:
                    self.pending = self.unconfirmed = None  # stopping for good: give up on an unsent update
                    self._sent.set()

    async def run(self) -> int:
        """Serve until stopped or ``max_rounds`` (the last update published)."""
        trainer = asyncio.create_task(self._trainer())
        connection = asyncio.create_task(self._connection())
        stopper = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({trainer, stopper}, return_when=asyncio.FIRST_COMPLETED)
        self._trainer_running = False
        if not trainer.done():
            trainer.cancel()  # SIGTERM: a training thread finishes in the background
        self._wake.set()
        try:
            await asyncio.wait_for(connection, 30)
        except TimeoutError:
            connection.cancel()
        stopper.cancel()
        if trainer.done() and not trainer.cancelled() and trainer.exception() is not None:
            raise trainer.exception()
        return 3 if self.over_memory else 0


def model_shapes(task: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the task's model, built on the ``meta`` device (no memory: a
    1 GB model costs nothing here); a task whose model cannot be built there pays for one copy."""
    try:
        with torch.device("meta"):
            weights = task.build_model().state_dict()
    except Exception:  # noqa: BLE001 - e.g. a plugin that loads a file in build_model
        weights = task.initial_weights()
    return {n: (tuple(t.shape), t.dtype) for n, t in weights.items()}


def rss_mb() -> float:
    """This process's resident memory in MB (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_agent(settings: AgentSettings) -> int:
    keep_heap()
    torch.set_num_threads(settings.threads or max(1, min(2, torch.get_num_threads())))

    async def main() -> int:
        agent = Agent(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        code = await agent.run()
        if agent.fatal is not None:
            sys.stderr.write(f"error: {agent.fatal}\n")
            return 2
        return code

    return run_loop(main())
