"""The offline verifier's own Ed25519 routine agrees with the `cryptography` package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_PATH = Path(__file__).resolve().parents[2] / "tools" / "verify_export.py"
_SPEC = importlib.util.spec_from_file_location("verify_export", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
verify_export = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(verify_export)


def test_it_accepts_genuine_signatures_and_refuses_altered_ones() -> None:
    for size in (0, 1, 100):
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes_raw()
        message = os.urandom(size)
        signature = key.sign(message)
        assert verify_export.ed25519_verify(public, message, signature)
        assert not verify_export.ed25519_verify(public, message + b"x", signature)
        bent = bytes([signature[0] ^ 1]) + signature[1:]
        assert not verify_export.ed25519_verify(public, message, bent)
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert not verify_export.ed25519_verify(other, message, signature)


def test_rfc_8032_test_vector_1() -> None:
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert verify_export.ed25519_verify(public, b"", signature)
