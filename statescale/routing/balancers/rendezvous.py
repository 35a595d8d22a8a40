"""statescale's own routers: rendezvous hashing (:class:`~statescale.routing.ring.Ring`)
over backend names. ``statescale router`` and the gunicorn master's router use it, and
its configuration is a backends file for ``statescale router --backends-file``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..backends import Backend, backends_text
from ..ring import Ring
from ._base import Balancer, python_module


def config(backends: Sequence[Backend], listen: str, cookie: str) -> str:
    """A backends file for ``statescale router`` (the address and cookie are its flags)."""
    return (
        f"# statescale router --backends-file FILE --listen {listen} --cookie {cookie}\n"
        "# One NAME=HOST:PORT[*WEIGHT] a line; SIGHUP re-reads it.\n" + backends_text(backends)
    )


def command(config_file: Path, listen: str, cookie: str) -> list[str]:
    """``statescale router`` on ``listen``, following the backends file."""
    return python_module(
        "statescale",
        "router",
        "--backends-file",
        str(config_file),
        "--listen",
        listen,
        "--cookie",
        cookie,
    )


BALANCER = Balancer(
    name="statescale",
    summary="statescale router: rendezvous hashing",
    node_key=lambda backend: backend.name,
    make_ring=Ring,
    write_config=config,
    config_name="backends.txt",
    run=command,
)
