"""RedisStore on a real three-master Redis Cluster (redis+cluster://)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from statescale.embedded import find_redis_server
from statescale.processes import free_port
from statescale.session import Changes
from statescale.stores.redis import RedisStore

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    server = find_redis_server()
    cli = shutil.which("redis-cli")
    assert cli, "redis-cli comes with Debian's redis-server (apt-get install redis-server)"
    ports = [free_port(also_free=10000) for _ in range(3)]  # the bus port is +10000
    procs = []
    for port in ports:
        folder = tmp_path / str(port)
        folder.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    server,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--dir",
                    str(folder),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
            )
        )
    try:
        time.sleep(0.3)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            info = subprocess.run(
                [cli, "-p", str(ports[0]), "cluster", "info"],
                check=False,
                capture_output=True,
                text=True,
            ).stdout
            if "cluster_state:ok" in info:
                break
            time.sleep(0.2)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_sessions_on_a_real_cluster(cluster: list[int]) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster)
    store = RedisStore.from_url(url)
    assert store.tracking is None and store.shards == {}  # copies per master
    created = []
    for i in range(30):  # spread over the slots, so over all three masters
        created.append(store.create(f"session-{i:02d}", {"n": b"0"}).created)
    for i in range(30):
        store.save(f"session-{i:02d}", Changes({"n": b"1"}, frozenset()), created=created[i])
    for i in range(30):
        record = store.load(f"session-{i:02d}")
        assert record is not None and dict(record.fields) == {"n": b"1"}
    # Copies: kept per master, each told of changes by its own server.
    for i in range(30):
        store.load(f"session-{i:02d}")
    assert store.shards is not None and len(store.shards) == 3
    assert sum(len(shard.copies) for shard in store.shards.values()) == 30
    other = RedisStore.from_url(url, local_cache=0)  # another process, no copies
    for i in range(0, 30, 3):
        other.save(f"session-{i:02d}", Changes({"n": b"2"}, frozenset()), created=created[i])
    time.sleep(0.05)
    for i in range(30):
        record = store.load(f"session-{i:02d}")
        assert record is not None and dict(record.fields) == {"n": b"2" if i % 3 == 0 else b"1"}
    # regenerate across slots: the old record goes in a step of its own
    store.create("session-new", {"n": b"1"}, created=created[0], replaces="session-00")
    assert store.load("session-00") is None
    assert store.load("session-new") is not None
    with store.lock("session-new"):  # the lock key shares the record's slot
        pass
    assert store.key("session-new").endswith("}")
