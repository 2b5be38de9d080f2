"""Straggler profiles: a small grammar shared by ``fedwb agent`` and ``fedwb sim``.

``SPEC`` is comma-separated ``key=value`` items:

* ``slow=FRACTIONxFACTOR`` -- that fraction of agents trains FACTOR times slower
  (``slow=0.3x4``);
* ``delay=DIST`` -- seconds before each publish: ``fixed:S``, ``uniform:A:B``,
  ``lognormal:MU:SIGMA`` (of the underlying normal), ``exp:MEAN``;
* ``drop=P`` -- each round, each agent skips publishing with probability P;
* ``crash=P`` -- each round, each agent crashes with probability P and rejoins after
  ``rejoin=S`` seconds (default 2).

Example: ``slow=0.3x4,delay=lognormal:-1.5:0.5,drop=0.1,crash=0.05``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

Sampler = Callable[[random.Random], float]


def parse_delay(spec: str) -> Sampler:
    """A sampler of non-negative seconds from ``fixed:S``, ``uniform:A:B``, ``lognormal:MU:SIGMA``, ``exp:M``."""
    kind, _, rest = spec.partition(":")
    try:
        args = [float(a) for a in rest.split(":")] if rest else []
    except ValueError:
        raise ValueError(f"bad delay {spec!r}: numbers expected after {kind}:") from None
    if kind == "fixed" and len(args) == 1 and args[0] >= 0:
        return lambda rng, s=args[0]: s
    if kind == "uniform" and len(args) == 2 and 0 <= args[0] <= args[1]:
        return lambda rng, a=args[0], b=args[1]: rng.uniform(a, b)
    if kind == "lognormal" and len(args) == 2 and args[1] >= 0:
        return lambda rng, mu=args[0], sigma=args[1]: rng.lognormvariate(mu, sigma)
    if kind == "exp" and len(args) == 1 and args[0] > 0:
        return lambda rng, m=args[0]: rng.expovariate(1.0 / m)
    raise ValueError(f"bad delay {spec!r}: use fixed:S, uniform:A:B (A<=B), lognormal:MU:SIGMA or exp:MEAN")


@dataclass(frozen=True)
class StragglerSpec:
    slow_fraction: float = 0.0
    slow_factor: float = 1.0
    delay: str | None = None
    drop: float = 0.0
    crash: float = 0.0
    rejoin: float = 2.0

    def agent_knobs(self, index: int, n_agents: int) -> dict[str, object]:
        """The agent options for agent ``index`` of ``n_agents`` (the first ones are the slow ones)."""
        slow = index < math.ceil(self.slow_fraction * n_agents - 1e-9)
        return {"slowdown": self.slow_factor if slow else 1.0, "delay": self.delay, "drop": self.drop,
                "crash": self.crash, "rejoin_after": self.rejoin}


def _prob(key: str, value: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise ValueError(f"bad {key}={value!r}: a probability in [0, 1] expected") from None
    if not 0 <= p <= 1:
        raise ValueError(f"bad {key}={value!r}: a probability in [0, 1] expected")
    return p


def parse_stragglers(spec: str | None) -> StragglerSpec:
    """Parse the grammar in the module docstring; ``ValueError`` with the offending item."""
    if not spec or spec.strip() in ("", "none"):
        return StragglerSpec()
    fields: dict[str, object] = {}
    for item in spec.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise ValueError(f"bad straggler item {item!r}: use key=value (slow, delay, drop, crash, rejoin)")
        if key == "slow":
            frac, x, factor = value.partition("x")
            try:
                f, k = float(frac), float(factor)
            except ValueError:
                raise ValueError(f"bad slow={value!r}: use FRACTIONxFACTOR, e.g. 0.3x4") from None
            if not (0 <= f <= 1 and k >= 1 and x):
                raise ValueError(f"bad slow={value!r}: fraction in [0, 1], factor >= 1")
            fields["slow_fraction"], fields["slow_factor"] = f, k
        elif key == "delay":
            parse_delay(value)
            fields["delay"] = value
        elif key in ("drop", "crash"):
            fields[key] = _prob(key, value)
        elif key == "rejoin":
            try:
                fields["rejoin"] = float(value)
            except ValueError:
                raise ValueError(f"bad rejoin={value!r}: seconds expected") from None
        else:
            raise ValueError(f"unknown straggler key {key!r}: use slow, delay, drop, crash, rejoin")
    return StragglerSpec(**fields)
