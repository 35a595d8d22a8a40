"""RedisStore over TLS against real servers: one server (``rediss://``), a Sentinel
with a password of its own (``rediss+sentinel://``) and a Cluster (``rediss+cluster://``);
copies kept and told of changes in each."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from statescale.embedded import find_redis_server
from statescale.exceptions import ConfigError, StoreUnavailable
from statescale.processes import free_port, stop_process
from statescale.session import Changes
from statescale.stores.redis import RedisStore, client_from_url, subscription

from .tls import Certificates, certificates

pytestmark = pytest.mark.integration

T = TypeVar("T")


@contextmanager
def _server(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        find_redis_server(),
        *args,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        yield process
    finally:
        stop_process(process, 5)


def _soon(call: Callable[[], T], seconds: float = 15.0) -> T:
    """``call()`` once the servers answer (they are starting)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except StoreUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def _copies_follow_changes(holder: RedisStore, writer: RedisStore, sid: str) -> None:
    """``holder`` keeps a copy of ``sid``, and sees each of ``writer``'s changes."""
    created = _soon(lambda: holder.create(sid, {"n": b"0"})).created
    for _ in range(2):  # the first read subscribes; the second is kept
        holder.load(sid)
    shards = holder.shards.values() if holder.shards else [holder.tracking]
    assert sum(len(shard.copies) for shard in shards if shard is not None) == 1
    for n in range(1, 11):
        writer.save(sid, Changes({"n": str(n).encode()}, frozenset()), created=created)
        time.sleep(0.02)  # the next request: after Redis has sent the invalidation
        record = holder.load(sid)
        assert record is not None and record.fields == {"n": str(n).encode()}


def test_copies_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certs = certificates(tmp_path / "tls")
    port = free_port()
    with _server(*certs.server_options(port)):
        url = f"rediss://127.0.0.1:{port}/0?{certs.query()}"
        holder, writer = RedisStore.from_url(url), RedisStore.from_url(url)
        _copies_follow_changes(holder, writer, "s")
        monkeypatch.setattr(subscription, "LEASE", 0.2)
        time.sleep(0.3)  # past the lease: the next read syncs, over TLS, then serves
        record = holder.load("s")
        assert record is not None and record.fields == {"n": b"10"}


def test_a_drain_over_tls_reads_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One recv() on a TLS socket returns one record, and Redis sends each invalidation
    # in one of its own: a drain read the first alone, and the copy of the second key
    # written was served stale (50 of 50 times, measured by an independent review).
    monkeypatch.setattr(subscription, "IDLE_DRAIN", 3600.0)  # only lookups drain
    certs = certificates(tmp_path / "tls")
    port = free_port()
    with _server(*certs.server_options(port)):
        url = f"rediss://127.0.0.1:{port}/0?{certs.query()}"
        holder, writer = RedisStore.from_url(url), RedisStore.from_url(url)
        for trial in range(10):
            keys = [f"k{trial}-{n}" for n in range(3)]
            created = {k: _soon(lambda k=k: holder.create(k, {"n": b"0"})).created for k in keys}
            for key in keys:
                holder.load(key)
                holder.load(key)  # subscribed, then kept
            for key in keys:  # three round trips: three invalidations, three records
                writer.save(key, Changes({"n": b"1"}, frozenset()), created=created[key])
            time.sleep(0.02)
            record = holder.load(keys[-1])
            assert record is not None and record.fields == {"n": b"1"}, trial


def test_a_sentinel_over_tls_with_a_password_of_its_own(tmp_path: Path) -> None:
    certs = certificates(tmp_path / "tls")
    master, watcher = free_port(), free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"dir {tmp_path}\nsentinel monitor mymaster 127.0.0.1 {master} 1\n"
        "requirepass sentinel-secret\n"
    )
    with (
        _server(*certs.server_options(master)),
        _server(str(conf), "--sentinel", *_sentinel_options(certs, watcher)),
    ):
        url = f"rediss+sentinel://127.0.0.1:{watcher}/mymaster/0?{certs.query()}"
        told = url + "&sentinel_password=sentinel-secret"
        _copies_follow_changes(RedisStore.from_url(told), RedisStore.from_url(told), "s")
        with pytest.raises(StoreUnavailable, match=r"(?i)auth"):  # the Sentinel's own
            RedisStore.from_url(url).load("s")


