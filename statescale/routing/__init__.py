"""Sticky routing: which instance owns a session.

* :class:`~statescale.routing.ring.Ring`: rendezvous hashing over named, weighted nodes
  (statescale's own routers);
* :mod:`statescale.routing.balancers`: one module per balancer statescale routes like
  (its own router, nginx, HAProxy), each with an exact replica of its ring
  (:class:`NginxRing`, :class:`HAProxyRing`), its configuration writer and the command
  that runs it; ``balancers.get(name).ring(backends)`` answers with backend names;
* :class:`~statescale.routing.backends.Backend`: one member, and the one parser of
  ``NAME=HOST:PORT[*WEIGHT]`` specs and backends files;
* :func:`~statescale.routing.minting.owned_id_factory`: mints session IDs a node owns.

Every router hashes the session ID alone (:func:`statescale.signing.routing_key`), never
the signature, so rotating the signing keys does not move anybody.
"""

from __future__ import annotations

from ..signing import routing_key as routing_key
from .backends import Backend as Backend
from .balancers.haproxy import HAProxyRing as HAProxyRing
from .balancers.nginx import NginxRing as NginxRing
from .ring import Ring as Ring
