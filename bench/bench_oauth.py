"""What OAuth 2.0 costs a worker: memory with msal or google-auth loaded, and the time of a token.

    python bench/bench_oauth.py

Each figure comes from a fresh interpreter (RSS after the step, in MiB) against the tests' stand-in
authorization server on loopback (TLS, its own CA): a password relay's delivery modules; then a
Microsoft token (msal loaded); then a Google service-account token (google-auth loaded). Then, in
this process: a token from memory (the path of every message) and one fetched anew (a refresh).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

STEP = """
import json, sys
sys.path[:0] = {paths!r}
import relay_core.delivery.attempt
from relay_core.delivery import oauth
from relay_core.options import Options
options = Options(**json.loads({options!r}))
class Store:  # what access_token reads of the store: no refresh token, nothing to save
    def conn(self):
        class Conn:
            def execute(self, *a): return self
            def fetchone(self): return None
        return Conn()
if options.smtp_auth != "password":
    oauth.access_token(options, Store())
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
print(rss / 1024, len(sys.modules))
"""


class NoStore:
    """What access_token reads of a store with no connected account (client credentials)."""

    def conn(self) -> "NoStore":
        return self

    def execute(self, *args: object) -> "NoStore":
        return self

    def fetchone(self) -> None:
        return None


def measure(options: dict[str, object]) -> tuple[float, int]:
    code = STEP.format(paths=[str(REPO), str(REPO / "tests")], options=json.dumps(options))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    from oauth_server import CLIENT_ID, CLIENT_SECRET, SERVICE_ACCOUNT, TENANT, AuthorizationServer
    from relay_core.delivery import oauth
    from relay_core.options import Options
    from support import Certificates

    with tempfile.TemporaryDirectory() as tmp, AuthorizationServer(Certificates(Path(tmp))) as authority:
        ca = str(Path(tmp) / "test-ca.pem")
        microsoft = {"smtp_auth": "microsoft", "oauth_authority": authority.base, "oauth_tenant": TENANT,
                     "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET,
                     "smtp_username": "portal@contoso.example", "smtp_ca_file": ca}
        authority.delegated.add(SERVICE_ACCOUNT)
        google = {"smtp_auth": "google", "oauth_google_authority": f"{authority.base}/google",
                  "oauth_service_account": authority.service_account_key(), "smtp_username": "portal@contoso.example",
                  "smtp_ca_file": ca}
        for name, options in (("password (no OAuth)", {}), ("microsoft, client credentials", microsoft),
                              ("google, service account", google)):
            rss, modules = measure(options)
            print(f"{name:32} RSS {rss:6.1f} MiB, {modules} modules")

        settings = Options(**microsoft)  # type: ignore[arg-type]
        store = NoStore()
        oauth.access_token(settings, store)
        started, count = time.perf_counter(), 20_000
        for _ in range(count):
            oauth.access_token(settings, store)
        cached = (time.perf_counter() - started) / count * 1e6
        started, count = time.perf_counter(), 50
        for _ in range(count):
            oauth.access_token(settings, store, fresh=True)
        fetched = (time.perf_counter() - started) / count * 1e3
        print(f"token from memory: {cached:.1f} µs; fetched anew from the stand-in: {fetched:.1f} ms "
              "(loopback TLS, one new connection each)")


if __name__ == "__main__":
    main()
