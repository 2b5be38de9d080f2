"""Pydantic v2 models of every message that travels over MQTT.

Each model carries ``schema_version``; the codec (``schemas.codec``) rejects any
other version. Weights are ``dict[str, torch.Tensor]`` and travel as dtype + shape +
raw little-endian bytes, never pickle.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

SCHEMA_VERSION = 1
MAX_WIRE_INT = 2**53  # the largest integer every JSON/float64 consumer reads exactly
MAX_METRICS = 64  # metrics entries one update may carry
ID_PATTERN = r"^[^+#/\x00]{1,128}$"  # job and agent ids are MQTT topic levels: no wildcards, no /
WireInt = Annotated[StrictInt, Field(ge=0, le=MAX_WIRE_INT)]  # no bool, no str, no float, bounded

PolicyName = Literal["fedavg", "fedwb", "fedwb-sinkhorn", "fedwb-neurons", "hybrid", "median", "trimmed-mean",
                     "krum"]
FedWBMethod = Literal["fedwb", "fedwb-sinkhorn", "fedwb-neurons"]
EntropicSolver = Literal["auto", "plain", "plain-torch", "triton", "log", "pot-plain", "wide"]
PAPER_MAX_ITER = 10_000  # the authors' numItermax (their call: ot.bregman.barycenter, method "sinkhorn")


def parse_max_iter(text: str) -> int:
    """``--max-iter``: a whole number, or ``paper`` for the authors' 10,000; ``ValueError`` otherwise."""
    if text.strip().lower() == "paper":
        return PAPER_MAX_ITER
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--max-iter must be a whole number or 'paper', got {text!r}") from None


def _now() -> float:
    return time.time()


def _new_id() -> str:
    return uuid.uuid4().hex


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=False)

    schema_version: Literal[1] = SCHEMA_VERSION


class PolicySpec(BaseModel):
    """A fusion policy as a small serializable value.

    ``hybrid`` fuses with ``wb_method`` for the first ``switch_after`` fusions, then
    with FedAvg; with ``dispersion_below`` set it switches earlier, at the first
    fusion whose buffered models' dispersion (see ``aggregator.fusion.dispersion``)
    is below that threshold. ``reg``, ``stop_threshold`` and ``max_iter`` are the
    entropic barycenter's options (POT's ``reg``, ``stopThr``, ``numItermax``; the
    authors used 10,000 iterations: ``PAPER_MAX_ITER``) and ``solver`` how it is computed
    (``auto``: the fast plain-domain iterate; ``log``: the log-domain one; ``wide``: the
    wide-range one from the start; ``pot-plain``: the authors' exact POT call, for studies);
    ``biases`` says whether 1-D tensors go through FedWB or FedAvg.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PolicyName = "fedavg"
    switch_after: int | None = Field(default=None, ge=0)
    dispersion_below: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    wb_method: FedWBMethod = "fedwb-sinkhorn"
    reg: float = Field(default=0.1, gt=0, le=1e4, allow_inf_nan=False)
    stop_threshold: float = Field(default=1e-4, gt=0, lt=1, allow_inf_nan=False)
    max_iter: int = Field(default=1000, ge=1, le=1_000_000)
    solver: EntropicSolver = "auto"
    biases: Literal["fedwb", "fedavg"] = "fedwb"
    # trimmed-mean: the fraction dropped at each end
    trim_ratio: float = Field(default=0.2, ge=0, lt=0.5, allow_inf_nan=False)
    byzantine: int | None = Field(default=None, ge=0)  # krum: assumed attackers f (default (K-3)//2)

    @model_validator(mode="after")
    def _hybrid_needs_a_switch(self) -> PolicySpec:
        if self.name == "hybrid" and self.switch_after is None and self.dispersion_below is None:
            raise ValueError("hybrid policy needs switch_after and/or dispersion_below")
        return self

    def describe(self) -> str:
        """Short human-readable form, e.g. ``hybrid(fedwb-sinkhorn x2 -> fedavg)``."""
        if self.name == "hybrid":
            parts = [f"{self.wb_method} x{self.switch_after}"]
            if self.dispersion_below is not None:
                parts.append(f"or dispersion<{self.dispersion_below:g}")
            return f"hybrid({' '.join(parts)} -> fedavg)"
        if self.name == "fedwb-sinkhorn":
            return f"fedwb-sinkhorn(reg={self.reg:g})"
        return self.name


class ModelUpdate(_Message):
    """An agent's locally trained weights, published on ``fedwb/J/update/{agent_id}``.

    Strict wire types: integers are integers (no ``True``, ``"7"`` or ``3.0``) within
    ``[0, 2**53]``, floats are finite, ids are topic-safe, at most ``MAX_METRICS`` metrics.
    ``sent_at`` is informational: the aggregator orders updates by arrival and
    ``base_version``, and rejects a ``sent_at`` beyond its clock-skew tolerance.
    """

    WIRE_META_BYTES: ClassVar[int] = 64 * 1024  # outside tensor data (schemas.codec.check_meta_bytes): ids, metrics

    job: str = Field(pattern=ID_PATTERN)
    agent_id: str = Field(pattern=ID_PATTERN)
    base_version: WireInt
    num_samples: Annotated[StrictInt, Field(gt=0, le=MAX_WIRE_INT)]
    weights: dict[str, Any]
    metrics: dict[str, StrictFloat] = Field(default_factory=dict, max_length=MAX_METRICS)
    sent_at: StrictFloat = Field(default_factory=_now, allow_inf_nan=False, ge=0)
    update_id: str = Field(default_factory=_new_id, pattern=r"^[A-Za-z0-9_.-]{1,128}$")

    @field_validator("metrics")
    @classmethod
    def _finite_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if not math.isfinite(v) or len(k) > 64]
        if bad:
            raise ValueError(f"metric {bad[0][:64]!r} has a non-finite value or a name over 64 characters")
        return value


class GlobalModel(_Message):
    """The fused model, published retained on ``fedwb/J/global``."""

    WIRE_META_BYTES: ClassVar[int] = 16 << 20  # info holds every contributor's metrics: a quorum of thousands fits

    job: str = Field(min_length=1)
    version: WireInt
    policy: str  # the rule family this version was fused with: "fedavg" or "fedwb" ("init" for v0)
    method: str = ""  # the exact method: fedavg | fedwb | fedwb-sinkhorn
    weights: dict[str, Any]
    contributors: list[str] = Field(default_factory=list)
    created_at: float = Field(default_factory=_now)
    info: dict[str, Any] = Field(default_factory=dict)
    signature: str = Field(default="", max_length=256)  # hex Ed25519 signature (schemas.signing), "" unsigned


class PolicyCommand(_Message):
    """An operator's request to change the policy, retained on ``fedwb/J/control``."""

    WIRE_META_BYTES: ClassVar[int] = 64 * 1024

    job: str = Field(min_length=1)
    policy: PolicySpec
    command_id: str = Field(default_factory=_new_id, min_length=1)
    issued_at: float = Field(default_factory=_now)
    issued_by: str = "operator"


