"""Operator errors (issue 15): one clear line naming the bad value, exit code 2, never a traceback."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from broker import BrokerProcess, free_port
from fedwb import executable
from schemas import Topics
from tests.mqtt_helpers import client

pytestmark = pytest.mark.timeout(240)
FEDWB = executable()


def _other_jobs_state(path: Path) -> Path:
    path.mkdir()
    save_file({"w": torch.zeros(2)}, str(path / "model-0.safetensors"))
    (path / "state.json").write_text(json.dumps({"job": "someone-else", "version": 0, "model": "model-0.safetensors"}))
    return path


def _broken_state(path: Path, state: str, model: bytes | None = None) -> Path:
    """A state dir whose state.json is ``state`` (and whose model-0 file is ``model``)."""
    path.mkdir()
    (path / "state.json").write_text(state)
    if model is not None:
        (path / "model-0.safetensors").write_bytes(model)
    return path


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _saved(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _credentials_only(path: Path) -> Path:
    """A --secure directory with gen-credentials' files and no TLS material."""
    subprocess.run([FEDWB, "broker", "gen-credentials", "--agents", "1", "--job", "j", "--out", str(path)],
                   check=True, capture_output=True, timeout=120)
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([FEDWB, *args], capture_output=True, text=True, timeout=120)


def test_bad_invocations_are_one_line_and_exit_2(tmp_path: Path) -> None:
    closed = f"mqtt://127.0.0.1:{free_port()}"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    agg = ["aggregator", "--broker", closed, "--task", "noop"]
    cases: dict[str, tuple[list[str], str]] = {
        "policy set, broker down": (["policy", "set", "fedavg", "--broker", closed], "cannot reach the broker"),
        "policy show, broker down": (["policy", "show", "--broker", closed], "cannot reach the broker"),
        "policy show, http url": (["policy", "show", "--broker", "http://127.0.0.1:1883"], "'http'"),
        "unknown task": (["aggregator", "--broker", closed, "--task", "bogus"], "'bogus'"),
        "no task": (["aggregator", "--broker", closed], "--task"),
        "missing init": (["aggregator", "--broker", closed, "--init", str(tmp_path / "nope.safetensors")],
                         "nope.safetensors"),
        "corrupt init": (["aggregator", "--broker", closed, "--init", str(_file(tmp_path / "junk.safetensors",
                                                                                b"junk"))],
                         "junk.safetensors: not a readable safetensors file"),
        "init with a nan": (["aggregator", "--broker", closed, "--init", str(_saved(tmp_path / "nan.safetensors", {
            "w": torch.tensor([1.0, float("nan")])}))], "NaN or infinite values in w"),
        "init without tensors": (["aggregator", "--broker", closed, "--init",
                                  str(_saved(tmp_path / "empty.safetensors", {}))], "no tensors"),
        "agent corrupt init": (["agent", "--broker", closed, "--task", "noop", "--init",
                                str(tmp_path / "junk.safetensors")], "not a readable safetensors file"),
        "missing config": ([*agg, "--config", str(tmp_path / "nope.toml")], "nope.toml"),
        "bad config": ([*agg, "--config", str(tmp_path / "bad.toml")], "bad.toml"),
        "other job's state": ([*agg, "--state-dir", str(_other_jobs_state(tmp_path / "other"))], "someone-else"),
        "unwritable state": ([*agg, "--state-dir", "/proc/fedwb-state"], "/proc/fedwb-state"),
        "corrupt state": ([*agg, "--state-dir", str(_broken_state(tmp_path / "corrupt", "{garbage"))],
                          "corrupt/state.json is not a readable fedwb state"),
        "state without its model": ([*agg, "--state-dir", str(_broken_state(
            tmp_path / "nomodel", '{"job": "fedwb", "version": 3, "model": "model-3.safetensors"}'))],
            "model-3.safetensors, the model of version 3"),
        "state with a broken model": ([*agg, "--state-dir", str(_broken_state(
            tmp_path / "badmodel", '{"job": "fedwb", "version": 0, "model": "model-0.safetensors"}', b"junk"))],
            "cannot be read"),
        "busy metrics port": ([*agg, "--metrics-port", str(port)], str(port)),
        "http url": (["aggregator", "--broker", "http://127.0.0.1:1883", "--task", "noop"], "'http'"),
        "huge reg": ([*agg, "--policy", "fedwb-sinkhorn", "--reg", "1e6"], "reg"),
        "quorum 0": ([*agg, "--quorum", "0"], "quorum"),
        "agent unknown task": (["agent", "--broker", closed, "--task", "bogus"], "'bogus'"),
        "agent http url": (["agent", "--broker", "http://x:1", "--task", "noop"], "'http'"),
        "public no-auth broker": (["broker", "--host", "0.0.0.0", "--port", str(free_port())], "--secure"),
        "bad credentials job": (["broker", "gen-credentials", "--job", "a/b", "--out", str(tmp_path / "s")], "a/b"),
        "evaluate unknown task": (["evaluate", "--broker", closed, "--task", "bogus"], "'bogus'"),
        "evaluate unwritable out": (["evaluate", "--broker", closed, "--task", "noop", "--out",
                                     "/proc/fedwb-nope/x.jsonl"], "/proc/fedwb-nope/x.jsonl"),
        "missing tls ca": ([*agg, "--tls-ca", str(tmp_path / "ca.pem")], "ca.pem"),
        "agent tls ca not a cert": (["agent", "--broker", closed, "--task", "noop", "--tls-ca",
                                     str(tmp_path / "bad.toml")], "TLS files"),
        "bad task option": ([*agg, "--task-option", "novalue"], "novalue"),
        "negative noop shape": ([*agg, "--task-option", "shapes=[[-1]]"], "[-1]"),
        "no noop shapes": ([*agg, "--task-option", "shapes=[]"], "[]"),
        "nan stop threshold": ([*agg, "--policy", "fedwb-sinkhorn", "--stop-threshold", "nan"], "finite"),
        "infinite dispersion": ([*agg, "--policy", "hybrid", "--dispersion-below", "inf"], "finite"),
        "signing key not a key": ([*agg, "--signing-key", str(tmp_path / "bad.toml")], "bad.toml"),
        "sim http broker": (["sim", "--task", "noop", "--broker", "http://x"], "http://x"),
        "sim fleet beyond memory": (["sim", "--task", "noop", "--agents", "100000", "--out", str(tmp_path / "s")],
                                    "--agents 100000 needs at least"),
        "secure dir without tls": (["broker", "--port", str(free_port()), "--secure", str(_credentials_only(
            tmp_path / "creds"))], "lacks tls/ca.crt, tls/server.crt, tls/server.key"),
    }
    if not torch.cuda.is_available():
        cases["cuda without a GPU"] = ([*agg, "--device", "cuda"], "cuda")
    (tmp_path / "bad.toml").write_text("quorum = [")
    try:
        with ThreadPoolExecutor(4) as pool:
            results = dict(zip(cases, pool.map(_run, [args for args, _ in cases.values()]), strict=True))
    finally:
        busy.close()
    for name, (_, needle) in cases.items():
        r = results[name]
        out = r.stdout + r.stderr
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 2, f"{name}: exit {r.returncode}\n{out}"
        assert "Traceback" not in out, f"{name}: traceback\n{out}"
        assert last.startswith("error:") and needle in last, f"{name}: {last!r}"


