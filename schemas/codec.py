"""The msgpack wire codec.

A payload is a msgpack map: the model's fields, plus ``kind`` (the class name).
A field named ``weights`` is a map ``name -> {dtype, shape, data}`` where ``data`` is
the tensor's raw little-endian bytes. No pickle anywhere.

``unpack`` raises ``WireError`` -- and nothing else -- for any malformed input.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgpack
import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from schemas.messages import SCHEMA_VERSION
from schemas.wire import DEFAULT_MAX_BYTES, DEFAULT_MAX_TENSORS, WireError

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}
# Decoded tensors wrap the bytes msgpack just made for them (no second copy of every update): torch warns that
# the buffer is read-only, and the aggregator never writes into an update's tensors (fusion builds new ones).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__)

M = TypeVar("M", bound=BaseModel)

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("fedwb's wire codec needs a little-endian host")


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise TypeError(f"weights[{name!r}] must be a torch.Tensor or numpy.ndarray, "
                    f"not {type(value).__name__}")


def encode_tensor(t: torch.Tensor, name: str = "?") -> dict[str, Any]:
    """``{dtype, shape, data}`` of one tensor (moved to CPU, made contiguous)."""
    t = _as_tensor(t, name)
    if t.dtype not in _NAMES:
        raise TypeError(f"weights[{name!r}] has unsupported dtype {t.dtype}")
    flat = t.to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
    return {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data": memoryview(data)}


def decode_tensor(obj: Any, name: str = "?") -> torch.Tensor:
    """Inverse of ``encode_tensor``; raises ``WireError`` on anything malformed."""
    if not isinstance(obj, Mapping) or set(obj) != {"dtype", "shape", "data"}:
        raise WireError(f"weights[{name!r}] must be a map with keys dtype, shape, data")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype_name not in DTYPES:
        raise WireError(f"weights[{name!r}] has unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise WireError(f"weights[{name!r}] has an invalid shape {shape!r}")
    if not isinstance(data, bytes | bytearray | memoryview):  # memoryview: _unpack_viewing's, of the payload
        raise WireError(f"weights[{name!r}] data must be bytes")
    dtype = DTYPES[dtype_name]
    itemsize = _ITEMSIZE[dtype_name]
    numel = math.prod(shape)
    if numel * itemsize != len(data):
        raise WireError(
            f"weights[{name!r}]: shape {list(shape)} of {dtype_name} needs "
            f"{numel * itemsize} bytes, got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(data, dtype=dtype)
    if len(shape) != 1:
        t = t.reshape(shape)
    if t.is_floating_point() and not all_finite(t):
        raise WireError(f"weights[{name!r}] contains NaN or Inf")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check; numpy's is several times faster than torch's on small CPU tensors.

    A finite dot product x.x proves every element finite (a NaN or an Inf would reach it); only when
    it is not (NaN/Inf, or finite values large enough to overflow it) does the elementwise test run."""
    if t.dtype == torch.bfloat16:
        return bool(torch.isfinite(t).all())
    a = t.numpy().reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.dot(a, a))):
            return True
    return bool(np.isfinite(a).all())