class _Report(_Message):
    """A message published for others to read (statuses, verdicts). Its readers ignore fields they do not
    know, so a reader older than the writer (``fedwb policy show`` on an operator's laptop, an agent
    not yet upgraded) keeps working when a field is added. What is sent *to* the aggregator (updates,
    commands) and the signed global model stay strict."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, frozen=False)


class CommandAck(BaseModel):
    """How the aggregator answered the last ``PolicyCommand`` (part of its status: extra fields ignored)."""

    model_config = ConfigDict(extra="ignore")

    command_id: str
    accepted: bool
    reason: str = ""
    applied_at_version: int | None = None


class AggregatorStatus(_Report):
    """Retained on ``fedwb/J/status/aggregator`` after each fusion and periodically."""

    job: str
    state: Literal["starting", "running", "fusing", "stopped", "offline"] = "running"
    version: int = 0
    policy: PolicySpec = Field(default_factory=PolicySpec)
    pending_policy: PolicySpec | None = None
    last_choice: str | None = None
    last_choice_reason: str | None = None
    buffer_fill: int = 0
    quorum: int = 1
    accepted: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    stale: int = 0
    duplicate: int = 0
    replaced: int = 0
    bounded: dict[str, int] = Field(default_factory=dict)  # shares_capped, norms_clipped, samples_capped
    last_fusion_seconds: float | None = None
    last_quorum_wait_seconds: float | None = None
    last_quorum_at: float | None = None  # wall clock (Unix s) when the round fused into ``version`` was complete
    last_command: CommandAck | None = None
    fusion_failures: int = 0  # fusions that raised since start (each retried after a back-off)
    last_fusion_error: str | None = None  # "Type: message" of the latest failure; None once a fusion succeeds
    updated_at: float = Field(default_factory=_now)


class UpdateAck(_Report):
    """The aggregator's verdict on one update, retained on ``fedwb/J/ack/{agent_id}`` (the latest per agent).

    Published once the update is durable (in the inbox when there is a state dir). An agent
    keeps an update until it sees its ``update_id`` here, and resends it after a reconnect or
    a timeout; resends are dropped as duplicates (and acknowledged again).
    """

    WIRE_META_BYTES: ClassVar[int] = 64 * 1024

    job: str
    agent_id: str
    update_id: str
    outcome: Literal["accepted", "replaced", "duplicate", "stale", "rejected"]
    reason: str = ""
    version: int = 0  # the aggregator's version when it decided


class AgentStatus(_Report):
    """Retained on ``fedwb/J/status/agent/{agent_id}``; the last will says offline."""

    WIRE_META_BYTES: ClassVar[int] = 64 * 1024

    job: str
    agent_id: str
    state: Literal["online", "offline", "training"] = "online"
    version_seen: int | None = None
    trained_from: int | None = None  # the global version of the last round trained
    rounds: int = 0
    uptime_seconds: float = 0.0
    last_error: str | None = None  # the last thing that went wrong (connection, refused model, memory guard)
    updated_at: float = Field(default_factory=_now)
