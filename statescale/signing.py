"""Session IDs: minting, signing and checking. Pure: no I/O, no clock.

An ID is 32 bytes from :mod:`secrets` (256 bits), URL-safe base64 encoded. The cookie
carries ``ID.SIGNATURE`` (``SEPARATOR`` between them), an HMAC-SHA256 made by
:class:`itsdangerous.Signer` with a salt that is ours alone, so a token signed with the
same secret for another purpose (Flask's own cookie, a password-reset link) is rejected
here.

Key rotation: ``secret_keys`` is a list, oldest first. The newest key signs; every key
in the list verifies. A cookie signed with an older key is reported as ``stale`` so the
middleware re-issues it under the newest key. Remove a key from the list and the cookies
it signed stop working; there is no unsigned fallback.

Routing: every router hashes :func:`routing_key`, the ID alone, never the signature, so
rotating the keys moves nobody. The balancer configurations spell the same rule in their
own languages from ``SEPARATOR``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from itsdangerous import BadSignature, Signer

from .exceptions import ConfigError

SALT = "statescale.session-id"
SEPARATOR = "."  # between the ID and its signature; IDs never hold it
#: The session cookie's name unless configured: what routers look for (and where the
#: routing key, the ID before ``SEPARATOR``, is found).
DEFAULT_COOKIE_NAME = "statescale"
MIN_KEY_BYTES = 16
MAX_COOKIE_VALUE = 512  # far above a real token (~87 chars); longer input is not hashed
VERIFIED_CACHE = 4096  # verified cookie values remembered per signer
_ID_CHARS = re.compile(r"[A-Za-z0-9_-]{22,128}\Z")


def new_session_id() -> str:
    """A fresh session ID: 256 bits from the OS CSPRNG, URL-safe text."""
    return secrets.token_urlsafe(32)


def routing_key(cookie_value: str) -> str:
    """What every router hashes: the session ID, the cookie value up to its first
    ``SEPARATOR`` (the signature after it changes when keys rotate; the ID never does)."""
    return cookie_value.partition(SEPARATOR)[0]


class Verified(NamedTuple):
    """A cookie value whose signature checked out."""

    session_id: str
    stale: bool  # signed by an older key: re-issue under the newest one


class _Signer(Signer):
    """itsdangerous' Signer with the derived key computed once per secret, not per call."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._derived: dict[bytes, bytes] = {}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        raw = self.secret_keys[-1] if secret_key is None else secret_key
        raw = raw.encode() if isinstance(raw, str) else raw
        key = self._derived.get(raw)
        if key is None:
            key = self._derived[raw] = super().derive_key(raw)
        return key


class SessionSigner:
    """Signs session IDs for the cookie and checks what comes back.

    ``id_factory`` mints new IDs; sticky routing swaps in one that mints IDs its own
    node owns. It must return at least 128 bits of CSPRNG output in URL-safe text.
    """

    def __init__(
        self,
        secret_keys: Sequence[str | bytes],
        *,
        salt: str = SALT,
        id_factory: Callable[[], str] = new_session_id,
    ) -> None:
        keys = [secret_keys] if isinstance(secret_keys, (str, bytes)) else list(secret_keys)
        if not keys:
            raise ConfigError("secret_keys is empty: give at least one secret key")
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise ConfigError(
                    f"a secret key is {len(key)} characters; use at least {MIN_KEY_BYTES} "
                    "random ones, e.g. python -c 'import secrets; print(secrets.token_hex(32))'"
                )
        options = {
            "salt": salt,
            "sep": SEPARATOR,
            "key_derivation": "hmac",
            "digest_method": hashlib.sha256,
        }
        self._newest = _Signer(keys[-1], **options)
        self._older = _Signer(keys[:-1], **options) if len(keys) > 1 else None
        self.new_id = id_factory
        # Cookie values whose signature checked out, so a returning client costs a dict
        # look-up, not an HMAC. Only verified values enter: a forger cannot fill it.
        self._verified: OrderedDict[str, Verified] = OrderedDict()

    def sign(self, session_id: str) -> str:
        """The cookie value for ``session_id``, signed with the newest key."""
        return self._newest.sign(session_id).decode("ascii")

    def unsign(self, value: str) -> Verified | None:
        """The ID inside a cookie value, or ``None`` for anything not signed by us."""
        known = self._verified.get(value)
        if known is not None:
            return known
        if not value or len(value) > MAX_COOKIE_VALUE or not value.isascii():
            return None
        for signer, stale in ((self._newest, False), (self._older, True)):
            if signer is None:
                break
            try:
                session_id = signer.unsign(value).decode("ascii")
            except BadSignature:
                continue
            # A second line behind the HMAC: only IDs of the shape we mint.
            if not _ID_CHARS.match(session_id):
                return None
            verified = Verified(session_id, stale)
            self._verified[value] = verified
            if len(self._verified) > VERIFIED_CACHE:
                self._verified.popitem(last=False)  # the oldest; atomic under the GIL
            return verified
        return None
