"""OAuth 2.0 access tokens for SMTP XOAUTH2: Microsoft 365 (through msal) and Google.

The grants for each provider and account kind are in docs/oauth.md. A refresh
token the server rotates is written back under a compare-and-set
(``_save_rotated``), so a worker whose answer arrives after the account was
connected again never overwrites the new connection. A refused grant is marked
in the store: delivery waits and the health check names the fix. msal and
google-auth are imported only when a token needs them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import timezone
from typing import Any

from ..crypto import DecryptionError
from ..db import transaction
from ..logs import fields
from ..options import Options

logger = logging.getLogger("relay.oauth")
logging.getLogger("msal").setLevel(logging.WARNING)  # its INFO lines name endpoints per request

MICROSOFT_SEND_SCOPE = "https://outlook.office.com/SMTP.Send"
MICROSOFT_APP_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "openid email https://mail.google.com/"
PROVIDER_NAMES = {"microsoft": "Microsoft 365", "google": "Google"}
REVOKED = "oauth_revoked"  # meta row: the sentence, while the grant is refused
# meta row: "provider:random", new with each connection, so a late rotation cannot undo a reconnect
GRANT = "oauth_grant"
HTTP_TIMEOUT = 15.0
_AADSTS = re.compile(r"AADSTS\d+")


class OAuthError(Exception):
    """No token: ``message`` says why and what to do; ``revoked`` when only reconnecting helps."""

    def __init__(self, message: str, revoked: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.revoked = revoked


@dataclass(frozen=True)
class Connected:
    """An account the admin signed in with: what `smtp connect` and the Settings page store."""

    refresh_token: str
    mailbox: str


# -- HTTP: the trust the issue asks for, for msal and for our own requests -----------------------------
def trust(ca_file: str = "") -> ssl.SSLContext:
    """The system store (SSL_CERT_FILE honoured), REQUESTS_CA_BUNDLE, and smtp_ca_file when set."""
    context = ssl.create_default_context()
    for path in (os.environ.get("REQUESTS_CA_BUNDLE", ""), ca_file):
        if path:
            try:
                context.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as exc:
                raise OAuthError(f"the CA file {path} cannot be read as PEM certificates: {exc}") from None
    return context


class _Response:
    def __init__(self, status_code: int, text: str, headers: dict[str, str]) -> None:
        self.status_code, self.text, self.headers = status_code, text, headers

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise OAuthError(f"the sign-in server answered HTTP {self.status_code}")

    def json(self) -> Any:
        return json.loads(self.text)


class Http:
    """The small HTTP client msal accepts (``post``/``get``), over urllib with our trust.

    msal's own requests session takes a CA bundle that replaces the system
    store, and its ``verify=`` did not reach its tenant discovery; every
    request of ours and msal's goes through this one instead."""

    def __init__(self, context: ssl.SSLContext, timeout: float = HTTP_TIMEOUT) -> None:
        self.context, self.timeout = context, timeout

    def post(self, url: str, params: dict[str, Any] | None = None, data: Any = None,
             headers: dict[str, str] | None = None, **_: Any) -> _Response:
        body = urllib.parse.urlencode(data).encode() if isinstance(data, dict) else (data or "").encode()
        return self._send("POST", url, params, body, {"Content-Type": "application/x-www-form-urlencoded",
                                                      **(headers or {})})

    def get(self, url: str, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
            **_: Any) -> _Response:
        return self._send("GET", url, params, None, headers or {})

    def close(self) -> None:
        pass

    def _send(self, method: str, url: str, params: dict[str, Any] | None, body: bytes | None,
              headers: dict[str, str]) -> _Response:
        import urllib.error  # here: a relay signing in with a password never loads urllib's HTTP client
        import urllib.request

        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, data=body, method=method,
                                         headers={k: v for k, v in headers.items() if v is not None})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as answer:
                return _Response(answer.status, answer.read().decode("utf-8", "replace"), dict(answer.headers))
        except urllib.error.HTTPError as exc:
            return _Response(exc.code, exc.read().decode("utf-8", "replace"), dict(exc.headers or {}))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            host = urllib.parse.urlsplit(url).netloc
            raise OAuthError(f"cannot reach the sign-in server {host}: {reason}") from None


