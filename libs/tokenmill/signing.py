"""Event signatures: who may put an event on a stream.

Anything that can write to Redis could otherwise forge a `job.completed` the ledger would bill.
Every entry carries `tm-sig: <key id>:<hex HMAC-SHA256 of its exact body>`, made with a
deployment secret, and consumers verify it before any handler sees the event. Keys rotate by
id: the first configured key signs, every configured key verifies, so a new key is rolled out
first as a verifier, then as the signer, and the old one is removed once nothing signed with it
is still pending.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from tokenmill import datadir
from tokenmill.settings import Settings

SIGNATURE_HEADER = "tm-sig"
KEY_ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
# A secret shorter than this is guessable; the generated ones are 64 hex characters.
SECRET_CHARS_MIN = 16
KEYS_FORMAT = "kid:secret[,kid:secret...] (first signs, all verify)"
# The key `up` generates when none is configured, in its data dir.
KEY_FILE_NAME = "signing.key"


class SigningKeyError(ValueError):
    """The configured signing keys cannot be used; the message says why and what is expected."""


@dataclass(frozen=True)
class SigningKeys:
    """The key that signs (the first configured) and every key that verifies, by key id."""

    signing_key_id: str
    secrets_by_key_id: dict[str, bytes]

    @classmethod
    def parse(cls, spec: str) -> SigningKeys:
        """Read `kid:secret[,kid:secret...]`; raise SigningKeyError naming what is wrong."""
        if not spec.strip():
            raise SigningKeyError(f"no event signing key configured; expected {KEYS_FORMAT}")
        keys: dict[str, bytes] = {}
        for number, item in enumerate(spec.split(","), start=1):
            key_id, colon, secret = item.strip().partition(":")
            if not colon or not re.fullmatch(KEY_ID_PATTERN, key_id):
                raise SigningKeyError(
                    f"signing key {number}: expected kid:secret with a key id of letters, digits,"
                    f" '_', '.' or '-' (format {KEYS_FORMAT})"
                )
            if len(secret) < SECRET_CHARS_MIN:
                raise SigningKeyError(
                    f"signing key {key_id}: the secret must have at least {SECRET_CHARS_MIN}"
                    " characters"
                )
            if key_id in keys:
                raise SigningKeyError(f"signing key id {key_id} is configured twice")
            keys[key_id] = secret.encode()
        return cls(next(iter(keys)), keys)

    def sign(self, body: bytes) -> str:
        """The signature header value of `body`, made with the signing key."""
        return f"{self.signing_key_id}:{_mac(self.secrets_by_key_id[self.signing_key_id], body)}"

    def refusal(self, body: bytes, signature: str | None) -> str | None:
        """Why `signature` does not vouch for `body`, or None when it does."""
        if not signature:
            return "unsigned event"
        key_id, _, mac = signature.partition(":")
        secret = self.secrets_by_key_id.get(key_id)
        if secret is None:
            return f"unknown key id {key_id[:64]}"
        # Constant time, so a forger cannot find the MAC byte by byte from response times.
        if not hmac.compare_digest(mac.encode(), _mac(secret, body).encode()):
            return f"bad signature (key id {key_id})"
        return None


def new_key_spec() -> str:
    """A fresh random key, in the configuration format, for a deployment that has none."""
    return f"k{secrets.token_hex(4)}:{secrets.token_hex(32)}"


def _mac(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def with_local_key(settings: Settings) -> Settings:
    """`settings` with signing keys: the configured ones, or else the data dir's key file,
    created (owner-only) the first time, so `up` signs with the same key across restarts."""
    if settings.signing_keys:
        SigningKeys.parse(settings.signing_keys)
        return settings
    keys = datadir.secret(Path(settings.data_dir) / KEY_FILE_NAME, new_key_spec)
    SigningKeys.parse(keys)  # A damaged key file is refused here, not by every service.
    return dataclasses.replace(settings, signing_keys=keys)