async def test_policy_set_without_an_aggregator_publishes_nothing(mosquitto: BrokerProcess, job: str) -> None:
    r = await asyncio.to_thread(_run, ["policy", "set", "fedavg", "--broker", mosquitto.url, "--job", job])
    assert r.returncode == 2 and "no running aggregator" in r.stderr and "Traceback" not in r.stderr
    async with client(mosquitto, "probe") as c:  # no retained command was left behind
        await c.subscribe(Topics(job).control, qos=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                async for m in c.messages:
                    pytest.fail(f"retained command left on the control topic: {m.payload!r}")


def test_a_late_socket_callback_prints_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """aiomqtt forwards paho's write interest with call_soon_threadsafe(add_writer, fd): a client
    that closed its socket first leaves a callback on a dead descriptor (seen at the end of a sim)."""
    import logging

    from schemas.connection import run_loop

    async def main(other_error: bool) -> None:
        s = socket.socket()
        fd = s.fileno()
        s.close()
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.add_writer, fd, lambda: None)
        if other_error:  # anything else still reaches asyncio's own handler
            loop.call_soon(lambda: 1 / 0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run_loop(main(False))
    assert not caplog.records
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run_loop(main(True))
    assert any("ZeroDivisionError" in (r.exc_text or "") or r.exc_info and r.exc_info[0] is ZeroDivisionError
               for r in caplog.records)
    assert not any("Bad file descriptor" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


@pytest.mark.parametrize(("spec", "shapes"), [(None, [[1000, 1000]]), (10, [[10]]), ("3x4,5", [[3, 4], [5]]),
                                              ([[2, 3]], [[2, 3]])])
def test_noop_shapes_in_every_form_an_option_can_take(spec: object, shapes: list[list[int]]) -> None:
    from edge_agent.tasks.noop import parse_shapes

    assert parse_shapes(spec) == shapes


@pytest.mark.parametrize("spec", [True, 2.5, {"a": 1}, [], [[0]], [[2, -1]], [5], [[True]], "0", "", "3x", "axb"])
def test_bad_noop_shapes_are_a_value_error_naming_them(spec: object) -> None:
    from edge_agent.tasks.noop import parse_shapes

    with pytest.raises(ValueError, match="bad noop shape"):
        parse_shapes(spec)


def test_the_sim_refuses_a_fleet_beyond_memory_before_starting_anything() -> None:
    from sim.runner import AGENT_MB, check_room

    check_room(10, available_mb=10 * AGENT_MB)  # fits exactly
    with pytest.raises(ValueError, match=r"--agents 11 needs at least 1\.9 GiB .* 1\.8 GiB are available"):
        check_room(11, available_mb=10 * AGENT_MB)
