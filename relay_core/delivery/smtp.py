"""SMTP delivery with every failure classified.

Whole-transaction failures raise ``DeliveryError`` naming the stage and whether
retrying can help (5xx permanent; 4xx, timeouts, connection, TLS and AUTH
transient); error text never carries a secret. A ``Mailer`` keeps its thread's
connection between messages, so a burst pays the TCP, TLS and AUTH handshakes once.
The next message starts with MAIL, no RSET first: a transaction that ended with
DATA's reply has already reset the session (RFC 5321 4.1.1.4), and a failed one
sent RSET or closed the connection. A reused connection found dropped, or
closing (421 at MAIL), is replaced and the message sent on the new one.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import re
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Iterator

from ..options import Options

_RETRY_HINT = re.compile(
    r"(?:try again|retry|wait)\D{0,24}?(\d{1,6})\s*(seconds?|secs?|s\b|minutes?|mins?|m\b|hours?|h\b)",
    re.IGNORECASE,
)
_DATA_PIECE = 64 * 1024


@dataclass(frozen=True)
class Target:
    """Where and how to connect; two equal targets may share a connection."""

    host: str
    port: int
    security: str
    username: str
    password: str
    verify: bool
    timeout: float
    helo_name: str | None = None  # None: smtplib's own choice (tests of this module only)
    ca_file: str = ""  # PEM certificates trusted besides the system's
    token: str = ""  # an OAuth 2.0 access token: AUTH XOAUTH2 instead of the password

    @classmethod
    def from_options(cls, options: Options, token: str = "") -> "Target":
        return cls(options.smtp_host, options.smtp_port, options.smtp_security, options.smtp_username,
                   options.smtp_password, options.smtp_tls_verify, float(options.smtp_timeout_seconds),
                   helo_name(options), options.smtp_ca_file, token)


def helo_name(options: Options, fqdn: str | None = None) -> str:
    """The EHLO name: the setting; else this host's FQDN when it has a dot; else the
    Default From's domain. Never a bare IP: smtplib's default is ``[127.0.0.1]`` when
    the host has no name, and public servers score a literal against the sender."""
    if options.smtp_helo_name:
        return options.smtp_helo_name
    name = host_fqdn() if fqdn is None else fqdn
    if "." in name and not _is_ip(name) and not name.startswith("localhost"):
        return name
    if options.default_from:
        return options.default_from.rpartition("@")[2]
    short = socket.gethostname()
    return short if short and not _is_ip(short) else "localhost"


@functools.cache
def host_fqdn() -> str:
    """This host's FQDN, looked up once per process (``socket.getfqdn`` asks the resolver each time)."""
    return socket.getfqdn()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


@dataclass
class RecipientResult:
    address: str
    accepted: bool
    code: int | None
    reply: str
    permanent: bool = False


@dataclass
class DeliveryResult:
    recipients: list[RecipientResult]
    stage: str
    code: int | None
    reply: str


class DeliveryError(Exception):
    """The whole transaction failed at ``stage``; ``permanent`` says retrying cannot help."""

    def __init__(self, message: str, *, stage: str, permanent: bool, code: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.permanent = permanent
        self.code = code
        self.retry_after = retry_after


def retry_hint(reply: str) -> float | None:
    """Seconds from a reply such as '451 4.7.0 Try again in 30 seconds', if it says."""
    match = _RETRY_HINT.search(reply or "")
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).lower()
    if unit.startswith("h"):
        return number * 3600.0
    if unit.startswith("m"):
        return number * 60.0
    return float(number)


