"""Task plugins. ``get_task(name, **options)`` builds one; ``TASKS`` lists them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge_agent.tasks.base import StateDict, Task, TrainResult


def _noop(**kw: Any) -> Task:
    from edge_agent.tasks.noop import NoopTask

    return NoopTask(**kw)


def _mnist(**kw: Any) -> Task:
    from edge_agent.tasks.mnist import MnistTask

    return MnistTask(**kw)


def _cartpole(**kw: Any) -> Task:
    from edge_agent.tasks.cartpole import CartPoleTask

    return CartPoleTask(**kw)


TASKS: dict[str, Callable[..., Task]] = {"mnist": _mnist, "cartpole": _cartpole, "noop": _noop}


def get_task(name: str, **options: Any) -> Task:
    """The task ``name`` built with ``options``; ``ValueError`` naming the known ones."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: use one of {', '.join(TASKS)}") from None
    return factory(**options)


__all__ = ["TASKS", "StateDict", "Task", "TrainResult", "get_task"]
