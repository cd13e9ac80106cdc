"""The EHLO name and the TLS error text (issue 6), against aiosmtpd for real.

aiosmtpd records the EHLO argument as ``session.host_name``; the support
handler keeps it with each received message.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from relay_core.options import Options
from relay_core.delivery.smtp import DeliveryError, Mailer, Target, helo_name
from support import SMTP_PASSWORD, SMTP_USER, Certificates, SmtpServer

BODY = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: Hi\r\nMessage-ID: <m@example.org>\r\n\r\nHi.\r\n"


@pytest.fixture(autouse=True)
def trust_test_ca(monkeypatch: pytest.MonkeyPatch, certs: Certificates) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))


@pytest.fixture
def mailer() -> Iterator[Mailer]:
    mailer = Mailer()
    yield mailer
    mailer.close()


@pytest.mark.parametrize("mode", ["none", "starttls", "ssl"])
def test_the_ehlo_name_reaches_the_server_in_every_mode(mailer: Mailer, certs: Certificates, mode: str) -> None:
    options = Options(smtp_host="127.0.0.1", smtp_security=mode, smtp_helo_name="relay.example.net")
    with SmtpServer(mode, certs) as server:
        target = Target.from_options(Options(**{**options.__dict__, "smtp_port": server.port}))
        mailer.deliver(target, "a@example.org", ["b@example.com"], BODY)
        mailer.close()
    assert [r.helo for r in server.received] == ["relay.example.net"]


def test_the_default_name_is_a_dotted_fqdn_or_the_default_from_domain_never_an_ip() -> None:
    with_from = Options(default_from="noreply@portal.example.org")
    assert helo_name(with_from, fqdn="relay-host.example.net") == "relay-host.example.net"
    for undotted in ("relay-host", "localhost", "localhost.localdomain", "127.0.0.1", "::1"):
        assert helo_name(with_from, fqdn=undotted) == "portal.example.org"
    assert helo_name(Options(smtp_helo_name="set.example.com", default_from="x@y.org"), fqdn="a.b") == \
        "set.example.com"
    name = helo_name(Options(), fqdn="127.0.0.1")  # nothing to go on: the short host name, never the IP
    assert name and not name.replace(".", "").isdigit()


def test_a_hostname_mismatch_reads_as_one_sentence(mailer: Mailer, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, cert_names=("mail.example.org",)) as server:
        target = Target("127.0.0.1", server.port, "starttls", "", "", True, 10.0, "relay.example.net")
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target, "a@example.org", ["b@example.com"], BODY)
    text = caught.value.message
    assert "TLS certificate verification failed for 127.0.0.1" in text
    assert "not valid for '127.0.0.1'. Fix the server's certificate" in text
    assert ".." not in text and caught.value.stage == "STARTTLS" and not caught.value.permanent


def test_ssl_against_a_starttls_port_names_the_likely_fix(mailer: Mailer, certs: Certificates) -> None:
    with SmtpServer("starttls", certs) as server:
        target = Target("127.0.0.1", server.port, "ssl", "", "", True, 10.0, "relay.example.net")
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target, "a@example.org", ["b@example.com"], BODY)
    text = caught.value.message
    assert "smtp_security=starttls" in text and "587" in text and "465" in text
    assert not caught.value.permanent


def test_a_wrong_password_is_tried_with_one_mechanism_only(mailer: Mailer, certs: Certificates) -> None:
    # A 535 says the credentials are wrong: trying LOGIN after PLAIN only doubles the failed logins the
    # server counts against the account.
    with SmtpServer("starttls", certs, auth=True) as server:
        target = Target("127.0.0.1", server.port, "starttls", SMTP_USER, "wrong-password", True, 10.0,
                        "relay.example.net")
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target, "a@example.org", ["b@example.com"], BODY)
    assert caught.value.code == 535 and caught.value.stage == "AUTH"
    assert len(server.handler.sasl_tried) == 1


def test_the_right_password_still_signs_in(mailer: Mailer, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, auth=True) as server:
        target = Target("127.0.0.1", server.port, "starttls", SMTP_USER, SMTP_PASSWORD, True, 10.0,
                        "relay.example.net")
        mailer.deliver(target, "a@example.org", ["b@example.com"], BODY)
        mailer.close()
    assert [r.auth for r in server.received] == [SMTP_USER]
