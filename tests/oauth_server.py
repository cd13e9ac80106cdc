"""A stand-in OAuth 2.0 authorization server, and an SMTP server that accepts only XOAUTH2 against it.

``AuthorizationServer`` listens on 127.0.0.1 over TLS with the test CA and
answers as Microsoft's identity platform and Google's do, as far as the relay
uses them: OpenID configuration, device code, authorization code with PKCE
(S256), client credentials and refresh grants. Access tokens expire after
``access_lifetime`` seconds; each refresh hands out a new refresh token
(the old one stays valid, as Microsoft's do) and ``issued_refresh`` keeps the
order they were issued in; ``revoke()`` refuses every grant with
``invalid_grant``, ``restore()`` lifts that. Tenants live under
``/{tenant}`` (Microsoft's layout), Google under ``/google``, where a
service account in ``delegated`` also gets tokens for any mailbox with a JWT
signed by its key (domain-wide delegation).

``XOAuth2SmtpServer`` is aiosmtpd with STARTTLS and AUTH XOAUTH2 only; it
asks the stand-in whether the bearer token is valid for the user, answers a
bad one with the error challenge (334 + base64 JSON), reads the client's
reply and refuses with 535, as Gmail and Exchange Online do.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

import captured_logs
from support import Certificates, Handler, TrackingController, free_port

TENANT = "contoso-tenant"
CLIENT_ID = "client-3b1f9d"
CLIENT_SECRET = "client-secret-Xy7!standin"
GOOGLE_CLIENT_ID = "google-client-77.apps.example"
GOOGLE_CLIENT_SECRET = "google-secret-Qp4!standin"
MAILBOX = "volunteer@contoso.example"
APP_MAILBOX = "portal@contoso.example"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SERVICE_ACCOUNT = "relay-sender@portal-project.iam.example"
captured_logs.remember(CLIENT_SECRET, GOOGLE_CLIENT_SECRET)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(prefix: str) -> str:
    value = f"{prefix}{secrets.token_urlsafe(24)}"
    captured_logs.remember(value)  # no log of the whole suite may ever show one
    return value


class AuthorizationServer:
    def __init__(self, certs: Certificates, access_lifetime: int = 3600) -> None:
        self.access_lifetime = access_lifetime
        self.lock = threading.Lock()
        self.access: dict[str, tuple[str, float]] = {}  # token -> (mailbox, expires at)
        self.refresh: dict[str, tuple[str, str]] = {}  # token -> (mailbox, client id)
        self.issued_refresh: list[str] = []
        self.device: dict[str, dict[str, Any]] = {}  # device code -> user_code, mailbox, expires
        self.codes: dict[str, dict[str, str]] = {}  # authorization code -> what it was issued for
        self.grants: list[str] = []  # grant_type of every token request, in order
        self.revoked = False
        self.token_delay = 0.0  # seconds each token request takes: lets two workers' refreshes overlap
        self.delegated: set[str] = set()  # service accounts a Workspace admin gave domain-wide delegation
        self._account_key: Any = None
        self.certificates: dict[str, Any] = {}  # x5t#S256 -> certificate registered for the app
        self.port = free_port()
        self.base = f"https://127.0.0.1:{self.port}"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _make_handler(self))
        self.httpd.daemon_threads = True
        self.httpd.socket = certs.server_context().wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="oauth-stand-in", daemon=True)

    def __enter__(self) -> "AuthorizationServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what a test does -----------------------------------------------------------------------
    def approve(self, user_code: str, mailbox: str = MAILBOX) -> None:
        """The person signs in at the verification address and enters the code."""
        with self.lock:
            flow = next(f for f in self.device.values() if f["user_code"] == user_code)
            flow["mailbox"] = mailbox

    def revoke(self) -> None:
        with self.lock:
            self.revoked = True
            self.refresh.clear()
            self.access.clear()

    def restore(self) -> None:
        with self.lock:
            self.revoked = False

    def expire_access_tokens(self) -> None:
        with self.lock:
            self.access = {t: (m, 0.0) for t, (m, _) in self.access.items()}

    def valid(self, mailbox: str, token: str) -> bool:
        with self.lock:
            entry = self.access.get(token)
        return entry is not None and entry[1] > time.time() and entry[0] in (mailbox.lower(), "*")

    def newest_refresh_token(self) -> str:
        with self.lock:
            return self.issued_refresh[-1]

    def service_account_key(self) -> str:
        """A service account's JSON key, as Google Cloud Console downloads it, for this stand-in."""
        if self._account_key is None:
            self._account_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self._account_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode()
        captured_logs.remember(pem.splitlines()[1])
        return json.dumps({"type": "service_account", "project_id": "portal-project", "private_key_id": "k1",
                           "private_key": pem, "client_email": SERVICE_ACCOUNT, "client_id": "1001",
                           "token_uri": f"{self.base}/google/token"}, indent=2)

    def client_certificate(self) -> str:
        """A private key and self-signed certificate registered for the app (``cat key.pem cert.pem``)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tspro-relay")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
        self.certificates[_b64url(cert.fingerprint(hashes.SHA256()))] = cert
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        captured_logs.remember(pem.splitlines()[1])
        return pem + cert.public_bytes(serialization.Encoding.PEM).decode()

    def _assertion_ok(self, assertion: str, token_endpoint: str) -> bool:
        """A client assertion (RFC 7523) signed by a registered certificate's key, for this endpoint."""
        try:
            header_part, payload_part, signature = assertion.split(".")
            header = json.loads(base64.urlsafe_b64decode(header_part + "=" * (-len(header_part) % 4)))
            claims = json.loads(base64.urlsafe_b64decode(payload_part + "=" * (-len(payload_part) % 4)))
            # (msal writes the thumbprint in base64 with padding; RFC 7515 says base64url: take either.)
            cert = self.certificates[header["x5t#S256"].rstrip("=").replace("+", "-").replace("/", "_")]
            scheme = (padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
                      if header["alg"] == "PS256" else padding.PKCS1v15())
            cert.public_key().verify(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
                                     f"{header_part}.{payload_part}".encode(), scheme, hashes.SHA256())
        except (ValueError, KeyError, InvalidSignature):
            return False
        return (claims.get("iss") == claims.get("sub") == CLIENT_ID and claims.get("aud") == token_endpoint
                and claims.get("exp", 0) > time.time())

    def _jwt_grant(self, assertion: str) -> tuple[int, dict[str, Any]]:
        """Domain-wide delegation: the assertion is signed by the account's key and names the mailbox."""
        try:
            header, payload, signature = assertion.split(".")
            self._account_key.public_key().verify(
                base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)), f"{header}.{payload}".encode(),
                padding.PKCS1v15(), hashes.SHA256())
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, AttributeError, InvalidSignature):
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        if claims.get("iss") not in self.delegated or "https://mail.google.com/" not in claims.get("scope", "").split():
            return 401, {"error": "unauthorized_client", "error_description": "Client is unauthorized to retrieve "
                         "access tokens using this method, or client not authorized for any of the scopes requested."}
        # (google-auth names Google's own token endpoint as the audience, wherever token_uri points.)
        if claims.get("exp", 0) < time.time() or claims.get("aud") != "https://oauth2.googleapis.com/token":
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: expired or wrong audience."}
        return 200, self._issue(claims["sub"], refresh=False)

    # -- the grants ------------------------------------------------------------------------------
    def configuration(self, prefix: str) -> dict[str, Any]:
        if prefix.endswith("/v2.0"):  # Microsoft: /{tenant}/v2.0/.well-known/...
            root = self.base + prefix[:-len("/v2.0")] + "/oauth2/v2.0"
            issuer = self.base + prefix
        else:
            root = issuer = self.base + prefix
        return {"issuer": issuer, "authorization_endpoint": f"{root}/authorize", "token_endpoint": f"{root}/token",
                "device_authorization_endpoint": f"{root}/devicecode", "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"]}

    def start_device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID:
            return 400, {"error": "unauthorized_client", "error_description": "AADSTS700016: unknown application"}
        device_code, user_code = _token("dc-"), secrets.token_hex(4).upper()
        with self.lock:
            self.device[device_code] = {"user_code": user_code, "mailbox": None, "expires": time.time() + 600}
        return 200, {"device_code": device_code, "user_code": user_code, "interval": 1, "expires_in": 600,
                     "verification_uri": f"{self.base}/devicelogin",
                     "message": f"To sign in, use a web browser to open the page {self.base}/devicelogin and "
                                f"enter the code {user_code} to authenticate."}

    def token(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        google = path.startswith("/google/")
        with self.lock:
            self.grants.append(grant)
            if grant == JWT_GRANT:
                return self._jwt_grant(form.get("assertion", ""))
            if grant == "client_credentials":
                if form.get("client_assertion"):
                    if not self._assertion_ok(form["client_assertion"], self.base + path):
                        return 401, {"error": "invalid_client", "error_description": "AADSTS700027: The certificate "
                                     "with identifier used to sign the client assertion is not registered."}
                elif (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
                    return 401, {"error": "invalid_client",
                                 "error_description": "AADSTS7000215: Invalid client secret provided."}
                return 200, self._issue("*", refresh=False)
            if self.revoked and grant in ("refresh_token", DEVICE_GRANT, "authorization_code"):
                return 400, self._revoked(google)
            if grant == "refresh_token":
                entry = self.refresh.get(form.get("refresh_token", ""))
                if entry is None or entry[1] != form.get("client_id"):
                    return 400, self._revoked(google)
                if google and form.get("client_secret") != GOOGLE_CLIENT_SECRET:
                    return 401, {"error": "invalid_client", "error_description": "The OAuth client was not found."}
                return 200, self._issue(entry[0], client_id=entry[1])
            if grant == DEVICE_GRANT:
                flow = self.device.get(form.get("device_code", ""))
                if flow is None or flow["expires"] < time.time():
                    return 400, {"error": "expired_token", "error_description": "AADSTS70020: code expired"}
                if flow["mailbox"] is None:
                    return 400, {"error": "authorization_pending",
                                 "error_description": "AADSTS70016: pending end-user authorization"}
                del self.device[form["device_code"]]
                return 200, self._issue(flow["mailbox"], client_id=CLIENT_ID, id_token=True)
            if grant == "authorization_code":
                issued = self.codes.pop(form.get("code", ""), None)
                verifier = form.get("code_verifier", "")
                if (issued is None or issued["redirect_uri"] != form.get("redirect_uri")
                        or issued["client_id"] != form.get("client_id")
                        or form.get("client_secret") != GOOGLE_CLIENT_SECRET
                        or _b64url(hashlib.sha256(verifier.encode()).digest()) != issued["challenge"]):
                    return 400, {"error": "invalid_grant", "error_description": "Bad code or code_verifier."}
                return 200, self._issue(issued["mailbox"], client_id=issued["client_id"], id_token=True)
        return 400, {"error": "unsupported_grant_type"}

    def authorize(self, query: dict[str, str], mailbox: str) -> str:
        """The person allowed access: where the browser goes next (the relay, with a code)."""
        if (query.get("client_id") != GOOGLE_CLIENT_ID or query.get("code_challenge_method") != "S256"
                or "https://mail.google.com/" not in query.get("scope", "").split()):
            raise ValueError("bad authorization request")
        code = _token("code-")
        with self.lock:
            self.codes[code] = {"mailbox": mailbox, "challenge": query["code_challenge"],
                                "redirect_uri": query["redirect_uri"], "client_id": query["client_id"]}
        separator = "&" if "?" in query["redirect_uri"] else "?"
        return f"{query['redirect_uri']}{separator}{urllib.parse.urlencode({'code': code, 'state': query['state']})}"

    def _revoked(self, google: bool) -> dict[str, Any]:
        if google:
            return {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
        return {"error": "invalid_grant", "error_codes": [50173],
                "error_description": "AADSTS50173: The provided grant has expired due to it being revoked, a fresh "
                                     "auth token is needed. The user might have changed or reset their password."}

    def _issue(self, mailbox: str, client_id: str = CLIENT_ID, refresh: bool = True,
               id_token: bool = False) -> dict[str, Any]:
        access = _token("at-")
        self.access[access] = (mailbox.lower(), time.time() + self.access_lifetime)
        answer: dict[str, Any] = {"token_type": "Bearer", "access_token": access, "expires_in": self.access_lifetime,
                                  "scope": "https://outlook.office.com/SMTP.Send"}
        if refresh:
            token = _token("rt-")
            self.refresh[token] = (mailbox.lower(), client_id)
            self.issued_refresh.append(token)
            answer["refresh_token"] = token
        if id_token:
            now = int(time.time())
            claims = {"iss": f"{self.base}/{TENANT}/v2.0", "aud": client_id, "sub": "user-1", "oid": "user-1",
                      "tid": TENANT, "iat": now, "nbf": now, "exp": now + 3600, "preferred_username": mailbox,
                      "email": mailbox, "name": "A Volunteer"}
            answer["id_token"] = ".".join([_b64url(b'{"alg":"none","typ":"JWT"}'), _b64url(json.dumps(claims).encode()),
                                           ""])
            answer["client_info"] = _b64url(json.dumps({"uid": "user-1", "utid": TENANT}).encode())
        return answer


def _make_handler(server: AuthorizationServer) -> type[BaseHTTPRequestHandler]:
    class Endpoint(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # codes and tokens travel in query strings
            pass

        def _answer(self, status: int, body: Any, content_type: str = "application/json",
                    headers: dict[str, str] | None = None) -> None:
            data = (json.dumps(body) if content_type == "application/json" else body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _approve(self, form: dict[str, str]) -> None:
            mailbox = form.pop("login", MAILBOX)
            try:
                location = server.authorize(form, mailbox)
            except (ValueError, KeyError):
                self._answer(400, "bad authorization request", "text/plain")
                return
            self._answer(302, "", "text/plain", {"Location": location})

        def do_GET(self) -> None:  # noqa: N802
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            if url.path.endswith("/.well-known/openid-configuration"):
                self._answer(200, server.configuration(url.path[:-len("/.well-known/openid-configuration")]))
            elif url.path.endswith("/authorize"):
                hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                                 for k, v in query.items())
                page = ('<!doctype html><html lang="en"><head><title>Stand-in sign-in</title>'
                        '<link rel="icon" href="data:,"></head><body>'
                        f'<form method="get" action="{url.path[:-len("/authorize")]}/approve">{hidden}'
                        f'<label>Account <input name="login" value="{MAILBOX}"></label>'
                        "<button>Allow</button></form></body></html>")
                self._answer(200, page, "text/html")
            elif url.path.endswith("/approve"):  # the consent page's Allow
                self._approve(query)
            else:
                self._answer(404, {"error": "not_found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            path = urllib.parse.urlsplit(self.path).path
            if path.endswith("/token"):
                if form.get("grant_type") == "refresh_token":
                    time.sleep(server.token_delay)
                self._answer(*server.token(path, form))
            elif path.endswith("/devicecode"):
                self._answer(*server.start_device(form))
            elif path.endswith("/authorize"):
                self._approve(form)
            else:
                self._answer(404, {"error": "not_found"})

    return Endpoint


class XOAuth2Handler(Handler):
    """Accepts AUTH XOAUTH2 with a token the stand-in issued for that mailbox; records every exchange."""

    def __init__(self, authority: AuthorizationServer) -> None:
        super().__init__()
        self.authority = authority
        self.exchanges: list[dict[str, Any]] = []  # initial (base64 as sent), user, ok, reply to the challenge

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:  # noqa: N802
        initial = args[1] if len(args) > 1 else ""
        exchange: dict[str, Any] = {"initial": initial, "ok": False, "challenge_reply": None}
        self.exchanges.append(exchange)
        try:
            fields = base64.b64decode(initial, validate=True).decode()
            user_part, auth_part, *rest = fields.split("\x01")
            user = user_part.removeprefix("user=")
            token = auth_part.removeprefix("auth=Bearer ")
            exchange["user"] = user
        except (ValueError, UnicodeDecodeError):
            return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode the response")
        if rest == ["", ""] and self.authority.valid(user, token):
            exchange["ok"] = True
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"})
        reply = await server.challenge_auth(error)
        exchange["challenge_reply"] = None if reply is MISSING else reply
        return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")


class XOAuth2SmtpServer:
    """Port 587 as Exchange Online and Gmail run it: STARTTLS, then AUTH XOAUTH2 only."""

    mode = "starttls"

    def __init__(self, certs: Certificates, authority: AuthorizationServer) -> None:
        self.handler = XOAuth2Handler(authority)
        self.port = free_port()
        self.controller = TrackingController(
            self.handler, hostname="127.0.0.1", port=self.port, tls_context=certs.server_context(),
            require_starttls=True, auth_required=True, auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"])

    def __enter__(self) -> "XOAuth2SmtpServer":
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    @property
    def received(self) -> list[Any]:
        return self.handler.received


def microsoft_settings(smtp: XOAuth2SmtpServer, authority: AuthorizationServer, certs: Certificates,
                       secret: bool = False, mailbox: str = MAILBOX) -> list[str]:
    """`config set` pairs for Microsoft 365 through the stand-ins (the CA through smtp_ca_file)."""
    pairs = ["smtp_host=127.0.0.1", f"smtp_port={smtp.port}", "smtp_security=starttls", "smtp_timeout_seconds=10",
             f"smtp_ca_file={certs.ca_file}", "smtp_auth=microsoft", f"oauth_authority={authority.base}",
             f"oauth_tenant={TENANT}", f"oauth_client_id={CLIENT_ID}", f"smtp_username={mailbox}"]
    if secret:
        pairs.append(f"oauth_client_secret={CLIENT_SECRET}")
    return pairs


def google_settings(smtp: XOAuth2SmtpServer, authority: AuthorizationServer, certs: Certificates) -> list[str]:
    return ["smtp_host=127.0.0.1", f"smtp_port={smtp.port}", "smtp_security=starttls", "smtp_timeout_seconds=10",
            f"smtp_ca_file={certs.ca_file}", "smtp_auth=google", f"oauth_google_authority={authority.base}/google",
            f"oauth_client_id={GOOGLE_CLIENT_ID}", f"oauth_client_secret={GOOGLE_CLIENT_SECRET}"]
