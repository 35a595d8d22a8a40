"""Who is in the fleet, and how changes arrive: a registry that instances register in
and every router and node follows.

* :mod:`.registry`: what a registry does, :func:`open_registry` (the URL picks one),
  and the static file registry;
* :mod:`.redis` and :mod:`.etcd`: the two live registries;
* :mod:`.follow`: :class:`Heartbeat` (an instance keeps itself registered) and
  :class:`Follower` (a process follows the membership);
* :mod:`.fleet`: :class:`Fleet`, a node's ring and the rings it replaced. Pure.
"""

from __future__ import annotations

from .fleet import Fleet as Fleet
from .follow import DEFAULT_TTL as DEFAULT_TTL
from .follow import Follower as Follower
from .follow import Heartbeat as Heartbeat
from .registry import Registry as Registry
from .registry import RegistryUnavailable as RegistryUnavailable
from .registry import open_registry as open_registry
