"""A tiny HTTP server for /healthz, /readyz, /metrics and /status (asyncio streams, no framework).

Bound to localhost unless configured otherwise. Handlers are plain callables
returning (status, content type, body); the server knows nothing of the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

__all__ = ["HttpServer", "Response"]

Response = tuple[int, str, bytes]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable",
            500: "Internal Server Error"}


class HttpServer:
    def __init__(self, host: str, port: int, routes: Mapping[str, Callable[[], Response]]) -> None:
        self._host = host
        self._port = port
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, path = parts[0], parts[1].split("?", 1)[0]
            handler = self._routes.get(path)
            if handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            elif method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"use GET\n"
            else:
                try:
                    status, ctype, body = handler()
                except Exception as exc:  # a broken handler must not take the daemon down
                    status, ctype, body = 500, "text/plain", f"{exc}\n".encode()
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + (body if method == "GET" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
