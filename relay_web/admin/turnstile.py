"""Cloudflare Turnstile on the sign-in page: the server-side check, failing closed.

Anything but a clear "success", an unreachable verifier included, refuses the
sign-in: a bot check that cutting the network switches off protects nothing.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import urlencode

from relay_core.options import Options

RESPONSE_FIELD = "cf-turnstile-response"  # the widget's hidden field in the form
TIMEOUT_SECONDS = 10.0
SCRIPT_URL = "https://challenges.cloudflare.com/turnstile/v0/api.js"


class TurnstileFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def verify(options: Options, token: str, remote_ip: str, timeout: float = TIMEOUT_SECONDS) -> None:
    """Return when Cloudflare confirms the token; raise ``TurnstileFailed`` otherwise (blocking)."""
    if not token:
        raise TurnstileFailed("Complete the bot check above the Sign in button, then sign in.")
    data = urlencode({"secret": options.turnstile_secret, "response": token[:2048],
                      "remoteip": remote_ip}).encode()
    request = urllib.request.Request(options.turnstile_verify_url, data=data, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    unreachable = TurnstileFailed(
        "The bot check could not be verified (the Turnstile verifier did not answer properly), so sign-in "
        "is refused for now. Try again in a minute; if it keeps happening, the relay cannot reach "
        "challenges.cloudflare.com.")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read(64 * 1024))
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection open otherwise
        raise unreachable from None
    except (urllib.error.URLError, OSError, ValueError):
        raise unreachable from None
    if not isinstance(answer, dict):
        raise unreachable
    if answer.get("success") is True:
        return
    raise TurnstileFailed("The bot check did not pass. Complete it again, then sign in.")
