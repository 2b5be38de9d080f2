"""Models larger than one MQTT packet: a manifest plus checksummed chunks.

One MQTT packet carries at most 256 MiB, so a ``ModelUpdate`` or ``GlobalModel`` whose
packed size passes ``chunk_threshold`` travels as

* a ``ChunkManifest``: the message's fields except the tensor bytes (``envelope``), each
  tensor's name, dtype, shape and byte offset in the *data section* (all tensors' raw
  little-endian bytes, concatenated in the listed order), the section's size, the chunk
  size and one SHA-256 per chunk;
* ``ModelChunk`` s: ``(transfer_id, index, data)`` with ``data`` bytes
  ``[index * chunk_bytes, (index + 1) * chunk_bytes)`` of the section.

The manifest goes first, so a receiver checks the envelope (job, sender, tensor names,
shapes, dtypes, total size) before a single tensor byte arrives, and each chunk is
verified against its digest as it lands. A transfer sent again (a resend after a
reconnect) has the same ``transfer_id`` and digests, so a receiver keeps the chunks it
already holds: transfers resume. Reassembly writes into a ``Store`` (memory or a file),
never holds more than the section, and builds tensors that view the store without a copy
(memory) or read one tensor at a time on access (file: ``FileWeights``).

Pure wire logic: no MQTT here. ``kind`` is the first key of both payloads, so
``peek_kind`` tells them from a one-packet message without decoding it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from schemas.codec import (
    _NAMES,
    DEFAULT_MAX_TENSORS,
    DTYPES,
    WireError,
    _as_tensor,
    _plain,
    all_finite,
    check_tensor_count,
    meta_cap,
)
from schemas.messages import SCHEMA_VERSION, GlobalModel, ModelUpdate
from schemas.wire import CHUNK_BYTES

MANIFEST = "ChunkManifest"
CHUNK = "ModelChunk"
MAX_CHUNKS = 1 << 20


def model_bytes(weights: Mapping[str, torch.Tensor]) -> int:
    """The tensors' size in bytes (what the wire carries, less a small envelope); ``meta``
    tensors count too, so a model's size is known without building it."""
    return sum(t.numel() * t.element_size() for t in weights.values())


def travels_chunked(size: int, chunk_bytes: int, chunk_above: int) -> bool:
    """Whether a model of ``size`` bytes is sent as a manifest plus chunks (``chunk_bytes`` 0: never)."""
    return bool(chunk_bytes) and size > chunk_above


class TensorSpec(BaseModel):
    name: str
    dtype: str
    shape: list[int]
    offset: int = Field(ge=0)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=DTYPES[self.dtype]).element_size()


class ChunkManifest(BaseModel):
    """What a chunked message is, before any of its tensor bytes."""

    schema_version: int = SCHEMA_VERSION
    of: str  # the message kind: ModelUpdate or GlobalModel
    transfer_id: str = Field(min_length=1, max_length=128)
    envelope: dict[str, Any]  # the message's fields except ``weights``
    tensors: list[TensorSpec]
    total_bytes: int = Field(ge=0)
    chunk_bytes: int = Field(gt=0)
    digests: list[str]  # SHA-256 hex of each chunk, in order

    def n_chunks(self) -> int:
        return math.ceil(self.total_bytes / self.chunk_bytes) if self.total_bytes else 0

    def meta_weights(self) -> dict[str, torch.Tensor]:
        """The tensors as shapes and dtypes only (``meta`` device: no memory), for the checks
        that need no bytes."""
        return {t.name: torch.empty(t.shape, dtype=DTYPES[t.dtype], device="meta") for t in self.tensors}