# -- what the store holds -----------------------------------------------------------------------------
def revoked_sentence(store: Any) -> str | None:
    """The revocation sentence while the connection is refused (and smtp_auth still uses it)."""
    if not store.options().uses_oauth:
        return None
    row = store.conn().execute("SELECT value FROM meta WHERE name = ?", (REVOKED,)).fetchone()
    return row[0] if row else None


def connected_provider(store: Any) -> str:
    """Which provider the stored refresh token was connected for ("" when none is known)."""
    row = store.conn().execute("SELECT value FROM meta WHERE name = ?", (GRANT,)).fetchone()
    return row[0].partition(":")[0] if row else ""


def _mark_revoked(store: Any, sentence: str) -> None:
    conn = store.conn()
    with transaction(conn):
        before = conn.execute("SELECT value FROM meta WHERE name = ?", (REVOKED,)).fetchone()
        conn.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = "
                     "excluded.value", (REVOKED, sentence))
    if before is None or before[0] != sentence:
        logger.error("%s.", sentence, extra=fields("oauth.revoked"))


def _clear_revoked(store: Any) -> None:
    conn = store.conn()
    if conn.execute("SELECT 1 FROM meta WHERE name = ?", (REVOKED,)).fetchone() is None:
        return
    with transaction(conn):
        conn.execute("DELETE FROM meta WHERE name = ?", (REVOKED,))


def _stored_grant(store: Any, provider: str) -> tuple[str, str]:
    """(refresh token, grant id) as the store has them now, not as a cached snapshot had them.

    No token when the account was connected for the other provider (smtp_auth changed since)."""
    conn = store.conn()
    row = conn.execute("SELECT value FROM settings WHERE name = 'oauth_refresh_token'").fetchone()
    grant = conn.execute("SELECT value FROM meta WHERE name = ?", (GRANT,)).fetchone()
    if grant and not grant[0].startswith(provider + ":"):
        return "", grant[0]
    try:
        token = store.keys.decrypt_text(row[0]) if row and row[0] else ""
    except DecryptionError:
        raise OAuthError("the stored refresh token cannot be decrypted with this RELAY_SECRET_KEY: connect the "
                         "account again in Settings") from None
    return token, grant[0] if grant else ""


def _save_rotated(store: Any, grant: str, token: str, issued_at: float) -> bool:
    """Keep a rotated refresh token unless a newer one (or another connection) is stored already."""
    conn = store.conn()
    with transaction(conn):
        store._bump_rev(conn)  # every process re-reads its settings (and so the token) on its next look
        current = conn.execute("SELECT value FROM meta WHERE name = ?", (GRANT,)).fetchone()
        if (current[0] if current else "") != grant:
            return False  # connected again meanwhile: that connection wins
        changed = conn.execute(
            "UPDATE settings SET value = ?, updated_at = ? WHERE name = 'oauth_refresh_token' AND updated_at < ?",
            (store.keys.encrypt_text(token), issued_at, issued_at)).rowcount
    return changed == 1


def save_connection(store: Any, provider: str, connected: Connected, audit: tuple[str, str] | None = None) -> None:
    """Store a freshly connected account (and forget any revocation): one transaction."""
    from ..store.audit import insert_audit

    conn = store.conn()
    now = time.time()
    with transaction(conn):
        store._bump_rev(conn)
        values = {"smtp_auth": provider, "oauth_refresh_token": store.keys.encrypt_text(connected.refresh_token),
                  "smtp_username": connected.mailbox}
        for name, text in values.items():
            conn.execute("INSERT INTO settings (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(name)"
                         " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at", (name, text, now))
        conn.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = "
                     "excluded.value", (GRANT, f"{provider}:{secrets.token_hex(8)}"))
        conn.execute("DELETE FROM meta WHERE name = ?", (REVOKED,))
        if audit is not None:
            insert_audit(conn, audit[0], audit[1], "settings.oauth_connect",
                         f"connected the {PROVIDER_NAMES[provider]} account {connected.mailbox}", ts=now)


# -- the token cache -------------------------------------------------------------------------------------
_cache: dict[str, tuple[str, float]] = {}  # source -> (access token, refresh at)
_cache_lock = threading.Lock()
_fetch_lock = threading.Lock()  # one refresh at a time in a process: the others wait and use its token


