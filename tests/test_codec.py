"""The wire codec: round trips of every dtype, and only WireError on bad input."""

from __future__ import annotations

import math
import random

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import schemas
from schemas import AggregatorStatus, GlobalModel, ModelUpdate, PolicyCommand, PolicySpec, WireError


def update(weights: dict, **kw) -> ModelUpdate:
    return ModelUpdate(job="j", agent_id="a1", base_version=0, num_samples=10, weights=weights, **kw)


@pytest.mark.parametrize("dtype", list(schemas.DTYPES.values()))
def test_every_dtype_round_trips_bit_exact(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        t = torch.rand(3, 4, generator=g) > 0.5
    elif dtype.is_floating_point:
        t = torch.randn(3, 4, generator=g).to(dtype)
    else:
        t = torch.randint(-100 if dtype != torch.uint8 else 0, 100, (3, 4), generator=g).to(dtype)
    back = schemas.unpack(schemas.pack(update({"t": t, "s": t[0, 0]})), ModelUpdate)
    assert back.weights["t"].dtype == dtype and back.weights["t"].shape == t.shape
    assert torch.equal(back.weights["t"].view(torch.uint8), t.contiguous().view(torch.uint8))
    assert back.weights["s"].shape == ()


def test_ten_million_elements_round_trip() -> None:
    t = torch.randn(10_000_000)
    back = schemas.unpack(schemas.pack(update({"big": t})), ModelUpdate)
    assert torch.equal(back.weights["big"], t)


def test_numpy_input_and_noncontiguous_tensor() -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian input is converted
    t = torch.arange(12.0).reshape(3, 4).t()
    back = schemas.unpack(schemas.pack(update({"a": a, "t": t})), ModelUpdate)
    assert torch.equal(back.weights["a"], torch.arange(12.0).reshape(3, 4))
    assert torch.equal(back.weights["t"], t)


def test_every_message_round_trips() -> None:
    spec = PolicySpec(name="hybrid", switch_after=3)
    msgs = [
        GlobalModel(job="j", version=4, policy="fedwb", weights={"w": torch.ones(2)},
                    contributors=["a", "b"], info={"x": 1.5}),
        PolicyCommand(job="j", policy=spec),
        AggregatorStatus(job="j", version=3, policy=spec, rejected={"nan": 2}),
        schemas.AgentStatus(job="j", agent_id="a", state="offline"),
    ]
    for m in msgs:
        back = schemas.unpack(schemas.pack(m), type(m))
        assert back.model_dump(exclude={"weights"}) == m.model_dump(exclude={"weights"})


@pytest.mark.parametrize("bad,reason", [
    (torch.tensor([1.0, math.nan]), "NaN"),
    (torch.tensor([1.0, math.inf]), "NaN or Inf"),
])
def test_non_finite_weights_rejected(bad: torch.Tensor, reason: str) -> None:
    with pytest.raises(WireError, match="NaN"):
        schemas.unpack(schemas.pack(update({"w": bad})), ModelUpdate)


def _body() -> dict:
    return msgpack.unpackb(schemas.pack(update({"w": torch.ones(2, 3)})), raw=False)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b.update(schema_version=99), "unknown schema version 99"),
    (lambda b: b.update(kind="GlobalModel"), "expected a ModelUpdate"),
    (lambda b: b["weights"]["w"].update(shape=[4, 4]), "needs 64 bytes, got 24"),
    (lambda b: b["weights"]["w"].update(dtype="complex64"), "unsupported dtype"),
    (lambda b: b["weights"]["w"].update(shape=[-2, -3]), "invalid shape"),
    (lambda b: b.update(base_version=-1), "base_version"),
    (lambda b: b.update(num_samples="many"), "num_samples"),
    (lambda b: b.update(extra_field=1), "extra_field"),
    (lambda b: b.update(weights=[1, 2]), "weights must be a map"),
])
def test_malformed_fields_raise_wire_error_with_reason(mutate, match: str) -> None:
    body = _body()
    mutate(body)
    with pytest.raises(WireError, match=match):
        schemas.unpack(msgpack.packb(body, use_bin_type=True), ModelUpdate)


