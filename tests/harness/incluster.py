"""A tiny HTTPS in-cluster API for a warm worker's assignment: one namespace's Secrets, get and watch.

What a warm pod sees of a real apiserver through its ServiceAccount, and nothing more:

- ``GET /api/v1/namespaces/NS/secrets/NAME``: the Secret, or 404;
- ``GET /api/v1/namespaces/NS/secrets?watch=true&fieldSelector=metadata.name=NAME&timeoutSeconds=N``: a
  watch that starts with an ADDED event when the Secret exists already (no ``resourceVersion``, as a real
  apiserver does), then sends ADDED/MODIFIED/DELETED as the test writes, and ends after ``timeoutSeconds``;
- a list (the collection without ``watch``) is 403, as the warm pod's Role allows only get and watch;
- every request needs ``Authorization: Bearer <token>`` (401 otherwise); ``token`` may be rotated.

TLS with a CA from ``trustme``; ``write_service_account(directory)`` writes the ``token``, ``ca.crt`` and
``namespace`` files a pod's service account mount has, and ``environ()`` gives the two variables.

Faults, for the next requests in order: ``get_statuses`` / ``watch_statuses`` (answer with that HTTP
status instead), ``watch_plan`` (per watch, one of ``WatchEnd``: end cleanly, send a 410 ERROR event, or
drop the connection, after some seconds). Every request is recorded in ``requests`` with its arrival
time; ``created_at`` is when the test created each Secret (``time.perf_counter``).

```py
async with FakeInClusterApi() as api:
    api.write_service_account(tmp_path)
    api.watch_plan.append(WatchEnd("clean", after=0.2))
    api.create_secret("warm-1", {"work-id": "work_1", ...})   # plain values; base64 is done here
```
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import ssl
import time
from pathlib import Path
from typing import Any, Literal

import trustme
from aiohttp import web

NAMESPACE = "warm-pods"
TOKEN = "sa-token-1"


@dataclasses.dataclass(frozen=True)
class Seen:
    at: float  # time.perf_counter()
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") == "true"


@dataclasses.dataclass(frozen=True)
class WatchEnd:
    how: Literal["clean", "gone", "drop"]
    after: float = 0.0


def assignment_data(work_id: str, environment_id: str, session_id: str, work_secret: str) -> dict[str, str]:
    return {"work-id": work_id, "environment-id": environment_id, "session-id": session_id,
            "work-secret": work_secret}


class FakeInClusterApi:
    def __init__(self, namespace: str = NAMESPACE, token: str = TOKEN, host: str = "127.0.0.1") -> None:
        self.namespace, self.token, self.host = namespace, token, host
        self.ca = trustme.CA()
        self._cert = self.ca.issue_cert("127.0.0.1", "::1", "localhost")
        self.secrets: dict[str, dict[str, Any]] = {}
        self.created_at: dict[str, float] = {}
        self.requests: list[Seen] = []
        self.get_statuses: list[int] = []
        self.watch_statuses: list[int] = []
        self.watch_plan: list[WatchEnd] = []
        self._watchers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._resource_version = 100
        self.app = web.Application()
        self.app.router.add_get(f"/api/v1/namespaces/{namespace}/secrets/{{name}}", self._get)
        self.app.router.add_get(f"/api/v1/namespaces/{namespace}/secrets", self._collection)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ----- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeInClusterApi:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        self._runner = web.AppRunner(self.app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for queue in list(self._watchers):
            queue.put_nowait(None)
        assert self._runner is not None
        await self._runner.cleanup()

    def environ(self) -> dict[str, str]:
        return {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self.port)}

    def write_service_account(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(self.token)
        (directory / "namespace").write_text(self.namespace)
        self.ca.cert_pem.write_to_path(str(directory / "ca.crt"))
        return directory

    # ----- what the test does ---------------------------------------------------------------------

    def create_secret(self, name: str, data: dict[str, str], *, encode: bool = True) -> None:
        """Create (or replace) the Secret; watchers get ADDED (or MODIFIED). ``data`` holds plain values."""
        event = "MODIFIED" if name in self.secrets else "ADDED"
        self._resource_version += 1
        encoded = {k: base64.b64encode(v.encode()).decode() if encode else v for k, v in data.items()}
        self.secrets[name] = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": self.namespace, "resourceVersion": str(self._resource_version)},
            "data": encoded,
        }
        self.created_at.setdefault(name, time.perf_counter())
        self._notify({"type": event, "object": self.secrets[name]})

    def delete_secret(self, name: str) -> None:
        self._notify({"type": "DELETED", "object": self.secrets.pop(name)})

    def watches(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.is_watch]

    # ----- the server -----------------------------------------------------------------------------

    def _notify(self, event: dict[str, Any]) -> None:
        for queue in self._watchers:
            queue.put_nowait(event)

    def _record(self, request: web.Request) -> web.Response | None:
        self.requests.append(Seen(time.perf_counter(), request.method, request.path, dict(request.query),
                                  request.headers.get("Authorization")))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(401, "Unauthorized")
        return None

    @staticmethod
    def _status(code: int, reason: str, message: str = "") -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                "message": message or reason}
        return web.json_response(body, status=code)

    async def _get(self, request: web.Request) -> web.Response:
        refused = self._record(request)
        if refused is not None:
            return refused
        if self.get_statuses:
            return self._status(self.get_statuses.pop(0), "Injected")
        secret = self.secrets.get(request.match_info["name"])
        if secret is None:
            return self._status(404, "NotFound", f'secrets "{request.match_info["name"]}" not found')
        return web.json_response(secret)

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        refused = self._record(request)
        if refused is not None:
            return refused
        if request.query.get("watch") not in ("true", "1"):
            return self._status(403, "Forbidden", "secrets is forbidden: cannot list resource \"secrets\"")
        if self.watch_statuses:
            return self._status(self.watch_statuses.pop(0), "Injected")
        field = request.query.get("fieldSelector", "")
        name = field.removeprefix("metadata.name=") if field.startswith("metadata.name=") else None
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        end = self.watch_plan.pop(0) if self.watch_plan else None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._watchers.add(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (min(timeout, end.after) if end is not None else timeout)
        try:
            for secret_name, secret in self.secrets.items():
                if name is None or secret_name == name:
                    await self._send(response, {"type": "ADDED", "object": secret})
            while (left := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                if event is None:
                    break
                if name is None or event["object"]["metadata"]["name"] == name:
                    await self._send(response, event)
            if end is not None and end.how == "gone":
                await self._send(response, {"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
                    "message": "too old resource version"}})
            elif end is not None and end.how == "drop":
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._watchers.discard(queue)
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
        await response.write(json.dumps(event).encode() + b"\n")
