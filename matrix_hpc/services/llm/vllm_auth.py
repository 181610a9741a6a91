"""ASGI middleware for vLLM's API server: every path but ``/health`` needs
``Authorization: Bearer $VLLM_API_KEY``.

vLLM's own ``--api-key`` check guards only ``/v1/...``; ``/metrics``,
``/tokenize``, ``/invocations``, ``/pause`` and more stay open. This closes
them. Standard library only: the replica copies this file into the server's
hook dir (on its PYTHONPATH, as ``matrix_hpc_vllm_auth``) because the vLLM
interpreter need not have matrix_hpc installed, and passes
``--middleware matrix_hpc_vllm_auth.RequireApiKey``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_ENV = "VLLM_API_KEY"
#: Liveness only (an empty 200): load balancers and our own health checks.
OPEN_PATHS = frozenset({"/health"})
_BODY = b'{"error": "Unauthorized: send Authorization: Bearer <key>"}'


class RequireApiKey:
    """Pure ASGI middleware (vLLM adds it with ``app.add_middleware``)."""

    def __init__(self, app: App) -> None:
        key = os.environ.get(KEY_ENV, "")
        if not key:
            raise RuntimeError(f"{KEY_ENV} is not set: this server would accept anyone; matrix_hpc passes the "
                               "service's key through the environment")
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket") or scope.get("path") in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                    (b"content-length", str(len(_BODY)).encode())]})
            await send({"type": "http.response.body", "body": _BODY})

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                digest = hashlib.sha256(given.encode()).digest()
                return scheme.lower() == "bearer" and hmac.compare_digest(digest, self._digest)
        return False
