"""Child processes that end with the process that started them, even when it is killed with SIGKILL.

``fedwb sim`` (and ``broker.start_broker``'s embedded broker) start their children in sessions of
their own, so a Ctrl-C in a terminal reaches only the parent, which then stops them in order. A
parent killed with SIGKILL (an OOM kill, ``kill -9``, a CI timeout) cannot: its aggregator,
agents and broker used to run on, reparented to init, until their ``--rounds`` ran out.

The parent puts its pid in the child's environment (``env_for_child``); the child calls
``watch_parent()`` at start: a daemon thread compares ``os.getppid()`` with that pid twice a
second and, once they differ (the parent is gone and the child was reparented), sends the child
SIGTERM, so it stops as it does for an operator, and SIGKILL after ``GRACE_S`` if it has not.
The variable is removed from the child's environment, so the child's own children never take
the child for their parent's parent.

A child that is not ours (mosquitto) cannot watch: ``ends_with_us(cmd)`` prefixes its command with
util-linux's ``setpriv --pdeathsig TERM``, so the kernel sends it SIGTERM when the thread that
started it ends. That is the process's end only for the main thread, so a command started from
any other thread (or where ``setpriv`` is missing: not Linux, or a minimal image) is left as it is,
and such a child outlives a SIGKILLed parent as before.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

ENV = "FEDWB_PARENT_PID"
POLL_S = 0.5
GRACE_S = 20.0


def env_for_child() -> dict[str, str]:
    """The variable a child started by this process needs for ``watch_parent``."""
    return {ENV: str(os.getpid())}


def ends_with_us(cmd: list[str]) -> list[str]:
    """``cmd`` made to receive SIGTERM when this process ends (``setpriv --pdeathsig``), where it can be."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return cmd
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd]


def watch_parent() -> bool:
    """Stop this process when the parent named in ``FEDWB_PARENT_PID`` is gone; returns whether it watches.

    A missing or malformed variable means nobody asked: nothing happens.
    """
    raw = os.environ.pop(ENV, None)
    try:
        parent = int(raw) if raw is not None else 0
    except ValueError:
        return False
    if parent <= 1:
        return False
    threading.Thread(target=_watch, args=(parent, os.getppid() == parent), name="fedwb-lifeline",
                     daemon=True).start()
    return True


def _gone(parent: int, direct: bool) -> bool:
    """Whether the parent has exited: this process was reparented (``direct``: it was the parent's own
    child), or, started through something in between, no process has the parent's pid any more."""
    if direct:
        return os.getppid() != parent
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _watch(parent: int, direct: bool) -> None:
    while not _gone(parent, direct):
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)