def _source(options: Options) -> str:
    """Identifies where a token came from: another account or client never gets this one.

    Not the refresh token: it rotates, and the access token it gave stays good for the same mailbox."""
    parts = (options.smtp_auth, options.oauth_authority, options.oauth_google_authority, options.oauth_tenant,
             options.oauth_client_id, options.oauth_client_secret, options.oauth_client_certificate,
             options.oauth_service_account, options.smtp_username.lower(), options.smtp_ca_file)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def access_token(options: Options, store: Any, fresh: bool = False) -> str:
    """A valid access token for ``options``' account; raises ``OAuthError`` (blocking, network)."""
    source = _source(options)
    with _cache_lock:
        hit = _cache.get(source)
    if hit and not fresh and time.time() < hit[1]:
        return hit[0]
    with _fetch_lock:
        with _cache_lock:
            again = _cache.get(source)
        if again and again is not hit and not fresh and time.time() < again[1]:
            return again[0]  # another thread refreshed while this one waited
        if not options.smtp_username:
            raise OAuthError(f"no mailbox to send as: connect the {PROVIDER_NAMES[options.smtp_auth]} account, "
                             "or set smtp_username")
        started = time.time()
        token, lifetime = _fetch(options, store)
        # Early by a quarter of its life, at most 5 minutes: a message never goes out with a token about to lapse.
        refresh_at = started + lifetime - min(300.0, lifetime / 4)
        with _cache_lock:
            _cache[source] = (token, refresh_at)
    return token


def _fetch(options: Options, store: Any) -> tuple[str, float]:
    refresh_token, grant = _stored_grant(store, options.smtp_auth)
    if options.smtp_auth == "microsoft":
        if refresh_token:
            app = _microsoft_app(options, public=True)
            result = app.acquire_token_by_refresh_token(refresh_token, scopes=[MICROSOFT_SEND_SCOPE])
        elif options.oauth_client_secret or options.oauth_client_certificate:
            result = _microsoft_app(options, public=False).acquire_token_for_client(scopes=[MICROSOFT_APP_SCOPE])
        else:
            raise OAuthError("the Microsoft 365 account is not connected: connect it in Settings (or run "
                             "`tspro-relay smtp connect microsoft`), or give the application's client secret or "
                             "certificate")
    elif refresh_token:
        result = _google_refresh(options, refresh_token)
    elif options.oauth_service_account:
        return _google_service_account(options)
    else:
        raise OAuthError("the Google account is not connected: connect it in Settings (or give a service "
                         "account key, oauth_service_account)")
    if "access_token" not in result:
        _refused(options, store, result)
    issued_at = time.time()
    rotated = result.get("refresh_token")
    if rotated and rotated != refresh_token:
        _save_rotated(store, grant, rotated, issued_at)
    _clear_revoked(store)
    return result["access_token"], float(result.get("expires_in") or 3600)


def _refused(options: Options, store: Any, result: dict[str, Any]) -> None:
    error = str(result.get("error") or "error")
    description = str(result.get("error_description") or "").strip()
    first = description.splitlines()[0][:160] if description else ""
    aadsts = _AADSTS.search(description)
    name = PROVIDER_NAMES[options.smtp_auth]
    if error in ("invalid_grant", "interaction_required"):
        detail = aadsts.group(0) if aadsts else (f"{error}: {first}" if first else error)
        sentence = f"The {name} connection was revoked ({detail}): reconnect it in Settings"
        _mark_revoked(store, sentence)
        raise OAuthError(sentence, revoked=True)
    raise OAuthError(f"{name} refused the token request ({first or error})")


# -- Microsoft (msal) ------------------------------------------------------------------------------------
_apps: dict[tuple[Any, ...], Any] = {}