def _tensor_bytes(t: torch.Tensor, name: str) -> memoryview:
    flat = _as_tensor(t, name).to("cpu").contiguous().reshape(-1)
    if flat.dtype not in _NAMES:
        raise TypeError(f"weights[{name!r}] has unsupported dtype {flat.dtype}")
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class Outgoing:
    """A message split for sending: ``payloads()`` yields the manifest, then each chunk.

    The tensors are kept (not a packed copy); each chunk is copied out when it is sent, so
    sending costs one chunk of memory beyond the model. The digests are computed once here.
    """

    def __init__(self, msg: BaseModel, transfer_id: str, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        weights = msg.weights
        self.views: list[memoryview] = []
        specs, offset = [], 0
        for name, t in weights.items():
            view = _tensor_bytes(t, str(name))
            specs.append(TensorSpec(name=str(name), dtype=_NAMES[_as_tensor(t, str(name)).dtype],
                                    shape=list(t.shape), offset=offset))
            self.views.append(view)
            offset += view.nbytes
        self.total, self.chunk_bytes = offset, chunk_bytes
        envelope = {k: _plain(getattr(msg, k)) for k in type(msg).model_fields if k != "weights"}
        digests = [hashlib.sha256(c).hexdigest() for c in self._chunks()]
        self.manifest = ChunkManifest(of=type(msg).__name__, transfer_id=transfer_id, envelope=envelope,
                                      tensors=specs, total_bytes=offset, chunk_bytes=chunk_bytes, digests=digests)
        self.transfer_id = transfer_id

    def _chunks(self) -> Iterator[bytes]:
        """The data section in ``chunk_bytes`` pieces, copied tensor by tensor."""
        buf, fill = bytearray(min(self.chunk_bytes, self.total)), 0
        for view in self.views:
            pos = 0
            while pos < view.nbytes:
                take = min(view.nbytes - pos, len(buf) - fill)
                buf[fill:fill + take] = view[pos:pos + take]
                fill, pos = fill + take, pos + take
                if fill == len(buf):
                    yield bytes(buf)
                    fill = 0
        if fill:
            yield bytes(buf[:fill])

    def manifest_payload(self) -> bytes:
        return pack_manifest(self.manifest)

    def chunk_payloads(self) -> Iterator[bytes]:
        for index, data in enumerate(self._chunks()):
            yield pack_chunk(self.transfer_id, index, data)

    def payloads(self) -> Iterator[bytes]:
        yield self.manifest_payload()
        yield from self.chunk_payloads()

    @property
    def n_chunks(self) -> int:
        return self.manifest.n_chunks()


def pack_manifest(manifest: ChunkManifest) -> bytes:
    body = {"kind": MANIFEST, **manifest.model_dump(mode="json")}
    return msgpack.packb(body, use_bin_type=True)


def pack_chunk(transfer_id: str, index: int, data: bytes) -> bytes:
    return msgpack.packb({"kind": CHUNK, "schema_version": SCHEMA_VERSION, "transfer_id": transfer_id,
                          "index": index, "data": data}, use_bin_type=True)


def peek_kind(payload: bytes | bytearray | memoryview) -> str | None:
    """``ChunkManifest`` or ``ModelChunk`` when the payload is one (its first key), else None."""
    if len(payload) < 8:
        return None
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(payload))
        unpacker.feed(bytes(payload[:64]))
        unpacker.read_map_header()
        if unpacker.unpack() != "kind":
            return None
        kind = unpacker.unpack()
    except Exception:  # noqa: BLE001 - not ours: the one-packet decoder names the problem
        return None
    return kind if kind in (MANIFEST, CHUNK) else None


def _top_field(payload: bytes | bytearray | memoryview, key: str, array: bool) -> Any:
    """A manifest's top-level ``key``, read from the msgpack stream without building any other
    field: the length of that array (``array``) or the value itself (a string of at most 256
    bytes). None when there is no such field, or it is not that (the full decoder names it)."""
    import io

    try:
        unpacker = msgpack.Unpacker(io.BytesIO(payload), raw=False, strict_map_key=True,
                                    max_buffer_size=max(1 << 20, len(payload)), max_str_len=256)
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == key:
                return unpacker.read_array_header() if array else unpacker.unpack()
            unpacker.skip()
    except Exception:  # noqa: BLE001 - not a map, truncated, not an array, too long
        return None
    return None


DIGEST_BYTES = 80  # one SHA-256 hex digest as msgpack writes it, with room to spare


