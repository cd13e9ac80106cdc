"""The admin web interface: sign-in, the Queue page, Settings; served beside the API.

``routes()`` is its part of the application's one route table.

A new page: an endpoint wrapped in ``sessions.require_admin`` (it checks
the session, the forced password change, Origin and CSRF on POST, and sets
``request.state.admin`` / ``csrf_token``), answering
``templating.render(request, "page.html", {...})`` with a template that
extends ``base.html``; its route goes in the list below. Forms post with
``{{ forms.csrf() }}``, read fields with ``forms.read_form``, and show
errors with ``FormState``; a dangerous button is ``forms.confirm_form`` and
its endpoint checks ``forms.confirmed``. Anything an admin does that matters
later goes to ``store.log.record_audit(actor, ip, action, detail)``
(``settings_page.actor(request)`` gives actor and ip). A region with
``data-refresh="N"`` and an id reloads itself every N seconds (app.js).
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from . import account, checks, keys, log_page, message_page, oauth_connect, queue_page, settings_page, signin
from .templating import STATIC_DIR


def routes() -> list[BaseRoute]:
    return [
        Route("/", queue_page.dashboard, methods=["GET"], name="dashboard"),
        Route("/queue/retry", queue_page.retry, methods=["POST"], name="queue_retry"),
        Route("/queue/cancel", queue_page.cancel, methods=["POST"], name="queue_cancel"),
        Route("/queue/pause", queue_page.pause_delivery, methods=["POST"], name="queue_pause"),
        Route("/queue/resume", queue_page.resume_delivery, methods=["POST"], name="queue_resume"),
        Route("/messages/{message_id}", message_page.message_page, methods=["GET"], name="message"),
        Route("/messages/{message_id}/body", message_page.reveal_body, methods=["POST"], name="message_body"),
        Route("/logs", log_page.log_page, methods=["GET"], name="logs"),
        Route("/logs.csv", log_page.export_csv, methods=["GET"], name="logs_csv"),
        Route("/logs/clear", log_page.clear_log, methods=["POST"], name="logs_clear"),
        Route("/login", signin.login_page, methods=["GET"], name="login_page"),
        Route("/login", signin.login, methods=["POST"], name="login"),
        Route("/logout", signin.logout, methods=["POST"], name="logout"),
        Route("/account/password", account.change_password_page, methods=["GET"], name="change_password_page"),
        Route("/account/password", account.change_password, methods=["POST"], name="change_password"),
        Route("/settings", settings_page.settings_page, methods=["GET"], name="settings"),
        Route("/settings/smtp", settings_page.save_smtp, methods=["POST"], name="settings_smtp"),
        Route("/settings/smtp/test", checks.test_connection, methods=["POST"], name="settings_smtp_test"),
        Route("/settings/oauth/microsoft", oauth_connect.connect_microsoft, methods=["POST"], name="oauth_microsoft"),
        Route("/settings/oauth/microsoft/status", oauth_connect.microsoft_status, methods=["GET"],
              name="oauth_microsoft_status"),
        Route("/settings/oauth/google", oauth_connect.connect_google, methods=["GET"], name="oauth_google"),
        Route("/settings/oauth/google/callback", oauth_connect.google_callback, methods=["GET"],
              name="oauth_google_callback"),
        Route("/settings/delivery", settings_page.save_delivery, methods=["POST"], name="settings_delivery"),
        Route("/settings/signin", settings_page.save_signin, methods=["POST"], name="settings_signin"),
        Route("/settings/account", account.save_account, methods=["POST"], name="settings_account"),
        Route("/settings/test-email", checks.send_test_email, methods=["POST"], name="test_email"),
        Route("/settings/test-email/{message_id}", checks.test_email_status, methods=["GET"],
              name="test_email_status"),
        Route("/settings/api-keys", keys.add, methods=["POST"], name="api_key_add"),
        Route("/settings/api-keys/new", keys.generate, methods=["POST"], name="api_key_new"),
        Route("/settings/api-keys/{key_id:int}/reveal", keys.reveal, methods=["POST"], name="api_key_reveal"),
        Route("/settings/api-keys/{key_id:int}/revoke", keys.revoke, methods=["POST"], name="api_key_revoke"),
        Route("/settings/api-keys/{key_id:int}/limits", keys.limits, methods=["POST"], name="api_key_limits"),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
