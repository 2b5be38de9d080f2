"""fedwb wire schemas: pydantic message models and the msgpack tensor codec."""

from schemas.codec import (
    DEFAULT_MAX_BYTES,
    DTYPES,
    WireError,
    decode_tensor,
    encode_tensor,
    pack,
    tensor_count,
    unpack,
)
from schemas.connection import BrokerAddress
from schemas.messages import (
    SCHEMA_VERSION,
    AgentStatus,
    AggregatorStatus,
    CommandAck,
    GlobalModel,
    ModelUpdate,
    PolicyCommand,
    PolicySpec,
    UpdateAck,
)
from schemas.topics import Topics

__all__ = [
    "BrokerAddress",
    "DEFAULT_MAX_BYTES",
    "DTYPES",
    "SCHEMA_VERSION",
    "AgentStatus",
    "AggregatorStatus",
    "CommandAck",
    "GlobalModel",
    "ModelUpdate",
    "PolicyCommand",
    "PolicySpec",
    "Topics",
    "UpdateAck",
    "WireError",
    "decode_tensor",
    "encode_tensor",
    "pack",
    "tensor_count",
    "unpack",
]
