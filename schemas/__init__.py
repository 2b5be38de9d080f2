"""fedwb wire schemas: pydantic message models and the msgpack tensor codec."""

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
from schemas.wire import DEFAULT_MAX_BYTES, WireError

# The codec needs torch (a second of import): it loads on first use, so a command that only
# parses its options, or fails on them, answers without it (``fedwb policy show --broker http://...``).
_CODEC = ("DTYPES", "decode_tensor", "encode_tensor", "pack", "tensor_count", "unpack")


def __getattr__(name: str) -> object:
    import importlib

    if name in _CODEC:
        return getattr(importlib.import_module("schemas.codec"), name)
    try:
        return importlib.import_module(f"schemas.{name}")  # a submodule: schemas.codec, schemas.chunks, ...
    except ModuleNotFoundError:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}") from None


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
