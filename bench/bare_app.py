"""The ceiling: a bare Starlette endpoint that only parses the JSON and answers 202."""

from __future__ import annotations

import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def send(request: Request) -> JSONResponse:
    payload = await request.json()
    return JSONResponse({"ok": True, "id": str(len(payload)), "status": "queued"}, status_code=202)


app = Starlette(routes=[Route("/api/send", send, methods=["POST"])])

if __name__ == "__main__":
    http: Any = "httptools"
    if sys.argv[2:] == ["limited"]:  # the relay's protocol (bench_hostile.py --protocol-cost)
        from relay_web.http_limits import LimitedHttpToolsProtocol
        http = LimitedHttpToolsProtocol
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http=http,
                access_log=False, log_level="warning")
