"""Serving the app with uvicorn (uvloop + httptools, no access log: it halves throughput)."""

from __future__ import annotations

import uvicorn

from relay_core.config import Settings
from relay_core.logs import setup_logging

from .app import create_app


def serve(settings: Settings, host: str, port: int) -> int:
    setup_logging(settings)
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, loop="uvloop", http="httptools",
        access_log=False, log_config=None, log_level=settings.log_level.lower(),
        proxy_headers=False, server_header=False, timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
    return 0
