"""relay_core.delivery.smtp against a real aiosmtpd server in each security mode.

Every failure the worker can meet is produced by the server for real (refused
recipients, 4xx/5xx replies, a wrong password, an untrusted certificate, a
closed port) and must come back classified: its stage, its code, and whether
retrying can help, in words an operator can act on. The EHLO name the relay
gives is what aiosmtpd records (``session.host_name``).
"""

from __future__ import annotations

from typing import Iterator

import pytest

from relay_core.delivery.smtp import DeliveryError, Mailer, Target, helo_name, retry_hint
from relay_core.options import Options
from support import SMTP_PASSWORD, SMTP_USER, Certificates, SmtpServer, free_port, wait_until

BODY = (b"From: noreply@example.org\r\nTo: a@example.com\r\nSubject: Hi\r\n"
        b"Message-ID: <m1@example.org>\r\n\r\nHello there.\r\n")


@pytest.fixture(autouse=True)
def trust_test_ca(monkeypatch: pytest.MonkeyPatch, certs: Certificates) -> None:
    # ssl.create_default_context() loads SSL_CERT_FILE on every call.
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))


@pytest.fixture
def mailer() -> Iterator[Mailer]:
    mailer = Mailer()
    yield mailer
    mailer.close()


def target(server: SmtpServer, *, auth: bool = False, password: str = SMTP_PASSWORD, verify: bool = True,
           security: str | None = None) -> Target:
    return Target("127.0.0.1", server.port, security or server.mode, SMTP_USER if auth else "",
                  password if auth else "", verify, 10.0)


def served(server: SmtpServer) -> int:
    """Connections the server has accepted (its own start-up probe included)."""
    return len(getattr(server.controller, "protocols", []))


def body_of(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]


# -- success in every mode ------------------------------------------------------------
@pytest.mark.parametrize("mode,auth", [("none", False), ("starttls", True), ("ssl", True), ("ssl", False)],
                         ids=["plain", "starttls-auth", "ssl-auth", "ssl"])
def test_deliver_in_each_mode(mailer: Mailer, certs: Certificates, mode: str, auth: bool) -> None:
    with SmtpServer(mode, certs, auth=auth) as server:
        result = mailer.deliver(target(server, auth=auth), "bounce@example.org",
                                ["a@example.com", "b@example.net"], BODY)
        assert result.stage == "DATA" and result.code == 250
        assert [(r.address, r.accepted, r.code, r.permanent) for r in result.recipients] == [
            ("a@example.com", True, 250, False), ("b@example.net", True, 250, False)]
        assert "Message accepted" in result.recipients[0].reply
        mailer.close()
    (got,) = server.received
    assert got.mail_from == "bounce@example.org"
    assert got.rcpt_tos == ["a@example.com", "b@example.net"]
    assert got.auth == (SMTP_USER if auth else None)
    assert got.message["Subject"] == "Hi" and body_of(got.content) == b"Hello there.\n"


def test_auth_required_but_not_given_is_refused(mailer: Mailer) -> None:
    with SmtpServer("none", auth=True) as server:
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY)
    assert caught.value.stage == "MAIL" and caught.value.code == 530
    assert server.received == []