def _sentinel_options(certs: Certificates, port: int) -> list[str]:
    """A Sentinel's TLS options: its own port, and TLS to the master it watches."""
    options = certs.server_options(port)
    cut = options.index("--tls-cluster")
    return options[:cut] + options[cut + 2 :]


def test_a_cluster_over_tls(tmp_path: Path) -> None:
    certs = certificates(tmp_path / "tls")
    cli = shutil.which("redis-cli")
    assert cli, "redis-cli comes with Debian's redis-server"
    ports = [free_port(also_free=10000) for _ in range(3)]  # the bus port is +10000
    tls = ["--tls", "--cacert", str(certs.ca)]
    with ExitStack() as stack:
        for port in ports:
            (tmp_path / str(port)).mkdir()
            stack.enter_context(_server(
                *certs.server_options(port), "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--dir", str(tmp_path / str(port)),
            ))  # fmt: skip
        time.sleep(0.3)
        subprocess.run(
            [cli, *tls, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while "cluster_state:ok" not in _cluster_info(cli, tls, ports[0]):
            assert time.monotonic() < deadline, "the cluster never came up"
            time.sleep(0.2)
        url = "rediss+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        url += f"?{certs.query()}"
        holder, writer = RedisStore.from_url(url), RedisStore.from_url(url, local_cache=0)
        _copies_follow_changes(holder, writer, "s")
        for n in range(6):  # over the slots, so over the masters
            created = _soon(lambda n=n: writer.create(f"t{n}", {"n": b"1"})).created
            writer.save(f"t{n}", Changes({"n": b"2"}, frozenset()), created=created)
            record = holder.load(f"t{n}")
            assert record is not None and record.fields == {"n": b"2"}


def _cluster_info(cli: str, tls: list[str], port: int) -> str:
    done = subprocess.run(
        [cli, *tls, "-p", str(port), "cluster", "info"], check=False, capture_output=True, text=True
    )
    return done.stdout


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h:26379/m?ssl_ca_certs=/ca", "not an option here"),  # TLS: rediss+
        ("rediss+cluster://h:7000?sentinel_password=x", "not an option here"),
        ("rediss+sentinel://h:26379/m?ssl_ca_certs=/a&ssl_ca_certs=/b", "not an option"),
        ("redis+sentinal://h:26379/m", "unknown scheme"),
        ("rediss+cluster://h:7000?ssl_check_hostname=maybe", "true or false"),
    ],
)
def test_sentinel_and_cluster_urls_take_only_what_they_can_use(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        client_from_url(url)


def test_passwords_never_reach_a_log_line_or_an_error() -> None:
    from statescale.stores.redis.client import redacted

    url = "rediss+sentinel://u:p%40ss@h1:26379,h2:26379/m/0?sentinel_password=s3&ssl_ca_certs=/ca"
    assert redacted(url) == (
        "rediss+sentinel://u:***@h1:26379,h2:26379/m/0?sentinel_password=***&ssl_ca_certs=/ca"
    )
    with pytest.raises(ConfigError) as refused:
        client_from_url(url + "&nonsense=1")
    assert "s3" not in str(refused.value) and "p%40ss" not in str(refused.value)


def test_a_registry_passes_its_query_on_as_it_came(tmp_path: Path) -> None:
    # An independent review: the registry rebuilt its URL's query from decoded values,
    # so a password holding '+' or '&' arrived changed, or the URL was refused.
    from statescale.routing.membership.redis import RedisRegistry

    url = "redis+sentinel://:pw@h:26379/m/0?prefix=p&sentinel_password=a%2Bb%26c"
    registry = RedisRegistry(url)
    pool = registry._client.connection_pool
    assert pool.sentinel_manager.sentinel_kwargs["password"] == "a+b&c"
    assert "a+b" not in registry.url and "pw" not in registry.url


def test_an_empty_registry_prefix_is_the_default() -> None:
    from statescale.routing.membership.redis import DEFAULT_PREFIX, RedisRegistry

    assert RedisRegistry("redis://127.0.0.1:1/0?prefix=").hash == f"{{{DEFAULT_PREFIX}}}:members"
