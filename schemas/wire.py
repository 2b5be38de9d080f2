"""What bounds the wire, and the error a payload out of bounds raises: torch-free, so command
lines read them for their defaults and errors without importing the codec (and torch)."""

from __future__ import annotations

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_TENSORS = 100_000  # a model with more named tensors than this is not one we federate
MQTT_MAX_PACKET = 268_435_455  # the most bytes one MQTT packet can carry (its remaining-length field)
CHUNK_BYTES = 8 * 1024 * 1024  # the aggregator holds ~20 in flight (the broker's inflight limit): 160 MiB
CHUNK_ABOVE = 128 * 1024 * 1024  # models whose tensors pass this travel in chunks (MQTT carries < 256 MiB)
MAX_MODEL_BYTES = 4 * 1024**3  # the largest chunked model a receiver accepts by default


class WireError(ValueError):
    """A payload that cannot be decoded into the expected message, with the reason."""
