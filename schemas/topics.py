"""MQTT topic names for one job (DESIGN.md, "Wire")."""

from __future__ import annotations

from dataclasses import dataclass

UPSTREAM_PREFIX = "fedwbup"  # on a site broker: what its bridge carries to and from the central broker


@dataclass(frozen=True)
class Topics:
    """Topics of job ``job`` under ``prefix`` (default ``fedwb``)."""

    job: str
    prefix: str = "fedwb"

    def __post_init__(self) -> None:
        for part in (self.job, self.prefix):
            if not part or any(c in part for c in "+#/\0"):
                raise ValueError(f"invalid topic part {part!r}: empty or contains + # / NUL")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.job}"

    def update(self, agent_id: str) -> str:
        return f"{self.base}/update/{agent_id}"

    @property
    def updates(self) -> str:
        return f"{self.base}/update/+"

    @property
    def global_model(self) -> str:
        return f"{self.base}/global"

    def global_chunk(self, index: int) -> str:
        """Chunk ``index`` of a global model too large for one packet (retained; schemas.chunks)."""
        return f"{self.base}/global/chunk/{index}"

    @property
    def global_chunks(self) -> str:
        return f"{self.base}/global/chunk/+"

    @property
    def control(self) -> str:
        return f"{self.base}/control"

    @property
    def aggregator_status(self) -> str:
        return f"{self.base}/status/aggregator"

    def ack(self, agent_id: str) -> str:
        """Where the aggregator confirms ``agent_id``'s latest update (retained ``UpdateAck``)."""
        return f"{self.base}/ack/{agent_id}"

    def agent_status(self, agent_id: str) -> str:
        return f"{self.base}/status/agent/{agent_id}"

    @property
    def agent_statuses(self) -> str:
        return f"{self.base}/status/agent/+"

    def agent_of(self, topic: str) -> str | None:
        """The agent id of an update topic, or None when ``topic`` is not one."""
        head = f"{self.base}/update/"
        if topic.startswith(head) and "/" not in topic[len(head):] and topic[len(head):]:
            return topic[len(head):]
        return None
