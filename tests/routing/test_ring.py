"""The rendezvous ring's promises, as properties; the replicas' pieces against known values."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statescale.exceptions import ConfigError
from statescale.routing import HAProxyRing, NginxRing, Ring, routing_key
from statescale.routing.balancers.haproxy import full_hash, sdbm

node_names = st.lists(
    st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=8),
    min_size=1,
    max_size=12,
    unique=True,
)
keys = st.text(min_size=1, max_size=64)


@given(node_names, keys)
def test_the_owner_is_a_node_and_ranks_first(names: list[str], key: str) -> None:
    ring = Ring(names)
    assert ring.owner(key) == ring.ranking(key)[0]
    assert sorted(ring.ranking(key)) == sorted(names)


@given(node_names, st.text(alphabet="klmnop", min_size=1, max_size=6), st.lists(keys, max_size=30))
def test_adding_a_node_moves_only_the_keys_it_takes(
    names: list[str], new: str, sample: list[str]
) -> None:
    ring = Ring(names)
    grown = ring.with_node(new)
    for key in sample:
        before, after = ring.owner(key), grown.owner(key)
        assert after in (before, new)


@given(node_names.filter(lambda n: len(n) > 1), st.lists(keys, max_size=30), st.data())
def test_removing_a_node_moves_only_its_keys(
    names: list[str], sample: list[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(names))
    ring = Ring(names)
    shrunk = ring.without_node(gone)
    for key in sample:
        before = ring.owner(key)
        after = shrunk.owner(key)
        if before != gone:
            assert after == before
        else:
            assert after == ring.ranking(key)[1]  # the next choice, as a router would
            assert ring.owner(key, down=[gone]) == after


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=2, max_value=8))
def test_balance_is_at_the_sampling_noise_floor(n: int) -> None:
    ring = Ring([f"node{i}" for i in range(n)])
    counts = Counter(ring.owner(f"session-{i}") for i in range(20_000))
    mean = 20_000 / n
    # 5 standard deviations of a binomial count: the noise floor, not a tuned number
    assert max(abs(c - mean) for c in counts.values()) < 5 * (mean * (1 - 1 / n)) ** 0.5


def test_weights_share_in_proportion() -> None:
    ring = Ring({"small": 1.0, "big": 3.0})
    counts = Counter(ring.owner(f"k{i}") for i in range(40_000))
    assert 0.72 < counts["big"] / 40_000 < 0.78


def test_same_owner_in_every_process_whatever_the_hash_seed() -> None:
    script = (
        "from statescale.routing import Ring; r = Ring(['a','b','c','d']); "
        "print([r.owner(f'k{i}') for i in range(50)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "random")
    }
    assert len(outputs) == 1


def test_rings_are_values() -> None:
    assert Ring(["a", "b"]) == Ring(["a", "b"]) != Ring(["a", "c"])
    assert Ring(["a"]).with_node("b") == Ring(["a", "b"])
    with pytest.raises(ConfigError):
        Ring([])
    with pytest.raises(LookupError):
        Ring(["a"]).ranking("k", down=["a"])


def test_routing_key_is_the_id_before_the_signature() -> None:
    assert routing_key("abc.def.ghi") == "abc"
    assert routing_key("no-dot") == "no-dot"


def test_replica_pieces_match_their_sources() -> None:
    # CRC32 as nginx's ngx_crc32_long; HAProxy's full_hash is a bijection (no node
    # keys ever collide) and sdbm of "" is 0.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert len({full_hash(i) for i in range(100_000)}) == 100_000
    assert sdbm(b"") == 0
    assert NginxRing(["127.0.0.1:1"]).owner("x") == "127.0.0.1:1"
    assert len(HAProxyRing({"a": 2, "b": 1})._keys) == 48
