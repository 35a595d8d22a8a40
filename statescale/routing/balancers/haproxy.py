"""HAProxy: ``balance hash`` over the session ID with ``hash-type consistent``, replicated
exactly.

The replica is HAProxy 2.6's ``hash-type consistent sdbm avalanche`` with the default
``hash-key id``: ``16 * weight`` nodes per server keyed ``full_hash(puid * 4096 + i)``;
a key's hash is ``full_hash(sdbm(key))`` and the closer of the nodes just after and just
before it wins (the one before on a tie). Each server's puid is the ``id`` the
configuration gives it, fixed by its name (:func:`server_id`): a server keeps its place
on the ring whatever joins or leaves beside it, so a membership change moves only the
sessions it must (numbered in declaration order, removing the first server would move
most of them). Pure: text in, text out.

For ``statescale lb-sync``, :func:`reloadable` adds what a seamless reload needs: the
master-worker mode, a pid file, and a stats socket that passes the listeners from the
old process to the new one (``expose-fd listeners``), so no connection is refused.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import xxhash

from ...exceptions import ConfigError
from ...signing import SEPARATOR
from ..backends import Backend
from ..ring import NodeRing
from ._base import Balancer, serving_pid

log = logging.getLogger("statescale")

_MAX_SOCKET = 97  # bytes HAProxy takes in a Unix socket's path

_M32 = 0xFFFFFFFF


def full_hash(a: int) -> int:
    """HAProxy's ``full_hash()``: Bob Jenkins' 32-bit avalanche, times 3221225473."""
    a = ((a + 0x7ED55D16) + (a << 12)) & _M32
    a = ((a ^ 0xC761C23C) ^ (a >> 19)) & _M32
    a = ((a + 0x165667B1) + (a << 5)) & _M32
    a = ((a + 0xD3A2646C) ^ (a << 9)) & _M32
    a = ((a + 0xFD7046C5) + (a << 3)) & _M32
    a = ((a ^ 0xB55A4F09) ^ (a >> 16)) & _M32
    return (a * 3221225473) & _M32


def sdbm(data: bytes) -> int:
    """HAProxy's ``hash_sdbm()``."""
    h = 0
    for c in data:
        h = (c + (h << 6) + (h << 16) - h) & _M32
    return h


def server_id(name: str) -> int:
    """The ``id`` (HAProxy's puid) the configuration gives server ``name``: from its
    name alone, below 2**20 so that ``puid * 4096 + node`` stays within 32 bits."""
    return 1 + xxhash.xxh32_intdigest(name.encode()) % 1_000_000


class HAProxyRing(NodeRing):
    """HAProxy ``balance hash <expr>`` + ``hash-type consistent sdbm avalanche``. Node
    names are the servers' names; each has the puid :func:`server_id` gives it (the
    configuration says so with ``id``). Weights are integers."""

    WEIGHT_SCALE = 16  # BE_WEIGHT_SCALE
    EWGHT_RANGE = 256 * 16  # SRV_EWGHT_RANGE

    def __init__(self, nodes: Mapping[str, float] | Iterable[str]) -> None:
        super().__init__(nodes)
        ids = {server_id(name): name for name in self.weights}
        if len(ids) != len(self.weights):
            raise ConfigError(
                f"two of {sorted(self.weights)} share an HAProxy server id; rename one"
            )
        keyed = []
        for server, weight in self.weights.items():
            puid = server_id(server)
            for node in range(int(weight) * self.WEIGHT_SCALE):
                keyed.append((full_hash(puid * self.EWGHT_RANGE + node), server))
        keyed.sort()
        self._keys = [k for k, _ in keyed]
        self._servers = [s for _, s in keyed]

    def key_hash(self, key: str) -> int:
        return full_hash(sdbm(key.encode()))

    def owner(self, key: str, down: Iterable[str] = ()) -> str:
        skip = set(down)
        keys, servers = self._keys, self._servers
        if skip:  # a server that is down has no nodes in HAProxy's tree
            pairs = [(k, s) for k, s in zip(keys, servers, strict=True) if s not in skip]
            if not pairs:
                raise LookupError("every server is down")
            keys, servers = [k for k, _ in pairs], [s for _, s in pairs]
        h = self.key_hash(key)
        nxt = bisect.bisect_left(keys, h)
        if nxt == len(keys):
            nxt = 0
        prv = nxt - 1  # -1 wraps to the last node, as eb32_last() does
        dp = (h - keys[prv]) & _M32
        dn = (keys[nxt] - h) & _M32
        return servers[prv] if dp <= dn else servers[nxt]


def usable(backends: Sequence[Backend]) -> list[Backend]:
    """``backends`` less each whose server id (from its name) an earlier one has:
    HAProxy refuses two servers with one id. A registry's followers, reading its
    members in one order, all leave out the same one, and keep following."""
    kept: dict[int, Backend] = {}
    for backend in backends:
        other = kept.setdefault(server_id(backend.name), backend)
        if other is not backend:
            log.warning(
                "statescale: %s and %s share an HAProxy server id; %s is left out of the "
                "ring: rename it", other.name, backend.name, backend.name,
            )  # fmt: skip
    return list(kept.values())


