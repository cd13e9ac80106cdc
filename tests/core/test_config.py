"""relay_core.config (process settings from the environment) and relay_core.crypto.

``load_settings`` is given plain dicts; ``environment`` is given a dict and a
directory holding a real `.env` file.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from relay_core import crypto
from relay_core.config import ConfigError, Secret, Settings, environment, load_settings, read_dotenv
from relay_core.crypto import DecryptionError, derive_keys, hash_password, verify_password
from support import SECRET

OTHER_SECRET = "another-secret-key-for-rotation-0123456789-XYZ"


def load(**env: str) -> Settings:
    return load_settings({"RELAY_SECRET_KEY": SECRET, **env})


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    text = str(caught.value)
    # One clear sentence: no line breaks, ends with a full stop.
    assert "\n" not in text and text.endswith(".") and text.count(". ") <= 1
    return text


# -- the secret key ----------------------------------------------------------------------
def test_missing_secret_key_is_one_clear_sentence() -> None:
    for env in ({}, {"RELAY_SECRET_KEY": ""}, {"RELAY_SECRET_KEY_FILE": ""}):
        text = config_error(env)
        assert text.startswith("RELAY_SECRET_KEY is not set") and "tspro-relay init" in text


def test_short_secret_key_names_the_minimum() -> None:
    text = config_error({"RELAY_SECRET_KEY": "x" * 31})
    assert "RELAY_SECRET_KEY" in text and "31" in text and "32" in text
    assert str(load_settings({"RELAY_SECRET_KEY": "x" * 32}).secret_key) == "x" * 32


def test_secret_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    settings = load_settings({"RELAY_SECRET_KEY_FILE": str(path)})
    assert str(settings.secret_key) == SECRET


def test_secret_key_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(OTHER_SECRET)
    assert str(load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_SECRET_KEY_FILE": str(path)}).secret_key) == SECRET


def test_short_secret_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("too-short\n")
    assert "at least 32" in config_error({"RELAY_SECRET_KEY_FILE": str(path)})


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_secret_key_file_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "secret"
    if kind == "directory":
        path.mkdir()
    text = config_error({"RELAY_SECRET_KEY_FILE": str(path)})
    assert "RELAY_SECRET_KEY_FILE" in text and str(path) in text and "cannot be read" in text


# -- other variables ------------------------------------------------------------------------
def test_defaults() -> None:
    settings = load()
    assert settings.data_dir == Path("data")
    assert settings.db_path == Path("data") / "relay.db" and settings.queue_path == Path("data") / "queue.db"
    assert settings.admin_user == "admin" and settings.admin_password is None
    assert settings.worker_threads == 8
    assert settings.log_level == "INFO" and settings.log_format == "text"
    assert settings.insecure_cookies is False and settings.metrics is False
    assert settings.trusted_proxies == () and settings.send_per_hour == 0 and settings.queue_url == ""
    assert settings.secret_key_old is None and settings.metrics_token is None


def test_values_are_read() -> None:
    settings = load(RELAY_DATA_DIR="/srv/relay", RELAY_ADMIN_USER=" boss ", RELAY_ADMIN_PASSWORD="pw-123456",
                    RELAY_LOG_LEVEL="debug", RELAY_LOG_FORMAT="JSON", RELAY_INSECURE_COOKIES="yes",
                    RELAY_WORKER_THREADS="3", RELAY_SEND_PER_HOUR="500", RELAY_METRICS="1",
                    RELAY_METRICS_TOKEN="tok", RELAY_QUEUE_URL=" redis://localhost:6379/0 ")
    assert settings.data_dir == Path("/srv/relay") and settings.admin_user == "boss"
    assert str(settings.admin_password) == "pw-123456"
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert settings.insecure_cookies is True and settings.metrics is True
    assert settings.worker_threads == 3 and settings.send_per_hour == 500
    assert str(settings.metrics_token) == "tok" and settings.queue_url == "redis://localhost:6379/0"


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), (" yes ", True),
                                            ("0", False), ("false", False), ("off", False), ("No", False),
                                            ("", False)])
def test_insecure_cookies_values(value: str, expected: bool) -> None:
    assert load(RELAY_INSECURE_COOKIES=value).insecure_cookies is expected


@pytest.mark.parametrize("name", ["RELAY_INSECURE_COOKIES", "RELAY_METRICS"])
@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_bad_boolean_names_the_variable(name: str, value: str) -> None:
    text = config_error({"RELAY_SECRET_KEY": SECRET, name: value})
    assert text.startswith(name) and repr(value) in text


@pytest.mark.parametrize("value,fragment", [("many", "whole number"), ("0", "at least 1"), ("-2", "at least 1"),
                                            ("2.5", "whole number")])
def test_bad_worker_threads(value: str, fragment: str) -> None:
    text = config_error({"RELAY_SECRET_KEY": SECRET, "RELAY_WORKER_THREADS": value})
    assert text.startswith("RELAY_WORKER_THREADS") and fragment in text


def test_bad_send_per_hour_and_log_settings() -> None:
    assert "RELAY_SEND_PER_HOUR" in config_error({"RELAY_SECRET_KEY": SECRET, "RELAY_SEND_PER_HOUR": "-1"})
    assert "RELAY_LOG_LEVEL" in config_error({"RELAY_SECRET_KEY": SECRET, "RELAY_LOG_LEVEL": "chatty"})
    assert "RELAY_LOG_FORMAT" in config_error({"RELAY_SECRET_KEY": SECRET, "RELAY_LOG_FORMAT": "xml"})


def test_trusted_proxies_parsing() -> None:
    settings = load(RELAY_TRUSTED_PROXIES=" 10.0.0.1, 172.16.0.0/12;fd00::/8 ,, 192.168.1.7/24")
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("172.16.0.0/12"),
        ipaddress.ip_network("fd00::/8"), ipaddress.ip_network("192.168.1.0/24"))
    assert ipaddress.ip_address("172.20.1.1") in settings.trusted_proxies[1]
    assert load(RELAY_TRUSTED_PROXIES="").trusted_proxies == ()


def test_bad_trusted_proxy_names_the_variable_and_the_item() -> None:
    text = config_error({"RELAY_SECRET_KEY": SECRET, "RELAY_TRUSTED_PROXIES": "10.0.0.1, proxy.local"})
    assert text.startswith("RELAY_TRUSTED_PROXIES") and "'proxy.local'" in text


def test_public_url_and_allowed_hosts_parsing() -> None:
    settings = load(RELAY_PUBLIC_URL=" https://Relay.Example.org/ ",
                    RELAY_ALLOWED_HOSTS="relay, LAN.example.;[fd00::5],tspro_relay")
    assert settings.public_url == "https://relay.example.org"
    assert settings.allowed_hosts == ("relay", "lan.example", "fd00::5", "tspro_relay")
    assert load(RELAY_PUBLIC_URL="http://relay.lan:8000").public_url == "http://relay.lan:8000"
    assert load(RELAY_PUBLIC_URL="https://relay.example.org:443").public_url == "https://relay.example.org"
    assert (load().public_url, load().allowed_hosts) == ("", ())


@pytest.mark.parametrize("value, fragment", [
    ("relay.example.org", "https://relay.example.org"),  # no scheme
    ("ftp://relay.example.org", "https://relay.example.org"),
    ("https://relay.example.org/relay/", "path"),
    ("https://user:pw@relay.example.org", "user name"),
    ("https://relay.example.org/?x=1", "path"),
    ("https://:8000", "host name"),
])
def test_bad_public_url_names_the_variable(value: str, fragment: str) -> None:
    text = config_error({"RELAY_SECRET_KEY": SECRET, "RELAY_PUBLIC_URL": value})
    assert text.startswith("RELAY_PUBLIC_URL") and fragment in text


def test_bad_allowed_host_names_the_item() -> None:
    text = config_error({"RELAY_SECRET_KEY": SECRET, "RELAY_ALLOWED_HOSTS": "relay, https://relay.lan"})
    assert text.startswith("RELAY_ALLOWED_HOSTS") and "'https://relay.lan'" in text


def test_secrets_never_print_themselves() -> None:
    settings = load(RELAY_ADMIN_PASSWORD="admin-pw-visible?", RELAY_METRICS_TOKEN="metrics-tok-visible?",
                    RELAY_SECRET_KEY_OLD=OTHER_SECRET)
    for text in (repr(settings), str(settings), repr(settings.secret_key), f"{settings!r}"):
        assert SECRET not in text and OTHER_SECRET not in text
        assert "admin-pw-visible?" not in text and "metrics-tok-visible?" not in text
    assert repr(Secret("hunter2")) == "Secret('**********')"
    assert str(Secret("hunter2")) == "hunter2"
    assert bool(Secret("")) is False and bool(Secret("x")) is True


# -- .env ---------------------------------------------------------------------------------------
def test_read_dotenv_parses_quotes_comments_and_export(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(
        "# a comment\n"
        "\n"
        "PLAIN=value\n"
        "  SPACED = spaced value  \n"
        'DOUBLE="double # not a comment"\n'
        "SINGLE='single quoted'\n"
        "export EXPORTED=yes\n"
        "EMPTY=\n"
        "EQUALS=a=b=c\n"
        "   # indented comment\n"
        "not a pair\n"
        'MISMATCHED="left only\n'
        "LAST=wins-1\n"
        "LAST=wins-2\n",
        encoding="utf-8",
    )
    assert read_dotenv(path) == {
        "PLAIN": "value", "SPACED": "spaced value", "DOUBLE": "double # not a comment",
        "SINGLE": "single quoted", "EXPORTED": "yes", "EMPTY": "", "EQUALS": "a=b=c",
        "MISMATCHED": '"left only', "LAST": "wins-2",
    }


def test_read_dotenv_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path / "nope.env") == {}


def test_environment_lets_the_real_environment_win(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"RELAY_SECRET_KEY={OTHER_SECRET}\nRELAY_DATA_DIR=from-dotenv\n"
                                   "RELAY_ADMIN_USER=dotenv-admin\n")
    merged = environment({"RELAY_DATA_DIR": "from-env", "RELAY_WORKER_THREADS": "2"}, cwd=tmp_path)
    assert merged["RELAY_DATA_DIR"] == "from-env"
    assert merged["RELAY_SECRET_KEY"] == OTHER_SECRET and merged["RELAY_ADMIN_USER"] == "dotenv-admin"
    assert merged["RELAY_WORKER_THREADS"] == "2"
    settings = load_settings(merged)
    assert settings.data_dir == Path("from-env") and str(settings.secret_key) == OTHER_SECRET


def test_environment_without_a_dotenv_is_the_environment(tmp_path: Path) -> None:
    assert environment({"A": "1"}, cwd=tmp_path) == {"A": "1"}


# -- crypto: keys ----------------------------------------------------------------------------------
def test_body_encryption_round_trips_and_hides_the_plaintext() -> None:
    keys = derive_keys(load())
    plain = b"Welcome! Your temporary password is Hx7-unique" + bytes(range(256))
    blob = keys.encrypt_body(plain, "msg-1")
    assert plain not in blob and b"Hx7-unique" not in blob
    assert keys.decrypt_body(blob, "msg-1") == plain
    assert keys.encrypt_body(plain, "msg-1") != blob  # a fresh nonce each time
    assert keys.decrypt_body(keys.encrypt_body(b"", "e"), "e") == b""


def test_a_body_is_bound_to_its_message_id() -> None:
    keys = derive_keys(load())
    blob = keys.encrypt_body(b"secret body", "msg-1")
    with pytest.raises(DecryptionError):
        keys.decrypt_body(blob, "msg-2")


def test_an_altered_body_does_not_decrypt() -> None:
    keys = derive_keys(load())
    blob = bytearray(keys.encrypt_body(b"secret body", "msg-1"))
    blob[-1] ^= 1
    with pytest.raises(DecryptionError):
        keys.decrypt_body(bytes(blob), "msg-1")


def test_another_secret_cannot_read_the_data() -> None:
    mine, theirs = derive_keys(load()), derive_keys(load_settings({"RELAY_SECRET_KEY": OTHER_SECRET}))
    with pytest.raises(DecryptionError):
        theirs.decrypt_body(mine.encrypt_body(b"body", "m"), "m")
    with pytest.raises(DecryptionError, match="RELAY_SECRET_KEY"):
        theirs.decrypt_text(mine.encrypt_text("smtp-password"))
    assert mine.lookup_hash("tsr_key") != theirs.lookup_hash("tsr_key")


def test_old_secret_key_reads_data_written_under_it() -> None:
    old = derive_keys(load_settings({"RELAY_SECRET_KEY": OTHER_SECRET}))
    body, token = old.encrypt_body(b"queued before rotation", "m1"), old.encrypt_text("smtp-pass")
    rotated = derive_keys(load_settings({"RELAY_SECRET_KEY": SECRET, "RELAY_SECRET_KEY_OLD": OTHER_SECRET}))
    assert rotated.decrypt_body(body, "m1") == b"queued before rotation"
    assert rotated.decrypt_text(token) == "smtp-pass"
    assert old.lookup_hash("tsr_k") in rotated.lookup_hashes("tsr_k")
    # New data is written under the new key: readable without the old one.
    fresh = derive_keys(load())
    assert fresh.decrypt_body(rotated.encrypt_body(b"new", "m2"), "m2") == b"new"
    assert fresh.decrypt_text(rotated.encrypt_text("new-pass")) == "new-pass"
    assert rotated.lookup_hash("tsr_k") == fresh.lookup_hash("tsr_k")
    # Without RELAY_SECRET_KEY_OLD the old data is unreadable (the control).
    with pytest.raises(DecryptionError):
        fresh.decrypt_body(body, "m1")


def test_derived_keys_differ_by_purpose() -> None:
    keys = derive_keys(load())
    assert len(keys.session_key) == 32
    assert keys.session_key != keys.lookup_keys[0]
    assert SECRET.encode() not in keys.session_key


def test_new_api_key_has_256_bits() -> None:
    key = crypto.new_api_key()
    assert key.startswith("tsr_")
    raw = base64.urlsafe_b64decode(key[4:] + "=" * (-len(key[4:]) % 4))
    assert len(raw) >= 32
    assert crypto.new_api_key() != key


# -- crypto: passwords -----------------------------------------------------------------------------
def test_hash_and_verify_password() -> None:
    hashed = hash_password("correct horse battery")
    assert hashed.startswith("$argon2id$v=19$m=19456,t=2,p=1$") and "correct horse" not in hashed
    assert verify_password("correct horse battery", hashed) is True
    assert verify_password("correct horse batterY", hashed) is False
    assert verify_password("", hashed) is False
    assert hash_password("correct horse battery") != hashed  # salted


def test_older_hashes_verify_and_ask_to_be_replaced() -> None:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"correct horse battery", salt=salt, n=2**14, r=8, p=1, dklen=32)
    scrypt_hash = f"scrypt${2**14}$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    weaker_argon2 = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("correct horse battery")
    for older in (scrypt_hash, weaker_argon2):
        assert verify_password("correct horse battery", older) is True
        assert verify_password("correct horse batterY", older) is False
        assert crypto.needs_rehash(older)
    assert not crypto.needs_rehash(hash_password("correct horse battery"))


@pytest.mark.parametrize("encoded", ["", "plaintext", "bcrypt$2b$12$abc$def$ghi", "scrypt$1$2$3",
                                     "scrypt$x$8$1$c2FsdA==$ZGlnZXN0", "scrypt$1024$8$1$c2FsdA==$",
                                     "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$"],
                         ids=["empty", "plaintext", "bcrypt", "too-few-fields", "non-numeric-n", "empty-digest",
                              "argon2-empty-digest"])
def test_verify_password_refuses_malformed_hashes(encoded: str) -> None:
    # A damaged stored hash must mean "wrong password", not an exception (a 500 on the sign-in page).
    assert verify_password("anything", encoded) is False