def _reply_text(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return " ".join(text.split())[:500]


def tls_context(verify: bool = True, ca_file: str = "") -> ssl.SSLContext:
    """The system's trust store plus ``ca_file``; a named CA that cannot be read raises rather than
    quietly trusting less."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise DeliveryError(f"connect: the smtp_ca_file {ca_file} cannot be read as PEM certificates: "
                                f"{reason}", stage="connect", permanent=False) from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def xoauth2_response(mailbox: str, token: str) -> str:
    """The XOAUTH2 initial client response, before base64 (Google's and Microsoft's format)."""
    return f"user={mailbox}\x01auth=Bearer {token}\x01\x01"


class _XOAuth2:
    """smtplib's authobject: the initial response; a refusing server first sends a 334
    challenge (base64 JSON naming the error), answered with an empty line."""

    def __init__(self, mailbox: str, token: str) -> None:
        self.initial = xoauth2_response(mailbox, token)
        self.challenge = ""  # the server's decoded error (JSON), if it sent one

    def __call__(self, challenge: bytes | None = None) -> str:
        if challenge is None:
            return self.initial
        self.challenge = challenge.decode("utf-8", "replace")
        return ""


def _challenge_words(challenge: str) -> str:
    """'status 401, scope https://mail.google.com/' from the error challenge's JSON (no secrets in it)."""
    try:
        fields = json.loads(challenge)
    except ValueError:
        return " ".join(challenge.split())[:200]
    if not isinstance(fields, dict):
        return ""
    return ", ".join(f"{key} {value}" for key, value in fields.items() if isinstance(value, (str, int)))[:200]


def _xoauth2(client: smtplib.SMTP, target: Target) -> None:
    offered = (client.esmtp_features.get("auth") or "").upper().split()
    if "XOAUTH2" not in offered:
        raise DeliveryError(f"AUTH: {target.host} does not offer XOAUTH2 (it offers {' '.join(offered) or 'none'}); "
                            "check smtp_host, or set smtp_auth=password", stage="AUTH", permanent=False)
    authobject = _XOAuth2(target.username, target.token)
    try:
        client.auth("XOAUTH2", authobject)
    except smtplib.SMTPAuthenticationError as exc:
        said = _challenge_words(authobject.challenge)
        raise DeliveryError(f"AUTH: the mail server {target.host} refuses the access token for {target.username} "
                            f"({exc.smtp_code} {_reply_text(exc.smtp_error)}{'; ' + said if said else ''})",
                            stage="AUTH", permanent=False, code=exc.smtp_code) from None


def _reply_error(stage: str, code: int, reply: str, what: str) -> DeliveryError:
    return DeliveryError(f"{stage}: {what} answered {code} {reply}".strip(), stage=stage,
                         permanent=500 <= code < 600, code=code, retry_after=retry_hint(reply))


def _tls_error(target: Target, exc: ssl.SSLError, stage: str) -> DeliveryError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or str(exc)).rstrip(". ")
        text = (f"{stage}: TLS certificate verification failed for {target.host}: {detail}. "
                "Fix the server's certificate, name its CA in smtp_ca_file (a PEM file), or set "
                "smtp_tls_verify=false if you trust this network.")
    elif stage == "connect" and exc.reason == "WRONG_VERSION_NUMBER":
        # What an implicit-TLS client reads from a server that greets in plain text first.
        text = (f"{stage}: {target.host}:{target.port} did not answer in TLS (WRONG_VERSION_NUMBER): it expects "
                "plain SMTP first, as a STARTTLS port does. Set smtp_security=starttls (usually port 587), or "
                "keep ssl with the server's implicit-TLS port (usually 465).")
    else:
        text = f"{stage}: TLS handshake with {target.host}:{target.port} failed: {exc.reason or exc}"
    return DeliveryError(text, stage=stage, permanent=False)


def _login(client: smtplib.SMTP, username: str, password: str) -> None:
    """``SMTP.login``, except that a 535 ends it: the credentials are wrong whatever the mechanism, and
    trying the next one only doubles the failed logins the server counts against the account."""
    offered = client.esmtp_features.get("auth", "").upper().split()
    client.user, client.password = username, password
    refused: smtplib.SMTPAuthenticationError | None = None
    for mechanism in ("CRAM-MD5", "PLAIN", "LOGIN"):  # smtplib's own order of preference
        if mechanism not in offered:
            continue
        try:
            client.auth(mechanism, getattr(client, "auth_" + mechanism.lower().replace("-", "_")))
            return
        except smtplib.SMTPAuthenticationError as exc:
            if exc.smtp_code == 535:
                raise
            refused = exc
    raise refused or smtplib.SMTPException("No suitable authentication method found.")


def connect(target: Target) -> smtplib.SMTP:
    stage = "connect"
    client: smtplib.SMTP | None = None
    try:
        if target.security == "ssl":
            client = smtplib.SMTP_SSL(target.host, target.port, local_hostname=target.helo_name,
                                      timeout=target.timeout, context=tls_context(target.verify, target.ca_file))
        else:
            client = smtplib.SMTP(target.host, target.port, local_hostname=target.helo_name,
                                  timeout=target.timeout)
        stage = "EHLO"
        client.ehlo()
        if target.security == "starttls":
            stage = "STARTTLS"
            if not client.has_extn("starttls"):
                raise DeliveryError(f"STARTTLS: {target.host} does not offer STARTTLS; set smtp_security "
                                    "to ssl or none to match the server", stage=stage, permanent=False)
            code, reply = client.starttls(context=tls_context(target.verify, target.ca_file))
            if code != 220:
                raise _reply_error(stage, code, _reply_text(reply), target.host)
            client.ehlo()
        if target.username:
            stage = "AUTH"
            if not client.has_extn("auth"):
                raise DeliveryError(f"AUTH: {target.host} does not offer AUTH on this connection "
                                    "(it may require STARTTLS first)", stage=stage, permanent=False)
            if target.token:
                _xoauth2(client, target)
            else:
                _login(client, target.username, target.password)
        return client
    except DeliveryError:
        _abandon(client)
        raise
    except smtplib.SMTPAuthenticationError as exc:
        _abandon(client)
        # Transient by policy: a password fixed in the settings should let queued mail go.
        raise DeliveryError(f"AUTH: the mail server {target.host} refuses the username or password "
                            f"({exc.smtp_code} {_reply_text(exc.smtp_error)})", stage="AUTH",
                            permanent=False, code=exc.smtp_code) from None
    except ssl.SSLError as exc:
        _abandon(client)
        raise _tls_error(target, exc, stage) from None
    except smtplib.SMTPResponseException as exc:
        _abandon(client)
        text = _reply_text(exc.smtp_error)
        raise DeliveryError(f"{stage}: {target.host} answered {exc.smtp_code} {text}", stage=stage,
                            permanent=False, code=exc.smtp_code, retry_after=retry_hint(text)) from None
    except (smtplib.SMTPException, OSError) as exc:
        _abandon(client)
        verb = "cannot connect to" if stage == "connect" else "lost the connection to"
        raise DeliveryError(f"{stage}: {verb} {target.host}:{target.port}: {_describe(exc)}",
                            stage=stage, permanent=False) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"host name lookup failed ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _abandon(client: smtplib.SMTP | None) -> None:
    if client is None:
        return
    try:
        client.close()
    except OSError:
        pass


