from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from itsdangerous import Signer

from statescale.exceptions import ConfigError
from statescale.signing import SessionSigner, new_session_id
from tests.conftest import OLD_SECRET, SECRET


def test_ids_carry_at_least_128_bits_and_are_distinct() -> None:
    ids = {new_session_id() for _ in range(100_000)}
    assert len(ids) == 100_000
    sample = next(iter(ids))
    assert len(sample) * math.log2(64) >= 128  # URL-safe base64: 6 bits a character


@given(st.text(alphabet=st.sampled_from("abcXYZ019_-"), min_size=22, max_size=64))
def test_round_trip(session_id: str) -> None:
    signer = SessionSigner([SECRET])
    assert signer.unsign(signer.sign(session_id)) == (session_id, False)


@given(st.text(max_size=300))
def test_arbitrary_text_never_verifies(value: str) -> None:
    assert SessionSigner([SECRET]).unsign(value) is None


def test_rotation() -> None:
    sid = new_session_id()
    old_cookie = SessionSigner([OLD_SECRET]).sign(sid)
    rotated = SessionSigner([OLD_SECRET, SECRET])
    assert rotated.unsign(old_cookie) == (sid, True)  # accepted, to be re-issued
    assert rotated.unsign(rotated.sign(sid)) == (sid, False)
    assert SessionSigner([SECRET]).unsign(old_cookie) is None  # key removed: rejected


def test_same_secret_other_purpose_is_rejected() -> None:
    sid = new_session_id()
    foreign = Signer(SECRET, salt="itsdangerous.Signer").sign(sid).decode()
    assert SessionSigner([SECRET]).unsign(foreign) is None
    assert SessionSigner([SECRET]).unsign(sid) is None  # no unsigned fallback


@pytest.mark.parametrize(
    "keys",
    [pytest.param([], id="none"), pytest.param(["short"], id="too-short")],
)
def test_bad_keys_fail_at_construction(keys: list[str]) -> None:
    with pytest.raises(ConfigError):
        SessionSigner(keys)


def test_verified_values_are_remembered_and_forged_ones_never() -> None:
    signer = SessionSigner(["k" * 32])
    good = signer.sign("a" * 43)
    assert signer.unsign(good) == signer.unsign(good)
    assert list(signer._verified) == [good]
    forged = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    assert signer.unsign(forged) is None and forged not in signer._verified
    for n in range(5000):  # bounded: the oldest go first
        signer.unsign(signer.sign(f"{n:043d}"))
    assert len(signer._verified) == 4096 and good not in signer._verified
    assert signer.unsign(good) is not None  # still verifies, by HMAC again