def pack(msg: BaseModel) -> bytes:
    """Serialize a message model to msgpack bytes (tensors as raw bytes)."""
    fields = {k: getattr(msg, k) for k in type(msg).model_fields}
    body: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "weights":
            body[key] = {str(n): encode_tensor(t, str(n)) for n, t in value.items()}
        elif isinstance(value, BaseModel):
            body[key] = value.model_dump(mode="json")
        else:
            body[key] = _plain(value)
    body["kind"] = type(msg).__name__
    return msgpack.packb(body, use_bin_type=True)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class _Reader:
    """A file-like ``read`` over any bytes-like object, copying only what is read (``io.BytesIO``
    copies a ``memoryview`` or ``bytearray`` whole before the first read)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else self._pos + n
        chunk = bytes(self._view[self._pos:end])
        self._pos += len(chunk)
        return chunk


def tensor_count(data: bytes | bytearray | memoryview) -> int | None:
    """How many tensors a payload's ``weights`` map holds, read from its header without decoding
    anything else; None when there is no such map (the full decoder then names the problem)."""
    return tensor_data_bytes(memoryview(data), lambda count: True)[0]  # True: stop at the header


META_BYTES_PER_TENSOR = 1024  # a tensor's name, dtype and shape: what its entry may add to a message's metadata
DEFAULT_META_BYTES = 1 << 20  # a message's bytes outside tensor data, unless its class says (``WIRE_META_BYTES``)
_KEY_BYTES = 256  # the longest field name or tensor-entry key the envelope walk reads; a longer one ends it
_READ_OVER = 16 * 1024  # the walk reads tensor data this small instead of jumping over it
_WALK_FIELDS = 64  # a message or tensor entry with more fields than this is not one pack wrote


def tensor_data_bytes(view: memoryview, on_count: Callable[[int], bool | None] | None = None
                      ) -> tuple[int | None, int]:
    """(tensor count, bytes of tensor data) of a payload as ``pack`` writes it, read from its headers.

    Everything but the tensors' ``data`` bins is skipped at C speed without building objects, and
    each big bin is jumped over, never read. ``on_count(count)`` runs as soon as the ``weights``
    header is read; a true result ends the walk there, and so does a ``WireError`` it raises
    (millions of tiny tensors are never walked). The walk stops at the first thing that is not as
    ``pack`` writes it (a map of more than ``_WALK_FIELDS`` fields, a key over ``_KEY_BYTES``, a
    ``data`` that is not a bin, truncation): the bins found so far are what it returns, so the rest
    counts as metadata.
    Count None: no ``weights`` map.
    """
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    count: int | None = None
    data = 0
    base = 0
    try:
        unpacker = _walker(view, 0)
        fields = unpacker.read_map_header()
        for _ in range(fields if fields <= _WALK_FIELDS else 0):
            if unpacker.unpack() != "weights":
                unpacker.skip()
                continue
            count = unpacker.read_map_header()
            if on_count is not None and on_count(count):
                return count, data
            for _ in range(count):
                unpacker.skip()  # the tensor's name
                entries = unpacker.read_map_header()
                if entries > _WALK_FIELDS:
                    return count, data
                for _ in range(entries):
                    if unpacker.unpack() != "data":
                        unpacker.skip()
                        continue
                    at = base + unpacker.tell()
                    width = _BIN_WIDTH.get(view[at]) if at < len(view) else None
                    if width is None:
                        return count, data
                    lo = at + 1 + width
                    hi = lo + int.from_bytes(view[at + 1:lo], "big")
                    if hi > len(view):
                        return count, data
                    data += hi - lo
                    if hi - lo <= _READ_OVER:
                        unpacker.skip()  # reading a small bin costs less than a new unpacker past it
                    else:
                        base, unpacker = hi, _walker(view, hi)
    except WireError:
        raise
    except Exception:  # noqa: BLE001 - not as pack writes it: the rest counts as metadata
        pass
    return count, data


def _walker(view: memoryview, start: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(_Reader(view[start:]), raw=False, strict_map_key=True, read_size=1 << 14,
                            max_buffer_size=max(1 << 20, len(view) - start), max_str_len=_KEY_BYTES)


def meta_cap(cls: type | None, count: int | None) -> int:
    """The bytes a ``cls`` message of ``count`` tensors may carry outside its tensor data:
    ``WIRE_META_BYTES`` (``DEFAULT_META_BYTES`` for a class without one) + ``META_BYTES_PER_TENSOR`` each."""
    return getattr(cls, "WIRE_META_BYTES", DEFAULT_META_BYTES) + META_BYTES_PER_TENSOR * (count or 0)


def check_meta_bytes(cls: type, size: int, count: int | None, data: int) -> None:
    """``WireError`` when a ``cls`` payload of ``size`` bytes has more outside its tensor data than
    ``meta_cap`` allows: millions of tiny objects in a metrics map or a list cost seconds and
    gigabytes to decode, whatever the payload's size."""
    cap = meta_cap(cls, count)
    if size - data > cap:
        raise WireError(f"{cls.__name__} has {size - data:,} bytes outside its tensor data, over the cap of "
                        f"{cap:,} ({META_BYTES_PER_TENSOR:,} per tensor included)")


def check_tensor_count(count: int | None, tensors: int | None, max_tensors: int) -> None:
    """``WireError`` when a payload's tensor count (None: unknown yet) is over ``max_tensors`` or
    differs from the reference model's ``tensors``."""
    if count is not None and count > max_tensors:
        raise WireError(f"weights has {count} tensors, more than the limit of {max_tensors}")
    if count is not None and tensors is not None and count != tensors:
        raise WireError(f"weights has {count} tensors, the global model has {tensors} (tensor count)")