def unpack_manifest(payload: bytes, *, max_bytes: int, chunk_min: int = 1024, tensors: int | None = None,
                    max_tensors: int = DEFAULT_MAX_TENSORS) -> ChunkManifest:
    """Decode and sanity-check a manifest; ``WireError`` for anything malformed or over ``max_bytes``.

    The tensor count is checked (at most ``max_tensors``; exactly ``tensors`` when given) before
    the entries are validated one by one, so a manifest of millions of tiny tensors costs one
    msgpack parse, not millions of model validations; and before anything is decoded, the
    manifest's size against what its tensors and chunks need (the envelope gets what its class
    allows, ``WIRE_META_BYTES``), so millions of tiny objects in it are refused from the headers.
    """
    entries = _top_field(payload, "tensors", array=True)
    check_tensor_count(entries, tensors, max_tensors)
    digests = _top_field(payload, "digests", array=True) or 0
    if digests > MAX_CHUNKS:
        raise WireError(f"manifest lists {digests:,} chunk digests, more than the limit of {MAX_CHUNKS:,}")
    of = {m.__name__: m for m in (ModelUpdate, GlobalModel)}.get(_top_field(payload, "of", array=False))
    cap = meta_cap(of, entries) + DIGEST_BYTES * digests
    if len(payload) > cap:
        raise WireError(f"manifest of {len(payload):,} bytes, over the cap of {cap:,} for {entries or 0:,} "
                        f"tensors and {digests:,} chunks")
    try:
        body = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001
        raise WireError(f"not a msgpack document: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict) or body.pop("kind", None) != MANIFEST:
        raise WireError("expected a ChunkManifest")
    if body.get("schema_version") != SCHEMA_VERSION:
        raise WireError(f"unknown schema version {body.get('schema_version')!r} (this build speaks {SCHEMA_VERSION})")
    try:
        m = ChunkManifest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "manifest"
        raise WireError(f"invalid ChunkManifest: {where}: {first.get('msg')}") from None
    if m.total_bytes > max_bytes:
        raise WireError(f"chunked model of {m.total_bytes:,} bytes exceeds the limit of {max_bytes:,} bytes")
    if m.chunk_bytes < chunk_min and m.n_chunks() > 1:
        raise WireError(f"chunk size {m.chunk_bytes} is below the minimum of {chunk_min} bytes")
    if len(m.digests) != m.n_chunks() or m.n_chunks() > MAX_CHUNKS:
        raise WireError(f"manifest lists {len(m.digests)} digests for {m.n_chunks()} chunks")
    offset, seen = 0, set()
    for t in m.tensors:
        if t.dtype not in DTYPES or any(d < 0 for d in t.shape) or t.offset != offset or t.name in seen:
            raise WireError(f"manifest tensor {t.name!r}: bad dtype, shape or offset")
        seen.add(t.name)
        offset += t.nbytes
    if offset != m.total_bytes:
        raise WireError(f"manifest tensors need {offset:,} bytes, the manifest says {m.total_bytes:,}")
    return m


def unpack_chunk(payload: bytes) -> tuple[str, int, bytes]:
    """``(transfer_id, index, data)``; ``WireError`` when it is not a chunk."""
    try:
        body = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=True)
        ok = (isinstance(body, dict) and body.get("kind") == CHUNK and isinstance(body.get("transfer_id"), str)
              and isinstance(body.get("index"), int) and isinstance(body.get("data"), bytes))
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        raise WireError("malformed ModelChunk")
    return body["transfer_id"], body["index"], body["data"]


# ---------------------------------------------------------------- reassembly


class MemoryStore:
    """The data section in one buffer; tensors view it (no copy)."""

    def __init__(self, total: int) -> None:
        self.buf = bytearray(total)

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data

    def weights(self, manifest: ChunkManifest) -> dict[str, torch.Tensor]:
        out = {}
        for t in manifest.tensors:
            dtype = DTYPES[t.dtype]
            if t.nbytes == 0:
                out[t.name] = torch.empty(t.shape, dtype=dtype)
            else:
                out[t.name] = torch.frombuffer(self.buf, dtype=dtype, offset=t.offset,
                                               count=math.prod(t.shape)).reshape(t.shape)
        return out

    def discard(self) -> None:
        self.buf = bytearray()