# -- recipients and replies ------------------------------------------------------------------
def test_one_refused_recipient_of_three(mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        server.behaviour.rcpt_replies["b@example.com"] = "550 5.1.1 no such user"
        result = mailer.deliver(target(server), "bounce@example.org",
                                ["a@example.com", "b@example.com", "c@example.com"], BODY)
        mailer.close()
    a, b, c = result.recipients
    assert (a.accepted, a.code, a.permanent) == (True, 250, False)
    assert (b.accepted, b.code, b.permanent) == (False, 550, True)
    assert "no such user" in b.reply
    assert (c.accepted, c.code, c.permanent) == (True, 250, False)
    assert result.stage == "DATA" and result.code == 250
    (got,) = server.received
    assert got.rcpt_tos == ["a@example.com", "c@example.com"]


def test_a_transiently_refused_recipient_is_not_permanent(mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        server.behaviour.rcpt_replies["b@example.com"] = "450 4.2.1 mailbox busy, try again in 2 minutes"
        result = mailer.deliver(target(server), "bounce@example.org", ["a@example.com", "b@example.com"], BODY)
        mailer.close()
    b = result.recipients[1]
    assert (b.accepted, b.code, b.permanent) == (False, 450, False)
    assert retry_hint(b.reply) == 120


def test_every_recipient_refused_sends_no_data(mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        server.behaviour.rcpt_replies.update({"a@example.com": "550 5.1.1 no such user",
                                              "b@example.com": "452 4.2.2 mailbox full"})
        result = mailer.deliver(target(server), "bounce@example.org", ["a@example.com", "b@example.com"], BODY)
        mailer.close()
    assert result.stage == "RCPT"
    assert [(r.accepted, r.code, r.permanent) for r in result.recipients] == [(False, 550, True),
                                                                                (False, 452, False)]
    assert server.received == [] and server.handler.attempt_times == []


@pytest.mark.parametrize("reply,permanent,code", [
    ("451 4.3.0 try again later", False, 451),
    ("554 5.7.1 rejected", True, 554),
    ("452 4.3.1 insufficient system storage", False, 452),
])
def test_data_reply_is_classified(mailer: Mailer, reply: str, permanent: bool, code: int) -> None:
    with SmtpServer("none") as server:
        server.behaviour.data_replies.append(reply)
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY)
    error = caught.value
    assert (error.stage, error.code, error.permanent) == ("DATA", code, permanent)
    assert reply.split(" ", 1)[1] in error.message and error.message.startswith("DATA")
    assert server.received == []


@pytest.mark.parametrize("reply,permanent", [("421 4.3.2 service shutting down", False),
                                             ("451 4.7.1 greylisted, try again in 5 minutes", False),
                                             ("553 5.7.1 sender not allowed", True)])
def test_mail_from_reply_is_classified(mailer: Mailer, reply: str, permanent: bool) -> None:
    with SmtpServer("none") as server:
        server.behaviour.mail_replies.append(reply)
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY)
    error = caught.value
    assert error.stage == "MAIL" and error.code == int(reply[:3]) and error.permanent is permanent
    assert server.received == []
    if "5 minutes" in reply:
        assert error.retry_after == 300


def test_a_failed_transaction_does_not_spoil_the_next_one(mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        server.behaviour.data_replies.append("451 4.3.0 try again later")
        with pytest.raises(DeliveryError):
            mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY)
        result = mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY)
        mailer.close()
    assert result.code == 250 and len(server.received) == 1


# -- connection, TLS and AUTH failures ------------------------------------------------------
@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_wrong_password_is_a_transient_auth_error_without_the_password(mailer: Mailer, certs: Certificates,
                                                                         mode: str) -> None:
    wrong = "wrong-Pa55word-do-not-print"
    with SmtpServer(mode, certs, auth=True) as server:
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target(server, auth=True, password=wrong), "bounce@example.org", ["a@example.com"], BODY)
    error = caught.value
    assert error.stage == "AUTH" and error.permanent is False and error.code == 535
    assert "refuses the username or password" in error.message
    for text in (error.message, str(error), repr(error), repr(error.args)):
        assert wrong not in text and SMTP_PASSWORD not in text
    assert server.received == []


def test_connection_refused_is_transient(mailer: Mailer) -> None:
    closed = Target("127.0.0.1", free_port(), "none", "", "", True, 5.0)
    with pytest.raises(DeliveryError) as caught:
        mailer.deliver(closed, "bounce@example.org", ["a@example.com"], BODY)
    error = caught.value
    assert error.stage == "connect" and error.permanent is False and error.code is None
    assert "refused" in error.message.lower() and f"127.0.0.1:{closed.port}" in error.message
    assert mailer.connections_opened == 0


@pytest.mark.parametrize("mode,stage", [("starttls", "STARTTLS"), ("ssl", "connect")])
def test_untrusted_certificate_defers_with_a_clear_error(mailer: Mailer, certs: Certificates, mode: str,
                                                         stage: str) -> None:
    with SmtpServer(mode, certs, trusted=False) as server:
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY)
    error = caught.value
    assert "TLS certificate verification failed" in error.message
    assert "smtp_tls_verify" in error.message
    assert error.stage == stage and error.permanent is False
    assert server.received == []