def config(backends: Sequence[Backend], listen: str, cookie: str) -> str:
    """A complete haproxy.cfg (run it with ``haproxy -f FILE``)."""
    servers = "\n".join(
        f"    server {b.name} {b.address} id {server_id(b.name)} weight {b.weight}"
        for b in backends
    )
    HAProxyRing({b.name: b.weight for b in backends})  # two names sharing an id: refused
    # The first value of exactly this name with a signed ID's shape, as statescale reads
    # it (cookies.cookie_value), not req.cook()'s last one of any shape; in the one
    # Cookie line left once they are joined (req.fhdr alone: the last line). \x22 is
    # '"'; groups are named: an ACL's regex numbers none.
    pair = (
        r"\s*" + re.escape(cookie) + r"\s*=\s*(?<q>\x22?)(?<sid>[A-Za-z0-9_-]+)"
        + re.escape(SEPARATOR) + r"[A-Za-z0-9_-]+\k<q>\s*"
    )  # fmt: skip
    extract = f'req.fhdr(cookie,1),regsub("^(?:[^;]*;)*?{pair}(?:[;,].*)?$","\\2")'
    present = f"(?:^|;){pair}(?:[;,]|$)"  # (a value of ours ends at a comma too)
    found = f"{{ req.fhdr(cookie,1) -m reg '{present}' }}"
    take_id = f"set-var(txn.statescale_sid) '{extract}' if {found}"
    # Several Cookie lines (a client may not send them, RFC 6265 5.4) become one, joined
    # with "; " as nginx and HTTP/2 join them: what HAProxy hashes is then the one line
    # the app reads. More than _COOKIE_LINES lines: a 400, never cookies dropped.
    lines = "req.fhdr_cnt(cookie)"
    join = "".join(
        f'    http-request set-header Cookie "{_joined(n)}" if {{ {lines} eq {n} }}\n'
        for n in range(2, _COOKIE_LINES + 1)
    )
    join += f"    http-request deny deny_status 400 if {{ {lines} gt {_COOKIE_LINES} }}\n"
    return f"""# Generated by statescale lb-config haproxy. Sticky sessions: HAProxy hashes the
# session ID (of the first {cookie} cookie shaped ID{SEPARATOR}SIGNATURE, the ID) onto a
# consistent-hash ring
# that statescale.routing.HAProxyRing replicates (each server's id comes from its
# name); requests without it go round robin.
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend statescale
    bind {listen}
    default_backend statescale
backend statescale
{join}    http-request {take_id}
    balance hash var(txn.statescale_sid)
    hash-type consistent sdbm avalanche
    option forwardfor
    http-request set-header X-Forwarded-Proto http
{servers}
"""


_COOKIE_LINES = 16  # Cookie lines joined into one; a request with more gets a 400


def _joined(lines: int) -> str:
    """A log-format string: the first ``lines`` Cookie lines, joined with ``; ``."""
    return "; ".join(f"%[req.fhdr(cookie,{n})]" for n in range(1, lines + 1))


def reloadable(text: str, config_file: Path) -> str:
    """``text`` (a configuration :func:`config` wrote) for a HAProxy that ``lb-sync``
    reloads in place: master-worker mode, its pid file and stats socket beside
    ``config_file``."""
    where = config_file.resolve().parent
    socket = where / "haproxy.sock"
    if len(str(socket).encode()) > _MAX_SOCKET:
        raise ConfigError(
            f"HAProxy's socket {socket} would be too long a path: keep the configuration "
            f"in a folder whose path is under {_MAX_SOCKET - len(socket.name) - 1} bytes"
        )
    extra = (
        "    master-worker\n"
        f"    pidfile {_quoted(where / 'haproxy.pid')}\n"
        f"    stats socket {_quoted(socket)} mode 600 level admin expose-fd listeners\n"
    )
    return text.replace("global\n", "global\n" + extra, 1)


def _quoted(path: Path) -> str:
    """``path`` as one word of HAProxy's configuration."""
    text = str(path)
    if any(c in text for c in '"\\$\n'):
        raise ConfigError(f"HAProxy's configuration cannot name the path {text!r}")
    return f'"{text}"'


def reload(config_file: Path) -> bool:
    """Reload the HAProxy that serves ``config_file`` (USR2 to its master, which reads
    the file again and hands the listeners over); False if none runs; ``ConfigError``
    if it could not be signalled."""
    pid = serving_pid(config_file.resolve().parent / "haproxy.pid", "haproxy", config_file)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGUSR2)
    except ProcessLookupError:
        return False  # gone meanwhile
    except OSError as exc:
        raise ConfigError(f"could not signal HAProxy's master (pid {pid}): {exc}") from exc
    return True


def check_command(config_file: Path) -> list[str]:
    return [_haproxy(), "-c", "-f", str(config_file)]


def _haproxy() -> str:
    return shutil.which("haproxy") or "/usr/sbin/haproxy"  # sbin: not on every PATH


def command(config_file: Path, listen: str, cookie: str) -> list[str]:
    """HAProxy in the foreground (``-db``)."""
    return [_haproxy(), "-db", "-f", str(config_file)]


BALANCER = Balancer(
    name="haproxy",
    summary="HAProxy balance hash, hash-type consistent sdbm avalanche",
    node_key=lambda backend: backend.name,
    make_ring=HAProxyRing,
    write_config=config,
    config_name="haproxy.cfg",
    run=command,
    reloadable=reloadable,
    reload=reload,
    check=check_command,
    usable=usable,
)
