"""fedwb.lifeline: a child told its parent's pid stops when that parent is gone, and its own children are
never told the wrong parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fedwb.lifeline import ENV

CHILD = ("import os, sys, time\n"
         "from fedwb.lifeline import watch_parent\n"
         "print(watch_parent(), os.environ.get('FEDWB_PARENT_PID'), flush=True)\n"
         "time.sleep(float(sys.argv[1]))\n")


def _child(parent: str | None, sleep: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if parent is not None:
        env[ENV] = parent
    return subprocess.run([sys.executable, "-c", CHILD, str(sleep)], env=env, capture_output=True, text=True,
                          timeout=60)


def test_a_live_parent_is_watched_and_the_variable_is_not_inherited() -> None:
    r = _child(str(os.getpid()), 0)
    assert r.returncode == 0 and r.stdout.split() == ["True", "None"]


@pytest.mark.parametrize("value", [None, "", "x", "1", "0"])
def test_no_or_a_meaningless_variable_watches_nothing(value: str | None) -> None:
    r = _child(value, 0)
    assert r.returncode == 0 and r.stdout.split()[0] == "False"


def test_a_parent_already_gone_stops_the_child_with_sigterm() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: no process has this pid now
    r = _child(str(gone.pid), 30)  # would sleep 30 s; ends within the first poll
    assert r.returncode == -signal.SIGTERM, r


STARTER = ("import sys, threading\n"
           "from broker import start_broker\n"
           "def start():\n"
           "    b = start_broker(kind='mosquitto')\n"
           "    print(b.proc.pid, flush=True)\n"
           "if sys.argv[1] == 'main':\n"
           "    start()\n"
           "else:\n"
           "    t = threading.Thread(target=start)\n"
           "    t.start()\n"
           "    t.join()\n"
           "sys.stdin.read()\n")


@pytest.mark.parametrize("thread", ["main", "other"])
def test_mosquitto_ends_with_a_sigkilled_starter_when_started_from_its_main_thread(
        mosquitto_bin: None, thread: str) -> None:
    """A broker started from the main thread dies with its starter (the kernel's parent-death signal);
    one started from another thread must not die with that thread, so it outlives a SIGKILL as before."""
    import psutil

    starter = subprocess.Popen([sys.executable, "-c", STARTER, thread], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    broker = psutil.Process(int(starter.stdout.readline()))
    try:
        assert broker.is_running() and "mosquitto" in broker.name()  # alive after its starting thread ended
        starter.kill()
        starter.wait()
        if thread == "main":
            broker.wait(timeout=15)  # raises psutil.TimeoutExpired if it outlives its starter
        else:
            with pytest.raises(psutil.TimeoutExpired):
                broker.wait(timeout=1)
    finally:
        if broker.is_running():
            broker.kill()
