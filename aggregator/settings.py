"""Aggregator settings: CLI options, ``FEDWB_AGG_*`` environment variables, or a JSON/TOML file."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import PolicySpec
from schemas.wire import CHUNK_ABOVE, CHUNK_BYTES, MAX_MODEL_BYTES


class AggregatorSettings(BaseSettings):
    """Everything the aggregator service needs; tests build it directly."""

    model_config = SettingsConfigDict(env_prefix="FEDWB_AGG_", extra="forbid")

    broker: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    job: str = "default"
    prefix: str = "fedwb"
    task: str | None = None  # required unless init is given
    task_options: dict = Field(default_factory=dict)
    init: str | None = None  # a .safetensors file for version 0 (instead of the task's model)
    quorum: int = Field(default=3, ge=1)
    min_updates: int = Field(default=1, ge=1)
    deadline: float | None = Field(default=None, gt=0)
    max_staleness: int = Field(default=10, ge=0)
    staleness_alpha: float = Field(default=0.5, ge=0)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    state_dir: str | None = None
    rate_limit: float | None = Field(default=None, gt=0)  # updates per agent per minute
    max_update_norm: float | None = Field(default=None, gt=0)  # absolute outlier bound, off by default
    # Bounded influence, on by default (aggregator.fusion.robust): weight-share cap (None: 2/quorum),
    # norm clipping at clip_factor x the round's median delta norm (0: off), num_samples cap.
    max_share: float | None = Field(default=None, gt=0, le=1)
    server_lr: float = Field(default=1.0, gt=0, le=1)  # W <- W + lr (fused - W); 1: plain (the fusion is the model)
    clip_factor: float = Field(default=3.0, ge=0, le=1e6)
    max_num_samples: int | None = Field(default=10_000_000, ge=1)
    agents_file: str | None = None  # JSON: {agent_id: {"max_num_samples": N | null}}; others are rejected
    upstream: Literal["bridge"] | None = None  # a site aggregator: partials go up through its broker's bridge
    site: str | None = Field(default=None, pattern=r"^[^+#/\x00]{1,128}$")  # its id at the center
    signing_key: str | None = None  # Ed25519 private key (PEM): sign every global model
    max_clock_skew: float | None = Field(default=300.0, ge=0)  # reject sent_at further ahead (s)
    fsync_inbox: bool = False  # also fsync each accepted update (survives power loss; slower ingest)
    max_rounds: int | None = Field(default=None, ge=1)
    max_payload_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # Models larger than one MQTT packet (schemas.chunks): a global model whose tensors pass chunk_above bytes is
    # sent as a manifest plus chunk_bytes chunks (0: never; then such a model is an error naming its size);
    # chunked updates up to max_model_bytes are received, at most max_transfers at a time, spooled to disk.
    chunk_bytes: int = Field(default=CHUNK_BYTES, ge=0)
    chunk_above: int = Field(default=CHUNK_ABOVE, ge=1024, le=255 * 1024 * 1024)  # above 255 MiB one packet fails
    max_model_bytes: int = Field(default=MAX_MODEL_BYTES, ge=1024)
    max_transfers: int = Field(default=16, ge=1)
    max_spool_bytes: int = Field(default=16 * 1024**3, ge=1024)  # disk for the transfers open at once
    transfer_timeout: float = Field(default=300.0, gt=0)  # a transfer with no chunk for this long is dropped
    status_interval: float = Field(default=2.0, gt=0)
    client_id: str | None = None  # default fedwb-aggregator-<job>: stable, for the persistent session
    session_expiry: int = Field(default=7 * 24 * 3600, ge=0)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> AggregatorSettings:
        if self.min_updates > self.quorum:
            raise ValueError(f"min_updates ({self.min_updates}) cannot exceed quorum ({self.quorum})")
        if self.task is None and self.init is None:
            raise ValueError("give --task or --init to build version 0")
        if self.chunk_bytes and not 1024 <= self.chunk_bytes <= 255 * 1024 * 1024:
            raise ValueError(f"chunk_bytes must be 0 (off) or between 1 KiB and 255 MiB, got {self.chunk_bytes}")
        if self.upstream and not self.site:
            raise ValueError("a site aggregator (--upstream bridge) needs --site NAME, its id at the center")
        return self

    @property
    def share_cap(self) -> float:
        """The weight-share cap in force: ``max_share``, else 2/quorum (1 for a quorum of 1 or 2)."""
        return self.max_share if self.max_share is not None else min(1.0, 2.0 / self.quorum)

    @property
    def identifier(self) -> str:
        return self.client_id or f"fedwb-aggregator-{self.job}"