class FileStore:
    """The data section in a file; ``weights`` reads one tensor per access (``FileWeights``)."""

    def __init__(self, path: str | Path, total: int) -> None:
        self.path = Path(path)
        with open(self.path, "wb") as f:
            f.truncate(total)

    def write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def weights(self, manifest: ChunkManifest) -> FileWeights:
        return FileWeights(self.path, manifest)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class FileWeights(Mapping):
    """``name -> tensor`` read from a data-section file on every access, never cached.

    Holds no tensor memory itself, so a round of several big updates costs one tensor of
    each at a time in per-tensor fusion. ``meta(name)`` gives the shape and dtype without
    reading.
    """

    def __init__(self, path: str | Path, manifest: ChunkManifest) -> None:
        self.path = Path(path)
        self._specs = {t.name: t for t in manifest.tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._specs[name]
        dtype = DTYPES[t.dtype]
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=dtype)
        arr = np.fromfile(self.path, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        if arr.size != t.nbytes:
            raise OSError(f"{self.path}: truncated at tensor {name!r}")
        return torch.from_numpy(arr).view(dtype).reshape(t.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._specs[name]
        return tuple(t.shape), DTYPES[t.dtype]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._specs.values())


def tensor_meta(weights: Mapping[str, Any], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of ``weights[name]``, without reading it when it lives in a file."""
    if isinstance(weights, FileWeights):
        return weights.meta(name)
    t = weights[name]
    return tuple(t.shape), t.dtype


def tensor_device(weights: Mapping[str, Any], name: str) -> torch.device:
    """Where ``weights[name]`` lives (a file-backed tensor is read onto the CPU)."""
    return torch.device("cpu") if isinstance(weights, FileWeights) else weights[name].device


class Reassembly:
    """Collects one transfer's chunks into ``store``; ``add`` verifies each against its digest."""

    def __init__(self, manifest: ChunkManifest, store: MemoryStore | FileStore) -> None:
        self.manifest, self.store = manifest, store
        self.have: set[int] = set()
        self.bytes = 0

    def add(self, index: int, data: bytes) -> bool:
        """Write chunk ``index``; False when it is a repeat; ``WireError`` when it does not belong."""
        m = self.manifest
        if not 0 <= index < m.n_chunks():
            raise WireError(f"chunk {index} of a {m.n_chunks()}-chunk transfer")
        expected = min(m.chunk_bytes, m.total_bytes - index * m.chunk_bytes)
        if len(data) != expected or hashlib.sha256(data).hexdigest() != m.digests[index]:
            raise WireError(f"chunk {index} does not match its digest in the manifest")
        if index in self.have:
            return False
        self.store.write(index * m.chunk_bytes, data)
        self.have.add(index)
        self.bytes += len(data)
        return True

    @property
    def complete(self) -> bool:
        return len(self.have) == self.manifest.n_chunks()

    def weights(self, check_finite: bool = True) -> Mapping[str, torch.Tensor]:
        """The tensors; ``WireError`` naming the first one with NaN or Inf (read one at a time)."""
        w = self.store.weights(self.manifest)
        if check_finite:
            for name in w:
                t = w[name]
                if t.is_floating_point() and t.numel() and not all_finite(t):
                    raise WireError(f"weights[{name!r}] contains NaN or Inf")
        return w

    def discard(self) -> None:
        self.store.discard()


def build_message(cls: type, manifest: ChunkManifest, weights: Mapping[str, torch.Tensor]) -> Any:
    """The message a manifest describes, with ``weights`` attached as given (a ``FileWeights``
    stays lazy: pydantic would read every tensor to copy it into a dict); ``WireError`` when
    the envelope is not a valid ``cls``."""
    if manifest.of != cls.__name__:
        raise WireError(f"expected a chunked {cls.__name__}, the manifest is for {manifest.of!r}")
    envelope = {k: v for k, v in manifest.envelope.items() if k != "weights"}
    try:
        msg = cls.model_validate({**envelope, "weights": {}})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        raise WireError(f"invalid {cls.__name__}: {where}: {first.get('msg')}") from None
    msg.__dict__["weights"] = weights
    return msg


def envelope_message(cls: type, manifest: ChunkManifest) -> Any:
    """The manifest's message with no tensors yet: for the checks that need no tensor bytes."""
    return build_message(cls, manifest, {})