def test_size_limit() -> None:
    data = schemas.pack(update({"w": torch.zeros(1000)}))
    with pytest.raises(WireError, match="exceeds the limit"):
        schemas.unpack(data, ModelUpdate, max_bytes=1000)
    assert schemas.unpack(data, ModelUpdate, max_bytes=len(data)).num_samples == 10


def test_fuzz_only_wire_error_escapes() -> None:
    rng = random.Random(7)
    valid = schemas.pack(update({"w": torch.randn(4, 5), "i": torch.arange(3)}))
    payloads: list[bytes] = []
    for _ in range(1000):
        payloads.append(rng.randbytes(rng.randint(0, 300)))
        payloads.append(valid[: rng.randint(0, len(valid) - 1)])
        buf = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        payloads.append(bytes(buf))
    rejected = 0
    for p in payloads:
        try:
            schemas.unpack(p, ModelUpdate)
        except WireError:
            rejected += 1
    assert rejected >= 2000  # every random and truncated payload; most mutations


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
        elements={"allow_nan": False, "allow_infinity": False},
    ),
    agent=st.text(st.characters(blacklist_characters="+#/\x00"), min_size=1, max_size=20),
    version=st.integers(0, 2**40),
)
def test_round_trip_property(arr: np.ndarray, agent: str, version: int) -> None:
    msg = ModelUpdate(job="j", agent_id=agent, base_version=version, num_samples=1,
                      weights={"x": arr}, metrics={"loss": 0.5})
    back = schemas.unpack(schemas.pack(msg), ModelUpdate)
    assert back.agent_id == agent and back.base_version == version
    np.testing.assert_array_equal(back.weights["x"].numpy(), arr)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_property(data: bytes) -> None:
    with pytest.raises(WireError):
        schemas.unpack(data, ModelUpdate)


def test_decoded_tensors_wrap_the_payload_without_a_second_copy_and_fuse_without_writing_to_it() -> None:
    """decode_tensor wraps the bytes msgpack made (no bytearray copy); fusion builds new tensors, so an update's
    tensors are never written to (they would write into an immutable bytes object)."""
    from aggregator.fusion import fuse_with_report

    w = {"w": torch.randn(1000), "b": torch.randn(4, 5)}
    payload = schemas.pack(ModelUpdate(job="j", agent_id="a", base_version=0, num_samples=1, weights=w))
    updates = [schemas.unpack(payload, ModelUpdate).weights for _ in range(3)]
    before = [{k: t.clone() for k, t in u.items()} for u in updates]
    for method in ("fedavg", "fedwb-sinkhorn", "median", "trimmed-mean"):
        fuse_with_report(updates, [1.0, 2.0, 3.0], method, max_iter=5, warn=False)
    for u, b in zip(updates, before, strict=True):
        assert all(torch.equal(u[k], b[k]) for k in b)


def _outcome(data, cls=ModelUpdate):
    """What ``unpack`` makes of ``data``: the decoded fields and tensors, or the WireError's text."""
    try:
        msg = schemas.unpack(data, cls)
    except WireError as exc:
        return ("error", str(exc))
    return ("ok", {k: v for k, v in msg.model_dump(exclude={"weights"}).items()},
            {n: (t.dtype, tuple(t.shape), t.numpy().tobytes()) for n, t in msg.weights.items()})


@pytest.mark.parametrize("as_", [bytes, bytearray, lambda b: memoryview(bytearray(b)).toreadonly()])
def test_big_tensors_are_views_of_the_payload_and_decode_the_same(as_, monkeypatch: pytest.MonkeyPatch) -> None:
    """From VIEW_BYTES_PER_TENSOR per tensor on, tensor data is a view of the payload, not msgpack's copy:
    the same message as the copying decoder, and the tensor keeps the payload alive."""
    w = {"a": torch.randn(40_000), "b": torch.arange(20_000, dtype=torch.int64).reshape(100, 200),
         "c": torch.randn(3)}
    payload = as_(schemas.pack(update(w, metrics={"loss": 0.25})))
    copied = _outcome(payload)
    monkeypatch.setattr(schemas.codec, "VIEW_BYTES_PER_TENSOR", 1)
    assert schemas.codec._unpack_viewing(payload) is not None  # the viewing path decodes this one
    assert _outcome(payload) == copied
    back = schemas.unpack(payload, ModelUpdate)
    del payload
    junk = [bytearray(b"\xff" * 400_000) for _ in range(8)]  # reuse of freed memory would show
    assert all(torch.equal(back.weights[k], w[k]) for k in w) and len(junk) == 8