def unpack(data: bytes | bytearray | memoryview, cls: type[M], *,
           max_bytes: int = DEFAULT_MAX_BYTES, tensors: int | None = None,
           max_tensors: int = DEFAULT_MAX_TENSORS) -> M:
    """Decode ``data`` into an instance of ``cls``; every failure is a ``WireError``.

    Cheap checks run before anything is decoded: the size; the number of tensors in the
    ``weights`` map (at most ``max_tensors``; exactly ``tensors`` when given, e.g. the reference
    model's count); and the bytes outside tensor data (``check_meta_bytes``). A payload of
    millions of tiny tensors, or of millions of metrics, is refused in milliseconds instead of
    being parsed.
    """
    count = None
    if isinstance(data, bytes | bytearray | memoryview) and len(data) <= max_bytes:
        view = memoryview(data).cast("B")
        tensor_bytes = 0
        if "weights" in cls.model_fields:
            count, tensor_bytes = tensor_data_bytes(view, lambda n: check_tensor_count(n, tensors, max_tensors))
        check_meta_bytes(cls, len(view), count, tensor_bytes)
    try:
        return _unpack(data, cls, max_bytes, count)
    except WireError:
        raise
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        raise WireError(f"invalid {cls.__name__}: {where}: {first.get('msg')}") from None
    except Exception as exc:  # noqa: BLE001 - the codec's contract: only WireError escapes
        raise WireError(f"malformed {cls.__name__} payload: {type(exc).__name__}: {exc}") from None


_BIN_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32: bytes of the length that follows the type
VIEW_BYTES_PER_TENSOR = 64 * 1024  # from this average tensor size on, tensor data is viewed, not copied


def _unpacker(view: memoryview, start: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(_Reader(view[start:]), raw=False, strict_map_key=True, read_size=1 << 14,
                            max_buffer_size=max(1 << 20, len(view) - start))


def _unpack_viewing(data: bytes | bytearray | memoryview) -> dict | None:
    """``msgpack.unpackb(data)`` for a payload as ``pack`` writes it, except that each tensor's ``data``
    is a read-only view of ``data`` instead of a copy (the tensor then keeps the payload alive).

    None (the caller decodes the ordinary way, which also names any problem) for anything else:
    a ``data`` that is not a bin, a truncated or malformed document, bytes after it — and a payload
    that is mostly not tensor data, whose views would keep all of it alive for a few tensor bytes."""
    view = memoryview(data).toreadonly()
    viewed = 0
    try:
        base, unpacker = 0, _unpacker(view, 0)
        body: dict = {}
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if not isinstance(key, str):  # what strict_map_key refuses or allows is unpackb's to say
                return None
            if key != "weights":
                body[key] = unpacker.unpack()
                continue
            weights: dict = {}
            for _ in range(unpacker.read_map_header()):
                name, tensor = unpacker.unpack(), {}
                for _ in range(unpacker.read_map_header()):
                    field = unpacker.unpack()
                    if not isinstance(name, str) or not isinstance(field, str):
                        return None
                    if field != "data":
                        tensor[field] = unpacker.unpack()
                        continue
                    at = base + unpacker.tell()
                    width = _BIN_WIDTH.get(view[at]) if at < len(view) else None
                    if width is None:
                        return None
                    lo = at + 1 + width
                    hi = lo + int.from_bytes(view[at + 1:lo], "big")
                    if lo > len(view) or hi > len(view):
                        return None
                    tensor[field] = view[lo:hi]
                    viewed += hi - lo
                    base, unpacker = hi, _unpacker(view, hi)  # resume after the bin, never reading it
                weights[name] = tensor
            body[key] = weights
        return body if base + unpacker.tell() == len(view) and 2 * viewed >= len(view) else None
    except Exception:  # noqa: BLE001 - malformed: the ordinary decoder raises the WireError that names it
        return None


def _unpack(data: Any, cls: type[M], max_bytes: int, tensors: int | None = None) -> M:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"payload must be bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    body = None
    if tensors and "weights" in cls.model_fields and len(data) >= VIEW_BYTES_PER_TENSOR * tensors:
        body = _unpack_viewing(data)
    try:
        if body is None:
            body = msgpack.unpackb(data, raw=False, strict_map_key=True)  # any bytes-like: no copy of a view
    except Exception as exc:  # noqa: BLE001
        raise WireError(f"not a msgpack document: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise WireError(f"payload must be a msgpack map, not {type(body).__name__}")
    version = body.get("schema_version")
    if version != SCHEMA_VERSION:
        raise WireError(f"unknown schema version {version!r} (this build speaks "
                        f"{SCHEMA_VERSION})")
    kind = body.pop("kind", None)
    if kind != cls.__name__:
        raise WireError(f"expected a {cls.__name__}, got kind {kind!r}")
    if "weights" in cls.model_fields:
        weights = body.get("weights")
        if not isinstance(weights, dict):
            raise WireError("weights must be a map of name -> tensor")
        body["weights"] = {str(n): decode_tensor(t, str(n)) for n, t in weights.items()}
    return cls.model_validate(body)
