"""Shared fixtures: a real MQTT broker per test (mosquitto or the embedded amqtt)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():  # the Triton solver's kernels run in Triton's interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from broker import BrokerProcess, find_mosquitto, start_broker  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_mosquitto() -> str:
    """Path of mosquitto; fails under CI=true when missing, skips otherwise."""
    path = find_mosquitto()
    if path is None:
        if IN_CI:
            pytest.fail("mosquitto is required under CI=true (.ci/run installs it)")
        pytest.skip("mosquitto is not installed")
    return path


@pytest.fixture
def mosquitto() -> Iterator[BrokerProcess]:
    """A fresh mosquitto with the project's config on a free loopback port."""
    require_mosquitto()
    with start_broker(kind="mosquitto") as b:
        yield b


@pytest.fixture
def embedded_broker() -> Iterator[BrokerProcess]:
    """A fresh embedded (amqtt) broker on a free loopback port."""
    with start_broker(kind="embedded") as b:
        yield b


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """Each broker kind in turn."""
    if request.param == "mosquitto":
        require_mosquitto()
    with start_broker(kind=request.param) as b:
        yield b


@pytest.fixture
def job() -> str:
    """A job name of its own for each test, so topics never collide."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def mosquitto_bin() -> None:
    """Require the mosquitto binary (fail under CI=true, skip elsewhere)."""
    require_mosquitto()