def transact(client: smtplib.SMTP, envelope_from: str, recipients: list[str],
             body: bytes | bytearray) -> DeliveryResult:
    stage = "MAIL"
    try:
        code, reply = _command(client, "mail", "FROM", envelope_from)
        if code != 250:
            client.rset()
            raise _reply_error(stage, code, _reply_text(reply), "MAIL FROM")
        stage = "RCPT"
        results = []
        for address in recipients:
            code, reply = _command(client, "rcpt", "TO", address)
            text = _reply_text(reply)
            accepted = code in (250, 251)
            results.append(RecipientResult(address, accepted, code, text,
                                           permanent=not accepted and 500 <= code < 600))
        if not any(r.accepted for r in results):
            client.rset()
            return DeliveryResult(results, stage, results[-1].code if results else None,
                                  results[-1].reply if results else "")
        stage = "DATA"
        code, reply = _data(client, body)
        text = _reply_text(reply)
        if code != 250:
            raise _reply_error(stage, code, text, "DATA")
        for r in results:
            if r.accepted:
                r.code, r.reply = code, text
        return DeliveryResult(results, stage, code, text)
    except DeliveryError:
        raise
    except smtplib.SMTPResponseException as exc:
        text = _reply_text(exc.smtp_error)
        raise DeliveryError(f"{stage}: the server answered {exc.smtp_code} {text}", stage=stage,
                            permanent=500 <= exc.smtp_code < 600, code=exc.smtp_code,
                            retry_after=retry_hint(text)) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"{stage}: connection lost: {_describe(exc)}", stage=stage,
                            permanent=False) from None


def _command(client: smtplib.SMTP, verb: str, what: str, address: str) -> tuple[int, bytes]:
    """MAIL FROM or RCPT TO as smtplib's ``mail`` and ``rcpt`` send them, without their address
    parser: the relay's addresses are validated plain ones, which ``email.utils.parseaddr`` gives
    back unchanged at a fifth of the worker's CPU per message."""
    client.putcmd(verb, f"{what}:<{address}>")
    return client.getreply()


def _data(client: smtplib.SMTP, body: bytes | bytearray) -> tuple[int, bytes]:
    """DATA a piece at a time: ``smtplib.SMTP.data`` builds three whole copies first."""
    client.putcmd("data")
    code, reply = client.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, reply)
    for piece in _data_pieces(body):
        client.send(piece)
    return client.getreply()


def _data_pieces(body: bytes | bytearray) -> Iterator[bytes]:
    """The message dot-stuffed in pieces cut after a line end, the ending (CRLF . CRLF) on the
    last: sent alone, Nagle held it for the server's delayed ACK (40 ms), halving the rate."""
    start, line_start = 0, True
    while True:
        end = min(start + _DATA_PIECE, len(body))
        if end < len(body):
            newline = body.rfind(b"\n", start, end)
            end = newline + 1 if newline != -1 else end
        piece = bytes(body[start:end]).replace(b"\n.", b"\n..")
        if line_start and piece.startswith(b"."):
            piece = b"." + piece
        line_start = piece.endswith(b"\n")
        if end == len(body):
            yield piece + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n")
            return
        yield piece
        start = end


class Mailer:
    """One thread's SMTP connection, reused between messages while fresh."""

    def __init__(self) -> None:
        self._client: smtplib.SMTP | None = None
        self._target: Target | None = None
        self._last_used = 0.0
        self.connections_opened = 0

    def _fresh_client(self, target: Target, idle_limit: float) -> tuple[smtplib.SMTP, bool]:
        client = self._client
        if client is not None and self._target == target and time.monotonic() - self._last_used < idle_limit:
            return client, True
        self.close()
        client = connect(target)
        self.connections_opened += 1
        self._client, self._target = client, target
        return client, False

    def deliver(self, target: Target, envelope_from: str, recipients: list[str], body: bytes | bytearray,
                idle_limit: float = 30.0) -> DeliveryResult:
        client, reused = self._fresh_client(target, idle_limit)
        try:
            result = transact(client, envelope_from, recipients, body)
        except DeliveryError as exc:
            self.close()
            if reused and exc.stage == "MAIL" and exc.code in (None, 421):
                # The server dropped an idle connection, or is closing it: nothing was sent, retry once.
                client, _ = self._fresh_client(target, idle_limit)
                result = transact(client, envelope_from, recipients, body)
            else:
                raise
        self._last_used = time.monotonic()
        if idle_limit <= 0:
            self.close()
        return result

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            _abandon(client)