@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_untrusted_certificate_delivers_when_verification_is_off(mailer: Mailer, certs: Certificates,
                                                                 mode: str) -> None:
    with SmtpServer(mode, certs, trusted=False, auth=True) as server:
        result = mailer.deliver(target(server, auth=True, verify=False), "bounce@example.org",
                                ["a@example.com"], BODY)
        mailer.close()
    assert result.code == 250
    assert len(server.received) == 1 and server.received[0].auth == SMTP_USER


def test_the_test_ca_is_what_makes_the_certificate_trusted(mailer: Mailer, certs: Certificates,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: object) -> None:
    # The control for the tests above: without SSL_CERT_FILE the trusted server fails too.
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file) + ".missing")
    monkeypatch.setenv("SSL_CERT_DIR", str(certs.ca_file) + ".missing-dir")
    with SmtpServer("ssl", certs) as server:
        with pytest.raises(DeliveryError, match="TLS certificate verification failed"):
            mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY)


def test_starttls_against_a_server_without_tls_is_a_clear_error(mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target(server, security="starttls"), "bounce@example.org", ["a@example.com"], BODY)
    error = caught.value
    assert error.stage == "STARTTLS" and error.permanent is False
    assert "does not offer STARTTLS" in error.message
    assert server.received == []


def test_plain_connection_to_an_implicit_tls_port_fails_cleanly(mailer: Mailer, certs: Certificates) -> None:
    with SmtpServer("ssl", certs) as server:
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(Target("127.0.0.1", server.port, "none", "", "", True, 2.0), "bounce@example.org",
                           ["a@example.com"], BODY)
    assert caught.value.permanent is False and caught.value.stage == "connect"


def test_auth_on_a_server_that_only_offers_it_after_starttls(mailer: Mailer, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, auth=True) as server:
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target(server, auth=True, security="none"), "bounce@example.org", ["a@example.com"],
                           BODY)
    assert caught.value.stage == "AUTH" and caught.value.permanent is False
    assert "STARTTLS" in caught.value.message and SMTP_PASSWORD not in caught.value.message


@pytest.mark.parametrize("address", ["a.b+tag@example.org", "o'brien@example.org", "a..b@example.org",
                                     "{x}%y!z@example.org", "#$&*/=?^_`|~-@example.org"])
def test_envelope_addresses_go_out_as_given(mailer: Mailer, address: str) -> None:
    """MAIL FROM and RCPT TO carry the validated address itself, as smtplib's quoting did."""
    with SmtpServer("none") as server:
        mailer.deliver(target(server), address, [address, "b@example.com"], BODY)
        mailer.close()
    assert [(r.mail_from, r.rcpt_tos) for r in server.received] == [(address, [address, "b@example.com"])]


# -- connection reuse -----------------------------------------------------------------------
def test_two_messages_within_the_idle_time_share_one_connection(mailer: Mailer, certs: Certificates) -> None:
    with SmtpServer("starttls", certs, auth=True) as server:
        before = served(server)
        first = mailer.deliver(target(server, auth=True), "bounce@example.org", ["a@example.com"], BODY,
                               idle_limit=60)
        second = mailer.deliver(target(server, auth=True), "bounce@example.org", ["b@example.com"],
                                BODY.replace(b"Hello there.", b"Second one."), idle_limit=60)
        mailer.close()
    assert first.code == second.code == 250
    assert mailer.connections_opened == 1
    assert server.handler.resets == 0  # DATA's reply ended the first transaction: no RSET before the second
    assert [r.rcpt_tos for r in server.received] == [["a@example.com"], ["b@example.com"]]
    assert body_of(server.received[1].content) == b"Second one.\n"
    assert served(server) - before == 1  # the server saw one connection too


