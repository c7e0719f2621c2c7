"""Every log line is one structlog line, bounded and masked: the package's own, the stdlib's (asyncpg,
aiokafka, asyncio, warnings) and uncaught exceptions; a fatal error is one critical line with its reason.

Logging is configured to a ``StringIO``; the fixture puts back everything process-wide that
:func:`configure_logging` and :func:`capture_uncaught` replace (structlog's configuration, the root
logger's handlers and level, the exception hooks, warnings capture).
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

import exchange.telemetry.logging as exchange_logging
from exchange.telemetry.logging import (
    MAX_CHARS,
    MAX_ITEMS,
    MAX_TRACEBACK_CHARS,
    bound_processor,
    capture_uncaught,
    configure_logging,
    get_logger,
    log_fatal,
    mask_processor,
)

Lines = Callable[[], list[dict[str, Any]]]
MARKER = len(" …[truncated: 1000000000 chars]")


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for obj, name in ((sys, "excepthook"), (sys, "unraisablehook"), (threading, "excepthook"),
                      (exchange_logging, "_configured")):
        monkeypatch.setattr(obj, name, getattr(obj, name))
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**saved)


def json_logging(level: str = "info") -> tuple[io.StringIO, Lines]:
    stream = io.StringIO()
    configure_logging(level, "json", stream=stream)
    return stream, lambda: [json.loads(line) for line in stream.getvalue().splitlines()]


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.usefixtures("restore_logging")
def test_a_library_warning_with_a_traceback_is_one_masked_bounded_json_line() -> None:
    stream, lines = json_logging()
    exc = raised(ConnectionError("lost postgresql://ex:s3cret@db/x while sending " + "v" * 100_000))
    logging.getLogger("asyncpg.pool").warning("connection to %s failed: %s", "postgresql://ex:hunter2@db/x",
                                              "x" * 100_000, exc_info=exc)
    assert stream.getvalue().count("\n") == 1
    [line] = lines()
    assert (line["level"], line["logger"]) == ("warning", "asyncpg.pool")
    assert line["event"].startswith("connection to postgresql://ex:***@db/x failed: xxx")
    assert line["event"].endswith(" …[truncated: 100051 chars]")
    assert len(line["event"]) <= MAX_CHARS + MARKER
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "ConnectionError: lost postgresql://ex:***@db/x while sending vvv" in line["exception"]
    assert len(line["exception"]) <= MAX_TRACEBACK_CHARS + MARKER
    assert "hunter2" not in stream.getvalue()
    assert "s3cret" not in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_the_package_and_the_libraries_write_the_same_lines_to_one_stream() -> None:
    _, lines = json_logging()
    get_logger("exchange.source").warning("message dead-lettered", reason="x" * 10_000 + " redis://:pw@cache")
    logging.getLogger("aiokafka").error("fetch failed: %s", "redis://:pw@cache")
    own, foreign = lines()
    assert own.keys() == {"event", "reason", "level", "timestamp"}
    assert len(own["reason"]) <= MAX_CHARS + MARKER
    assert foreign == {"event": "fetch failed: redis://:***@cache", "level": "error", "logger": "aiokafka",
                       "timestamp": foreign["timestamp"]}


@pytest.mark.parametrize(("level", "shown"), [("info", ["warning"]), ("warning", ["warning"]),
                                              ("error", []), ("debug", ["debug", "info", "warning"])])
@pytest.mark.usefixtures("restore_logging")
def test_libraries_log_warnings_and_above_unless_the_level_is_debug(level: str, shown: list[str]) -> None:
    _, lines = json_logging(level)
    library = logging.getLogger("aiokafka.consumer")
    library.setLevel(logging.DEBUG)  # a library's own level does not let more through
    try:
        library.debug("d")
        library.info("i")
        library.warning("w")
    finally:
        library.setLevel(logging.NOTSET)
    assert [line["level"] for line in lines()] == shown


@pytest.mark.usefixtures("restore_logging")
def test_the_console_format_is_masked_too() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    logging.getLogger("asyncpg").warning("postgresql://u:hunter2@db/x")
    get_logger("exchange.daemon").info("connecting", dsn_like="postgresql://u:hunter2@db/x")
    assert "hunter2" not in stream.getvalue()
    assert stream.getvalue().count("postgresql://u:***@db/x") == 2


@pytest.mark.usefixtures("restore_logging")
def test_a_record_that_cannot_be_formatted_is_still_one_line() -> None:
    _, lines = json_logging()
    [handler] = [h for h in logging.getLogger().handlers if isinstance(h, exchange_logging._StdlibHandler)]
    # straight to the handler: pytest's own capture handler rightly fails a test that logs such a record
    handler.handle(logging.makeLogRecord({"name": "lib", "levelno": logging.WARNING, "levelname": "WARNING",
                                          "msg": "%d items", "args": ("many",)}))
    [line] = lines()
    assert line["event"].startswith("unformattable log record: '%d items' % ('many',) (TypeError(")
    assert (line["level"], line["logger"]) == ("warning", "lib")


@pytest.mark.usefixtures("restore_logging")
def test_a_task_exception_never_retrieved_is_a_json_line() -> None:
    _, lines = json_logging()

    async def fail() -> None:
        raise ValueError("postgresql://u:hunter2@db/x")

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(fail())
        loop.run_until_complete(asyncio.sleep(0))
        del task
        gc.collect()
    finally:
        loop.close()
    [line] = lines()
    assert (line["level"], line["logger"]) == ("error", "asyncio")
    assert line["event"].startswith("Task exception was never retrieved")
    assert line["exception"].endswith("ValueError: postgresql://u:***@db/x")


@pytest.mark.usefixtures("restore_logging")
def test_warnings_and_uncaught_exceptions_become_log_lines() -> None:
    _, lines = json_logging()
    capture_uncaught()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated; see postgresql://u:hunter2@db/x", DeprecationWarning, stacklevel=1)

    def crash() -> None:
        raise RuntimeError("thread gone")

    thread = threading.Thread(target=crash, name="worker-1")
    thread.start()
    thread.join()
    class Leaky:
        def __del__(self) -> None:
            raise OSError("closing postgresql://u:hunter2@db/x failed")

    Leaky()  # its __del__ runs at once, and what it raises goes to sys.unraisablehook
    exc = raised(KeyError("k"))
    sys.excepthook(type(exc), exc, exc.__traceback__)
    warning, in_thread, ignored, fatal = lines()
    assert (warning["level"], warning["logger"]) == ("warning", "py.warnings")
    assert "DeprecationWarning: deprecated; see postgresql://u:***@db/x" in warning["event"]
    assert (in_thread["level"], in_thread["event"], in_thread["thread"]) == ("error", "uncaught exception in a thread",
                                                                           "worker-1")
    assert (in_thread["error_type"], in_thread["error"]) == ("RuntimeError", "thread gone")
    assert in_thread["exception"].endswith("RuntimeError: thread gone")
    assert (ignored["level"], ignored["error_type"], ignored["error"]) == ("error", "OSError",
                                                                         "closing postgresql://u:***@db/x failed")
    assert ignored["event"].startswith("Exception ignored")
    assert ignored["object"].startswith("<function test_warnings_and_uncaught_exceptions_become_log_lines.")
    assert (fatal["level"], fatal["event"], fatal["error_type"], fatal["exit_status"]) == (
        "critical", "fatal error; exiting", "KeyError", 1)


@pytest.mark.usefixtures("restore_logging")
def test_the_hooks_leave_plain_text_alone_until_logging_is_configured(capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange_logging, "_configured", None)  # as in a process that has not configured it yet
    capture_uncaught()
    exc = raised(KeyError("k"))
    sys.excepthook(type(exc), exc, exc.__traceback__)
    assert capsys.readouterr().err.startswith("Traceback (most recent call last):")


@pytest.mark.usefixtures("restore_logging")
def test_a_fatal_error_is_one_critical_line_naming_the_innermost_error() -> None:
    stream, lines = json_logging()

    async def start() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(1))
            tg.create_task(fail())

    async def fail() -> None:
        raise OSError("cannot reach postgresql://u:hunter2@db/x: " + "y" * 50_000)

    try:
        asyncio.run(start())
    except ExceptionGroup as exc:
        log_fatal(exc)
    assert stream.getvalue().count("\n") == 1
    [line] = lines()
    assert (line["level"], line["event"], line["error_type"], line["exit_status"]) == (
        "critical", "fatal error; exiting", "OSError", 1)
    assert line["error"].startswith("cannot reach postgresql://u:***@db/x: yyy")
    assert len(line["error"]) <= MAX_CHARS + MARKER
    assert "ExceptionGroup: unhandled errors in a TaskGroup (1 sub-exception)" in line["exception"]
    assert len(line["exception"]) <= MAX_TRACEBACK_CHARS + MARKER
    assert "hunter2" not in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_a_fatal_error_goes_to_stderr_once_the_log_stream_is_closed(capsys: pytest.CaptureFixture[str]) -> None:
    stream, _ = json_logging()
    stream.close()  # the demo's log file, closed when the demo is over
    log_fatal(raised(RuntimeError("boom")))
    line = json.loads(capsys.readouterr().err)  # stderr is no terminal here: JSON
    assert (line["level"], line["error_type"], line["error"]) == ("critical", "RuntimeError", "boom")


# --------------------------------------------------------------- bounding, then masking

def processed(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = mask_processor(None, "info", bound_processor(None, "info", fields))
    return out


def test_values_are_bounded_json_shaped_data() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque postgresql://u:hunter2@db/x " + "z" * 5_000 + ">"

    out = processed(event="e", n=2**70, ok=True, f=1.5, none=None, items=list(range(250)), pair=(1, "a"),
                    nested={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}, obj=Opaque(),
                    raw=b"\x00" * 3_000)
    assert (out["n"], out["ok"], out["f"], out["none"], out["pair"]) == ("<int of 71 bits>", True, 1.5, None, [1, "a"])
    assert out["items"] == [*range(MAX_ITEMS), "…[150 more]"]
    assert out["nested"]["a"]["b"]["c"]["d"]["e"]["f"]["g"] == "<dict nested too deep>"
    assert out["obj"].startswith("<opaque postgresql://u:***@db/x zzz")
    assert out["obj"].endswith("…[truncated: 5037 chars]")
    assert out["raw"].endswith("…[truncated: 12003 chars]")
    many = processed(**{f"k{n}": n for n in range(150)})
    assert len(many) == MAX_ITEMS + 1
    assert many["…"] == "50 more"


def test_a_long_key_is_cut_but_still_decides_whether_its_value_is_a_secret() -> None:
    key = "k" * (MAX_CHARS + 10) + "_password"
    [(cut, value)] = processed(**{key: "hunter2"}).items()
    assert value == "***"
    assert cut.endswith(f"…[truncated: {len(key)} chars]")


@pytest.mark.parametrize("secret", [
    "postgresql://ex:QQQQQQQQ@db:5432/exchange",
    "rediss://default:QQQQ:QQQQ@cache:6380/0",
    "host=db password='QQQQ QQQQ' dbname=x",
    "host=db password=QQQQQQQQ dbname=x",
    "host=db sslpassword = 'QQQQ\nQQQQ' dbname=x",
])
def test_a_cut_never_leaves_part_of_a_secret_in_clear(secret: str) -> None:
    for at in range(len(secret) + 1):  # the cut falls at each character of the secret in turn
        shown = processed(event="x" * (MAX_CHARS - at) + secret + " and more")["event"]
        assert shown.endswith(" chars]")
        assert "Q" not in shown, (at, shown[MAX_CHARS - at:])
