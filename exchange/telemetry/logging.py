"""structlog set-up: every line the process logs is one structlog line, JSON in production and a
readable console on a terminal.

- The package's loggers (structlog) and every stdlib logger (asyncpg, aiokafka, asyncio's "Task
  exception was never retrieved", warnings once :func:`capture_uncaught` ran) go through the same
  processors to the same stream, under one lock, so lines never interleave. The stdlib loggers log
  WARNING and above unless ``[log] level = "debug"`` (aiokafka is chatty at INFO).
- Every value is bounded, then masked. A string keeps its first :data:`MAX_CHARS` characters
  (tracebacks: :data:`MAX_TRACEBACK_CHARS`) and says how long it was; containers keep
  :data:`MAX_ITEMS` items; any other object becomes its bounded ``repr``. A secret that the cut
  leaves open at the end of a prefix is masked too (:func:`exchange.settings.mask_cut`). Then
  :func:`exchange.settings.mask_secrets` runs, in time linear in what is left: a value under a
  secret-sounding key, or a URL/DSN password inside any value, never reaches the output, whatever a
  caller (or a producer, through a dead letter's reason) passes.
- :func:`log_fatal` writes the error that ends the process as one critical line: its type, its
  message and the traceback as a bounded field. :func:`capture_uncaught` makes the hooks for
  uncaught exceptions (main thread, other threads, ``__del__``) write log lines instead of plain text.

Loggers are bound with context (``instrument``, ``seq``) by their callers; the hot path logs nothing
per order at INFO.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from types import TracebackType
from typing import Any, TextIO

import structlog

from exchange.settings import mask_cut, mask_secrets

__all__ = ["MAX_CHARS", "MAX_ITEMS", "MAX_TRACEBACK_CHARS", "bound", "bound_processor", "capture_uncaught",
           "configure_logging", "get_logger", "log_fatal", "mask_processor", "truncate"]

MAX_CHARS = 2_000  # of any string in a log line (the event, a value, a key)
MAX_TRACEBACK_CHARS = 20_000  # of a traceback or a stack (keys ``exception``, ``stack``, ``stack_info``)
MAX_ITEMS = 100  # of a mapping or a sequence inside a log line
MAX_DEPTH = 8  # of nested containers
_TRACEBACK_KEYS = frozenset({"exception", "stack", "stack_info"})


def truncate(text: str, limit: int = MAX_CHARS) -> str:
    """``text``, or its first ``limit`` characters and how long it was; a secret cut open at the end is masked."""
    if len(text) <= limit:
        return text
    return f"{mask_cut(text[:limit])} …[truncated: {len(text)} chars]"


def bound(value: Any, limit: int = MAX_CHARS, depth: int = 0) -> Any:
    """``value`` as JSON-shaped data of bounded size (see the module docstring)."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):  # a huge int would cost its square to print, or fail (int_max_str_digits)
        return value if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, str):
        return truncate(value, limit)
    if depth >= MAX_DEPTH:
        return f"<{type(value).__name__} nested too deep>"
    if isinstance(value, Mapping):
        return _bound_items(value.items(), len(value), depth)
    if isinstance(value, list | tuple | set | frozenset):
        items = [bound(v, MAX_CHARS, depth + 1) for v in islice(value, MAX_ITEMS)]
        return [*items, f"…[{len(value) - MAX_ITEMS} more]"] if len(value) > MAX_ITEMS else items
    return truncate(repr(value), limit)


