"""Optional Prometheus endpoint (``--metrics-port``) with the status counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Metrics:
    """Counters of updates by outcome/reason, a version gauge, a fusion-seconds histogram, and the incoming
    backlog (``schemas.backlog``): what is held, whether the reader is paused, pauses and stalls so far."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self._server: Any = None
        self._updates = self._fusion = self._version = None
        if port is None:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._updates = Counter("fedwb_updates_total", "Updates by outcome or rejection reason",
                                ["outcome"], registry=self.registry)
        self._fusion = Histogram("fedwb_fusion_seconds", "Seconds per fusion", registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300))
        self._version = Gauge("fedwb_global_version", "Current global model version",
                              registry=self.registry)

    def watch_backlog(self, stats: Callable[[], dict[str, float]]) -> None:
        """Gauges read from ``stats()`` at each scrape: keys ``bytes``, ``messages``, ``paused``, ``pauses``,
        ``stalls`` (the last two counted since the aggregator started, over all its connections)."""
        if self.port is None:
            return
        from prometheus_client import Gauge

        help_ = {"bytes": "Payload bytes received and not yet handled",
                 "messages": "Messages received and not yet handled",
                 "paused": "1 while the socket is left unread because too much is held (the broker queues)",
                 "pauses": "Times the socket was left unread since start",
                 "stalls": "Times reading resumed because the handler waited on the connection since start"}
        for key, text in help_.items():
            Gauge(f"fedwb_incoming_{key}", text, registry=self.registry).set_function(
                lambda key=key: float(stats().get(key, 0.0)))

    def start(self) -> None:
        if self.port is not None and self._server is None:
            from prometheus_client import start_http_server

            try:
                self._server, _thread = start_http_server(self.port, registry=self.registry)
            except OSError as exc:
                raise ValueError(f"--metrics-port {self.port}: {exc.strerror or exc}") from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def update(self, outcome: str) -> None:
        if self._updates is not None:
            self._updates.labels(outcome=outcome).inc()

    def fused(self, version: int, seconds: float) -> None:
        if self._fusion is not None:
            self._fusion.observe(seconds)
            self._version.set(version)
