"""Redis at the edge: where market data goes out (pub/sub channels and the book keys).

:class:`RedisSink` sends the commands of one publishing round (``SET`` of book
keys, ``PUBLISH`` of messages) in ONE pipeline, in the order given: one round
trip whatever the number of messages. Redis executes them in that order on one
connection, so a subscriber sees them in that order too, and a book key is
always written before the messages that follow it.

Any failure (refused, reset, timed out, authentication) raises
:class:`~exchange.pipeline.fanout.SinkUnavailable`; the publisher decides what to do (it
carries on without market data and calls :meth:`RedisSink.ping` until Redis is
back). Secrets never reach a log or an error message: see
:meth:`exchange.settings.RedisSettings.redacted_url`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from exchange.ports import Outgoing, SinkUnavailable
from exchange.settings import RedisSettings

__all__ = ["RedisSink", "redis_client"]


def redis_client(settings: RedisSettings, **options: Any) -> aioredis.Redis:
    """A client from ``[redis]`` settings (URL, user, password, TLS), failing fast rather than retrying."""
    url = settings.url
    if settings.tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    kwargs: dict[str, Any] = {"socket_connect_timeout": settings.connect_timeout_s, "socket_timeout": 5.0,
                              "retry": None, **options}
    if settings.username:
        kwargs["username"] = settings.username
    if settings.password:
        kwargs["password"] = settings.password
    if url.startswith("rediss://") and settings.tls_ca_file:
        kwargs["ssl_ca_certs"] = settings.tls_ca_file
    return aioredis.Redis.from_url(url, **kwargs)


class RedisSink:
    """Pipelined PUBLISH/SET to Redis; see the module docstring."""

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._client: aioredis.Redis | None = None
        self.where = settings.redacted_url()

    async def start(self) -> None:
        if self._client is None:
            self._client = redis_client(self._settings)
        await self.ping()

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ping(self) -> None:
        try:
            await self._require().ping()
        except (RedisError, OSError) as exc:
            raise SinkUnavailable(f"redis at {self.where}: {_describe(exc)}") from None

    async def send(self, commands: Sequence[Outgoing]) -> None:
        if not commands:
            return
        pipe = self._require().pipeline(transaction=False)
        for op, name, data in commands:
            if op == "publish":
                pipe.publish(name, data)
            else:
                pipe.set(name, data)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise SinkUnavailable(f"redis at {self.where}: {_describe(exc)}") from None
        finally:
            await pipe.reset()  # type: ignore[no-untyped-call]

    def _require(self) -> aioredis.Redis:
        if self._client is None:
            self._client = redis_client(self._settings)
        return self._client


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