def _bound_items(items: Iterable[tuple[Any, Any]], n: int, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in islice(items, MAX_ITEMS):
        key = str(k)
        value = bound(v, MAX_TRACEBACK_CHARS if depth == 0 and key in _TRACEBACK_KEYS else MAX_CHARS, depth + 1)
        if len(key) > MAX_CHARS:  # the key is cut too: decide on all of it whether its value is a secret
            value = mask_secrets(value, key)
        out[truncate(key)] = value
    if n > MAX_ITEMS:
        out["…"] = f"{n - MAX_ITEMS} more"
    return out


def bound_processor(logger: Any, method: str, event_dict: Any) -> Any:
    """structlog processor: every field bounded (see module docstring); runs before :func:`mask_processor`."""
    return _bound_items(event_dict.items(), len(event_dict), 0)


def mask_processor(logger: Any, method: str, event_dict: Any) -> Any:
    """structlog processor: secrets masked in every field (see module docstring)."""
    return mask_secrets(event_dict)


class _StdlibHandler(logging.Handler):
    """Writes stdlib records as structlog lines, to structlog's stream under structlog's lock for it."""

    def __init__(self, stream: TextIO, formatter: logging.Formatter, level: int) -> None:
        super().__init__(level)
        self.setFormatter(formatter)
        self._out = structlog.PrintLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            try:
                line = self.format(record)
            except Exception as exc:  # a library's bad call (wrong %-arguments): still one line, saying so
                line = self.format(logging.makeLogRecord({
                    "name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                    "msg": "unformattable log record: %r %% %r (%r)", "args": (record.msg, record.args, exc)}))
            self._out.msg(line)
        except Exception:  # the stream itself is broken: nothing better than logging's own last resort
            self.handleError(record)


@dataclass(frozen=True, slots=True)
class _Configured:
    level: str
    stream: TextIO


_configured: _Configured | None = None


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """``fmt``: ``json``, ``console`` or ``auto`` (console on a TTY, JSON otherwise); to stderr by default.
    Also routes the stdlib root logger (third-party libraries) there; calling it again replaces both."""
    global _configured
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    finish = [structlog.processors.format_exc_info, bound_processor, mask_processor, renderer]
    levelno = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, timestamper,
                    structlog.processors.StackInfoRenderer(), *finish],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                           structlog.stdlib.add_logger_name, timestamper],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish])
    threshold = logging.DEBUG if levelno <= logging.DEBUG else max(levelno, logging.WARNING)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(_StdlibHandler(stream, formatter, threshold))
    root.setLevel(threshold)
    _configured = _Configured(level, stream)


def get_logger(name: str, **context: Any) -> Any:
    return structlog.get_logger(name).bind(**context)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _reason(exc: BaseException) -> dict[str, Any]:
    """The error's type and message; for an exception group (a TaskGroup's), its first leaf's."""
    leaves = _leaves(exc)
    try:
        message = str(leaves[0])
    except Exception:
        message = "<str() failed>"
    reason: dict[str, Any] = {"error_type": _type_name(leaves[0]), "error": message}
    if len(leaves) > 1:
        reason["errors"] = len(leaves)
    return reason


def _leaves(exc: BaseException) -> list[BaseException]:
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    out: list[BaseException] = []
    for sub in exc.exceptions:
        out += [leaf for leaf in _leaves(sub) if all(leaf is not seen for seen in out)]  # a task's error may come twice
    return out or [exc]


def log_fatal(exc: BaseException, *, traceback: bool = True) -> None:
    """One critical line for the error that ends the process (the caller exits with status 1): its type and
    message, and the traceback as the bounded ``exception`` field -- unless ``traceback`` is false: a start-up
    failure whose message says what to do (a missing database, a broker that does not answer). To stderr if
    logging is not configured or its stream is closed (the demo's log file, once the demo is over)."""
    _writable()
    structlog.get_logger("exchange").critical("fatal error; exiting", **_reason(exc), exit_status=1,
                                              exc_info=exc if traceback else None)


def _writable() -> None:
    if _configured is None or _configured.stream.closed:
        configure_logging(_configured.level if _configured is not None else "info", "auto")


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if _configured is None:
        sys.__excepthook__(exc_type, exc, tb)
    elif issubclass(exc_type, KeyboardInterrupt):
        _writable()
        structlog.get_logger("exchange").warning("interrupted; exiting")
    else:
        log_fatal(exc.with_traceback(tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if _configured is None or args.exc_value is None:
        threading.__excepthook__(args)
    elif not issubclass(args.exc_type, SystemExit):  # like the default hook: a thread's SystemExit is silent
        _writable()
        structlog.get_logger("exchange").error(
            "uncaught exception in a thread", thread=args.thread.name if args.thread is not None else None,
            **_reason(args.exc_value), exc_info=args.exc_value.with_traceback(args.exc_traceback))


def _unraisablehook(args: sys.UnraisableHookArgs) -> None:
    if _configured is None or args.exc_value is None:
        sys.__unraisablehook__(args)
        return
    try:
        where = repr(args.object)
    except Exception:
        where = f"<{type(args.object).__name__} object>"
    _writable()
    structlog.get_logger("exchange").error(
        args.err_msg or "Exception ignored in", object=where, **_reason(args.exc_value),
        exc_info=args.exc_value.with_traceback(args.exc_traceback))


def capture_uncaught() -> None:
    """From now on, an exception nobody catches (in the main thread: :func:`log_fatal`; in another thread;
    in ``__del__``) and a warning are log lines, once :func:`configure_logging` has run (plain text before).
    For processes only: it replaces process-wide hooks (a test suite's own, too)."""
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook
    logging.captureWarnings(True)
