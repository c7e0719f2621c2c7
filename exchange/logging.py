"""structlog set-up: JSON lines in production, a readable console on a terminal.

Loggers are bound with context (``instrument``, ``seq``) by their callers; the
hot path logs nothing per order at INFO. Every line passes through
:func:`exchange.settings.mask_secrets` before it is rendered: a value under a
secret-sounding key, or a URL/DSN password inside any value, never reaches the
output, whatever a caller passes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from exchange.settings import mask_secrets

__all__ = ["configure_logging", "get_logger", "mask_processor"]


def mask_processor(logger: Any, method: str, event_dict: Any) -> Any:
    """structlog processor: secrets masked in every field (see module docstring)."""
    return mask_secrets(event_dict)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """``fmt``: ``json``, ``console`` or ``auto`` (console on a TTY, JSON otherwise); to stderr by default."""
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            mask_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str, **context: Any) -> Any:
    return structlog.get_logger(name).bind(**context)