def test_viewing_decoder_agrees_with_unpackb_on_every_mutation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncations, flipped bytes, trailing bytes, non-string keys, a data field that is not a bin: the viewing
    decoder accepts exactly what the copying one accepts, with the same result or the same error."""
    rng = random.Random(11)
    valid = schemas.pack(update({"w": torch.randn(300), "i": torch.arange(200)}))
    odd = msgpack.packb({**msgpack.unpackb(valid), 7: 1})  # an int key: unpackb's strict_map_key says no
    body = msgpack.unpackb(valid)
    body["weights"]["w"]["data"] = "not a bin"
    payloads = [valid + b"\x00", odd, msgpack.packb(body)]
    for _ in range(400):
        payloads.append(valid[: rng.randint(0, len(valid) - 1)])
        buf = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        payloads.append(bytes(buf))
    copied = [_outcome(p) for p in payloads]
    monkeypatch.setattr(schemas.codec, "VIEW_BYTES_PER_TENSOR", 1)
    viewed = [_outcome(p) for p in payloads]
    assert viewed == copied
    assert sum(o[0] == "error" for o in viewed) >= 400  # the corpus does reach the error paths


def test_a_payload_that_is_mostly_not_tensors_is_copied_not_viewed() -> None:
    """Views keep the whole payload alive: a payload whose tensor data is under half of it (here a 300 KB string
    beside a 100 KB tensor) is decoded the copying way, so a few tensor bytes never pin a big payload."""
    body = msgpack.unpackb(schemas.pack(update({"w": torch.randn(25_000)})))
    body["job"] = "j" * 300_000
    assert schemas.codec._unpack_viewing(msgpack.packb(body)) is None
    body["job"] = "j"
    assert schemas.codec._unpack_viewing(msgpack.packb(body)) is not None


def test_what_the_aggregator_publishes_reads_with_fields_a_newer_one_added_and_what_it_takes_does_not() -> None:
    """An older reader of a status, an update verdict or an agent status ignores a field it does not know;
    an update or a command with an unknown field is still refused (the aggregator's inputs stay strict)."""
    status = msgpack.unpackb(schemas.pack(schemas.AggregatorStatus(job="j", version=3)), raw=False)
    read = schemas.unpack(msgpack.packb({**status, "added_later": {"x": 1}}), schemas.AggregatorStatus)
    assert read.version == 3
    ack = msgpack.unpackb(schemas.pack(schemas.UpdateAck(job="j", agent_id="a", update_id="u", outcome="accepted")),
                          raw=False)
    assert schemas.unpack(msgpack.packb({**ack, "added_later": 1}), schemas.UpdateAck).update_id == "u"
    agent = msgpack.unpackb(schemas.pack(schemas.AgentStatus(job="j", agent_id="a")), raw=False)
    assert schemas.unpack(msgpack.packb({**agent, "added_later": 1}), schemas.AgentStatus).agent_id == "a"
    body = msgpack.unpackb(schemas.pack(ModelUpdate(job="j", agent_id="a", base_version=0, num_samples=1,
                                                    weights={"w": torch.zeros(2)})), raw=False)
    with pytest.raises(WireError, match="added_later"):
        schemas.unpack(msgpack.packb({**body, "added_later": 1}), ModelUpdate)
    cmd = msgpack.unpackb(schemas.pack(schemas.PolicyCommand(job="j", policy=schemas.PolicySpec())), raw=False)
    with pytest.raises(WireError, match="added_later"):
        schemas.unpack(msgpack.packb({**cmd, "added_later": 1}), schemas.PolicyCommand)
