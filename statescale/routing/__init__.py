"""Sticky routing: which instance owns a session.

* :class:`~statescale.routing.ring.Ring`: rendezvous hashing over named, weighted nodes
  (statescale's own routers);
* :class:`~statescale.routing.ring.NginxRing`, :class:`~statescale.routing.ring.HAProxyRing`:
  exact replicas of how nginx ``hash ... consistent`` and HAProxy ``hash-type consistent``
  choose a server, so an app can predict where those balancers send a session;
* :func:`~statescale.routing.minting.owned_id_factory`: mints session IDs a node owns.

Every router hashes the session ID alone (the cookie value up to its first ``.``), never
the signature, so rotating the signing keys does not move anybody.
"""

from __future__ import annotations

from .ring import HAProxyRing as HAProxyRing
from .ring import NginxRing as NginxRing
from .ring import Ring as Ring
from .ring import routing_key as routing_key