def _microsoft_app(options: Options, public: bool) -> Any:
    """One msal application per client and authority in this process (it keeps its discovery)."""
    if not (options.oauth_tenant and options.oauth_client_id):
        raise OAuthError("Microsoft 365 needs oauth_tenant and oauth_client_id (the app registration's "
                         "directory and application ids)")
    key = (public, options.oauth_authority, options.oauth_tenant, options.oauth_client_id,
           "" if public else options.oauth_client_secret + options.oauth_client_certificate, options.smtp_ca_file)
    app = _apps.get(key)
    if app is None:
        import msal

        common = dict(authority=f"{options.oauth_authority}/{options.oauth_tenant}",
                      http_client=Http(trust(options.smtp_ca_file)),
                      # Tenant discovery at the authority itself: a national cloud or a stand-in is not
                      # looked up at login.microsoftonline.com first.
                      instance_discovery=False)
        try:
            if public:
                app = msal.PublicClientApplication(options.oauth_client_id, **common)
            else:
                app = msal.ConfidentialClientApplication(options.oauth_client_id,
                                                         client_credential=_credential(options), **common)
        except ValueError as exc:  # discovery failed: msal says which address
            raise OAuthError(f"Microsoft sign-in discovery failed: {str(exc).splitlines()[0][:200]}") from None
        _apps[key] = app
    return app


def _credential(options: Options) -> Any:
    """The certificate when there is one (msal signs an assertion with it, PS256), else the secret."""
    pem = options.oauth_client_certificate
    if not pem:
        return options.oauth_client_secret
    key = re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", pem, re.DOTALL)
    cert = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if key is None or cert is None:
        raise OAuthError("oauth_client_certificate must hold a private key and its certificate in PEM")
    return {"private_key": key.group(0), "public_certificate": cert.group(0)}


def start_device_flow(options: Options) -> dict[str, Any]:
    """Ask for a device code: the answer holds ``user_code`` and ``verification_uri`` to show."""
    flow: dict[str, Any] = _microsoft_app(options, public=True).initiate_device_flow(scopes=[MICROSOFT_SEND_SCOPE])
    if "user_code" not in flow:
        raise OAuthError(f"Microsoft did not start the sign-in ({flow.get('error_description') or flow.get('error')})")
    return flow


def poll_device_flow(options: Options, flow: dict[str, Any], wait: bool = False) -> Connected | None:
    """One look (or, ``wait``, every ``interval`` until the code expires): the account once signed in."""
    app = _microsoft_app(options, public=True)
    kwargs = {} if wait else {"exit_condition": lambda _flow: True}
    result = app.acquire_token_by_device_flow(dict(flow), **kwargs)
    if result.get("error") in ("authorization_pending", "slow_down"):
        if wait:
            raise OAuthError("the code expired before anyone signed in with it; start again")
        return None
    if "access_token" not in result:
        description = str(result.get("error_description") or result.get("error") or "no answer")
        raise OAuthError(f"the sign-in did not complete ({description.splitlines()[0][:200]})")
    if not result.get("refresh_token"):
        raise OAuthError("Microsoft gave no refresh token: the app registration must allow offline_access")
    claims = result.get("id_token_claims") or {}
    mailbox = claims.get("preferred_username") or claims.get("email") or options.smtp_username
    return Connected(result["refresh_token"], str(mailbox))


# -- Google (authorization code with PKCE; plain form posts) -------------------------------------------
_discovered: dict[str, dict[str, Any]] = {}


def _google_endpoints(options: Options) -> dict[str, Any]:
    issuer = options.oauth_google_authority
    if issuer not in _discovered:
        answer = Http(trust(options.smtp_ca_file)).get(f"{issuer}/.well-known/openid-configuration")
        try:
            config = answer.json() if answer.status_code == 200 else {}
        except ValueError:
            config = {}
        if "token_endpoint" not in config:
            raise OAuthError(f"{issuer} has no OpenID configuration (HTTP {answer.status_code})")
        _discovered[issuer] = config
    return _discovered[issuer]


def _google_post(options: Options, data: dict[str, str]) -> dict[str, Any]:
    if not options.oauth_client_id:
        raise OAuthError("Google needs oauth_client_id and oauth_client_secret (the OAuth client from Google Cloud "
                         "Console)")
    data = {"client_id": options.oauth_client_id, "client_secret": options.oauth_client_secret, **data}
    answer = Http(trust(options.smtp_ca_file)).post(_google_endpoints(options)["token_endpoint"], data=data)
    try:
        result = answer.json()
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise OAuthError(f"Google's token endpoint answered HTTP {answer.status_code} without JSON")
    return result


