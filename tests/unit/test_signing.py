import os
import stat

import pytest

from tokenmill.settings import Settings
from tokenmill.signing import KEY_FILE_NAME, SigningKeyError, SigningKeys, with_local_key

BODY = b'{"event_id":"e1","type":"job.completed"}'
OLD = "old:0123456789abcdef-old"
NEW = "new:0123456789abcdef-new"


def test_a_signed_body_verifies_and_any_change_to_it_does_not():
    keys = SigningKeys.parse(NEW)
    signature = keys.sign(BODY)
    assert signature.startswith("new:") and keys.refusal(BODY, signature) is None
    assert keys.refusal(BODY.replace(b"e1", b"e2"), signature) == "bad signature (key id new)"


def test_unsigned_unknown_key_and_wrong_secret_are_refused_with_their_reason():
    keys = SigningKeys.parse(NEW)
    forger = SigningKeys.parse("new:not-the-deployment-secret")
    assert keys.refusal(BODY, None) == "unsigned event"
    assert keys.refusal(BODY, "") == "unsigned event"
    assert keys.refusal(BODY, SigningKeys.parse(OLD).sign(BODY)) == "unknown key id old"
    assert keys.refusal(BODY, forger.sign(BODY)) == "bad signature (key id new)"
    assert keys.refusal(BODY, "new") == "bad signature (key id new)"


def test_rotation_the_first_key_signs_and_every_key_verifies():
    rotated = SigningKeys.parse(f"{NEW},{OLD}")
    assert rotated.sign(BODY).startswith("new:")
    assert rotated.refusal(BODY, SigningKeys.parse(OLD).sign(BODY)) is None
    assert rotated.refusal(BODY, SigningKeys.parse(NEW).sign(BODY)) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no event signing key configured"),
        ("just-a-secret-without-id", "expected kid:secret"),
        ("bad id:0123456789abcdef", "expected kid:secret"),
        ("k1:short", "at least 16 characters"),
        (f"{NEW},{NEW}", "configured twice"),
    ],
)
def test_malformed_key_configuration_is_refused_clearly(spec, message):
    with pytest.raises(SigningKeyError, match=message):
        SigningKeys.parse(spec)


def test_up_creates_an_owner_only_key_once_and_reuses_it(tmp_path):
    settings = Settings.from_env({}, data_dir=str(tmp_path))
    first = with_local_key(settings)
    again = with_local_key(settings)
    assert first.signing_keys == again.signing_keys
    SigningKeys.parse(first.signing_keys)
    mode = stat.S_IMODE(os.stat(tmp_path / KEY_FILE_NAME).st_mode)
    assert mode == 0o600


def test_a_configured_key_wins_over_the_key_file(tmp_path):
    settings = Settings.from_env({}, data_dir=str(tmp_path), signing_keys=NEW)
    assert with_local_key(settings).signing_keys == NEW
    assert not (tmp_path / KEY_FILE_NAME).exists()
