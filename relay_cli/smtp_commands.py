"""`tspro-relay smtp connect microsoft` and `smtp test`: OAuth 2.0 sign-in for a server without a browser.

The device code flow needs no browser on the relay's host. Google's device flow
does not allow the Gmail scope, so a Google account is connected from the
Settings page instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from relay_core import crypto
from relay_core.delivery import oauth
from relay_core.config import Settings
from relay_core.errors import RelayError
from relay_core.options import parse_option
from relay_core.store import Store


def _store(settings: Settings) -> Store:
    store = Store.open(settings, crypto.derive_keys(settings))
    store.bootstrap(settings)
    return store


def cmd_smtp_connect(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    try:
        values: dict[str, Any] = {"smtp_auth": "microsoft"}
        for name, value in (("oauth_tenant", args.tenant), ("oauth_client_id", args.client_id)):
            if value:
                values[name] = parse_option(name, value)
        options = dataclasses.replace(store.options(), **values)
        flow = oauth.start_device_flow(options)
        print(f"To connect the relay to Microsoft 365, open {flow['verification_uri']} in a browser and enter the "
              f"code {flow['user_code']}, then sign in with the mailbox the relay should send as.", flush=True)
        print("Waiting for the sign-in (Ctrl-C to give up)...", flush=True)
        connected = oauth.poll_device_flow(options, flow, wait=True)
        assert connected is not None
        store.set_options({k: v for k, v in values.items() if k != "smtp_auth"})
        oauth.save_connection(store, "microsoft", connected, audit=("command line", "-"))
    except (oauth.OAuthError, RelayError) as exc:
        print(f"tspro-relay: {exc.message}.", file=sys.stderr)
        return 1
    finally:
        store.shutdown()
    print(f"Connected: the relay now sends as {connected.mailbox} through Microsoft 365 (smtp_auth=microsoft).")
    return 0


def cmd_smtp_test(args: argparse.Namespace, settings: Settings) -> int:
    """Get a token (for OAuth) and sign in to the mail server, as Test connection does; sends nothing."""
    from relay_core.delivery.smtp import DeliveryError, Target, connect

    store = _store(settings)
    try:
        options = store.options()
        token = oauth.access_token(options, store, fresh=True) if options.uses_oauth else ""
        connect(Target.from_options(options, token)).quit()
    except (oauth.OAuthError, DeliveryError) as exc:
        print(f"tspro-relay: the connection test failed: {exc.message}.", file=sys.stderr)
        return 1
    finally:
        store.shutdown()
    how = f"with an access token for {options.smtp_username}" if options.uses_oauth else "as configured"
    print(f"Signed in to {options.smtp_host}:{options.smtp_port} {how}. No mail was sent.")
    return 0


def register(sub: argparse._SubParsersAction, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_command(sub, "smtp", "connect a Microsoft 365 mailbox (OAuth 2.0), or test the mail server",
                    "Connect the mailbox the relay sends as, or check that the relay can sign in to its mail server.")
    smtp_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    connect = add_command(smtp_sub, "connect", "sign in to Microsoft 365 with a code (device code flow)",
                          "Print an address and a code; sign in there on any device with the mailbox to send as. "
                          "Stores the refresh token (encrypted) and that mailbox, and sets smtp_auth=microsoft. "
                          "Google accounts are connected in Settings (Google allows the mail scope only through "
                          "a browser redirect).")
    connect.add_argument("provider", choices=["microsoft"], help="the provider")
    connect.add_argument("--tenant", default="", help="oauth_tenant: the directory (tenant) id or domain")
    connect.add_argument("--client-id", default="", help="oauth_client_id: the app registration's application id")
    connect.set_defaults(handler=cmd_smtp_connect)
    add_command(smtp_sub, "test", "sign in to the mail server (token included) without sending mail"
                ).set_defaults(handler=cmd_smtp_test)