def _google_refresh(options: Options, refresh_token: str) -> dict[str, Any]:
    return _google_post(options, {"grant_type": "refresh_token", "refresh_token": refresh_token})


class _GoogleResponse:
    """google-auth's transport response: status, headers, data."""

    def __init__(self, answer: _Response) -> None:
        self.status, self.headers, self.data = answer.status_code, answer.headers, answer.text.encode()


def _google_service_account(options: Options) -> tuple[str, float]:
    """Domain-wide delegation: the service account signs a JWT naming the mailbox (google-auth does it)."""
    from google.auth import exceptions
    from google.oauth2 import service_account

    http = Http(trust(options.smtp_ca_file))

    def transport(url: str, method: str = "GET", body: Any = None, headers: Any = None, **_: Any) -> _GoogleResponse:
        data = body.encode() if isinstance(body, str) else body
        return _GoogleResponse(http._send(method, url, None, data, dict(headers or {})))

    try:
        credentials = service_account.Credentials.from_service_account_info(
            json.loads(options.oauth_service_account), scopes=["https://mail.google.com/"],
            subject=options.smtp_username)
        credentials.refresh(transport)
    except (exceptions.GoogleAuthError, ValueError) as exc:
        detail = exc.args[0] if exc.args else exc
        raise OAuthError(f"Google refused the service account for {options.smtp_username} ({detail}); check its "
                         "domain-wide delegation for the scope https://mail.google.com/") from None
    expiry = credentials.expiry.replace(tzinfo=timezone.utc).timestamp() if credentials.expiry else time.time() + 3600
    return str(credentials.token), max(expiry - time.time(), 1.0)


@dataclass(frozen=True)
class Authorization:
    """A Google sign-in under way: the page to send the admin to, and what checks its return."""

    url: str
    state: str
    verifier: str


def authorization(options: Options, redirect_uri: str) -> Authorization:
    """The authorization request (PKCE S256, offline access) for the admin's browser."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(24)
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": options.oauth_client_id, "redirect_uri": redirect_uri,
        "scope": GOOGLE_SCOPE, "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
        "access_type": "offline", "prompt": "consent"})
    return Authorization(f"{_google_endpoints(options)['authorization_endpoint']}?{query}", state, verifier)


def exchange_code(options: Options, code: str, verifier: str, redirect_uri: str) -> Connected:
    """The authorization code for the account's tokens; the mailbox is the id token's email."""
    result = _google_post(options, {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                    "redirect_uri": redirect_uri})
    if "refresh_token" not in result:
        description = result.get("error_description") or result.get("error") or "no refresh token"
        raise OAuthError(f"Google did not complete the sign-in ({description})")
    mailbox = _id_token_email(str(result.get("id_token") or "")) or options.smtp_username
    return Connected(result["refresh_token"], mailbox)


def _id_token_email(id_token: str) -> str:
    """The email claim; the token came straight from the token endpoint over TLS, so it is not re-verified."""
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        raise OAuthError("Google's answer named no account (no id token): the scope must include email") from None
    return str(claims.get("email") or "")


# -- a sign-in under way (the Settings page's, which may span web processes) ----------------------------
PENDING = "oauth_pending"  # meta row: the device flow or PKCE verifier, encrypted; minutes long


def save_pending(store: Any, pending: dict[str, Any]) -> None:
    conn = store.conn()
    with transaction(conn):
        conn.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = "
                     "excluded.value", (PENDING, store.keys.encrypt_text(json.dumps(pending))))


def load_pending(store: Any, provider: str) -> dict[str, Any] | None:
    """The sign-in under way for ``provider``, unless it expired (or another secret wrote it)."""
    row = store.conn().execute("SELECT value FROM meta WHERE name = ?", (PENDING,)).fetchone()
    if row is None:
        return None
    try:
        pending: dict[str, Any] = json.loads(store.keys.decrypt_text(row[0]))
    except (DecryptionError, ValueError):
        return None
    if pending.get("provider") != provider or pending.get("expires_at", 0) < time.time():
        return None
    return pending


def clear_pending(store: Any) -> None:
    conn = store.conn()
    with transaction(conn):
        conn.execute("DELETE FROM meta WHERE name = ?", (PENDING,))
