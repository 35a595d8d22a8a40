"""The balancers statescale routes like, one module each, and the registry that the
configuration, the CLI, the router and the rig read.

Each module here (but those starting with ``_``) defines ``BALANCER``, a
:class:`~statescale.routing.balancers._base.Balancer`: its name, an exact replica of its
ring, its configuration writer and the command that runs it. Adding a balancer is one
new module and a test; :func:`get` and :func:`names` find it.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from ...exceptions import ConfigError
from ._base import BackendRing as BackendRing
from ._base import Balancer as Balancer


@cache
def _registry() -> dict[str, Balancer]:
    found: dict[str, Balancer] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        balancer = importlib.import_module(f"{__name__}.{info.name}").BALANCER
        found[balancer.name] = balancer
    return dict(sorted(found.items()))


def names() -> tuple[str, ...]:
    """Every balancer's name, sorted."""
    return tuple(_registry())


def get(name: str) -> Balancer:
    """The balancer called ``name``; ``ConfigError`` naming the choices otherwise."""
    balancer = _registry().get(name)
    if balancer is None:
        raise ConfigError(f"unknown balancer {name!r}: use one of {', '.join(names())}")
    return balancer
