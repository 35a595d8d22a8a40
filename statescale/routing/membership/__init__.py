"""Who is in the fleet, and how changes arrive: a registry that instances register in
and every router and node follows.

* :mod:`.base`: what a registry does; :mod:`.registry`: :func:`open_registry` (the URL
  picks one);
* :mod:`.redis` and :mod:`.etcd`: the two live registries; :mod:`.file`: a static one;
* :mod:`.follow`: :class:`Heartbeat` (an instance keeps itself registered) and
  :class:`Follower` (a process follows the membership);
* :mod:`.fleet`: :class:`Fleet`, a node's ring and the rings it replaced. Pure.
"""

from __future__ import annotations

from .base import NameTaken as NameTaken
from .base import Registry as Registry
from .base import RegistryUnavailable as RegistryUnavailable
from .base import Replaced as Replaced
from .fleet import Fleet as Fleet
from .follow import DEFAULT_TTL as DEFAULT_TTL
from .follow import Follower as Follower
from .follow import Heartbeat as Heartbeat
from .follow import wait_for_name as wait_for_name
from .registry import open_registry as open_registry