def test_zero_idle_limit_opens_a_connection_per_message(mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        before = served(server)
        for address in ("a@example.com", "b@example.com"):
            mailer.deliver(target(server), "bounce@example.org", [address], BODY, idle_limit=0)
    assert mailer.connections_opened == 2
    assert len(server.received) == 2 and served(server) - before == 2


def test_a_different_target_opens_a_new_connection(mailer: Mailer, certs: Certificates) -> None:
    with SmtpServer("none") as one, SmtpServer("none") as two:
        mailer.deliver(target(one), "bounce@example.org", ["a@example.com"], BODY)
        mailer.deliver(target(two), "bounce@example.org", ["b@example.com"], BODY)
        mailer.deliver(target(two), "bounce@example.org", ["c@example.com"], BODY)
        mailer.close()
    assert mailer.connections_opened == 2
    assert len(one.received) == 1 and len(two.received) == 2


def test_a_connection_dropped_by_a_restarted_server_is_replaced(mailer: Mailer) -> None:
    first = SmtpServer("none")
    with first:
        mailer.deliver(target(first), "bounce@example.org", ["a@example.com"], BODY, idle_limit=60)
    # Same port, new server process: the mailer's idle connection is dead.
    second = SmtpServer("none")
    second.controller.loop.close()  # the unstarted controller on another port is replaced
    second.port = first.port
    second.controller = type(first.controller)(second.handler, hostname="127.0.0.1", port=first.port)
    with second:
        result = mailer.deliver(target(second), "bounce@example.org", ["b@example.com"], BODY, idle_limit=60)
        mailer.close()
    assert result.code == 250
    assert mailer.connections_opened == 2
    assert [r.rcpt_tos for r in first.received] == [["a@example.com"]]
    assert [r.rcpt_tos for r in second.received] == [["b@example.com"]]


def test_a_reused_connection_the_server_is_closing_is_replaced(mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY, idle_limit=60)
        server.behaviour.mail_replies = ["421 4.4.2 idle for too long, closing"]
        result = mailer.deliver(target(server), "bounce@example.org", ["b@example.com"], BODY, idle_limit=60)
        mailer.close()
    assert result.code == 250
    assert mailer.connections_opened == 2
    assert [r.rcpt_tos for r in server.received] == [["a@example.com"], ["b@example.com"]]


def test_a_fresh_connection_refused_at_mail_is_not_tried_again(mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        server.behaviour.mail_replies = ["421 4.3.2 not now"]
        with pytest.raises(DeliveryError) as caught:
            mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY, idle_limit=60)
    assert caught.value.stage == "MAIL" and caught.value.code == 421 and not caught.value.permanent
    assert mailer.connections_opened == 1 and server.received == []


def test_a_message_after_one_whose_recipients_were_all_refused_goes_on_the_same_connection(
        mailer: Mailer) -> None:
    with SmtpServer("none") as server:
        server.behaviour.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user"}
        refused = mailer.deliver(target(server), "bounce@example.org", ["gone@example.com"], BODY, idle_limit=60)
        sent = mailer.deliver(target(server), "bounce@example.org", ["b@example.com"], BODY, idle_limit=60)
        mailer.close()
    assert not refused.recipients[0].accepted and sent.code == 250
    assert server.handler.resets == 1  # the refused transaction's own RSET, none before the next
    assert mailer.connections_opened == 1
    assert [(r.mail_from, r.rcpt_tos) for r in server.received] == [("bounce@example.org", ["b@example.com"])]


def test_close_sends_quit_and_is_idempotent(certs: Certificates) -> None:
    mailer = Mailer()
    with SmtpServer("none") as server:
        mailer.deliver(target(server), "bounce@example.org", ["a@example.com"], BODY)
        mailer.close()
        mailer.close()
        protocol = server.controller.protocols[-1]
        wait_until(lambda: protocol.transport is None or protocol.transport.is_closing(),
                   timeout=5, what="the server to see the connection closed")


# -- retry hints ---------------------------------------------------------------------------
@pytest.mark.parametrize("reply,seconds", [
    ("451 4.7.0 Try again in 30 seconds", 30),
    ("try again in 5 minutes", 300),
    ("450 4.2.0 Greylisted, please retry in 2 mins", 120),
    ("421 Too many connections; wait 1 hour", 3600),
    ("451 4.7.1 Please try again in 45s", 45),
    ("451 4.7.1 TRY AGAIN IN 10 SECS", 10),
])
def test_retry_hint_reads_the_delay(reply: str, seconds: float) -> None:
    assert retry_hint(reply) == seconds


@pytest.mark.parametrize("reply", ["451 busy", "", "550 5.1.1 no such user", "451 4.3.0 try again later"])
def test_retry_hint_is_none_without_a_delay(reply: str) -> None:
    assert retry_hint(reply) is None


# -- the EHLO name, and TLS and AUTH failures in the words an operator acts on --------------------
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
