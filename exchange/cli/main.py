"""The ``exchange`` command line."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import tomllib
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path

import msgspec

from exchange.core.instruments import Instrument
from exchange.core.types import StpMode
from exchange.settings import ConfigError, Settings, load_instruments, load_settings

__all__ = ["main"]

DISTRIBUTION = "ticklot-exchange"  # the name on PyPI (``exchange`` is taken); the import package is ``exchange``
LOCAL_CONFIG = Path("config/exchange.toml")  # a deployment's own file, relative to the working directory
_CONFIG_HELP = f"TOML configuration file (default: {LOCAL_CONFIG} if it exists, else the one shipped in the package)"
_extracted = contextlib.ExitStack()  # the shipped files of a zipped package, extracted while the process runs
atexit.register(_extracted.close)


def version_text() -> str:
    """``exchange --version``: the distribution's name and version; from a source tree that is not installed
    (the package on PYTHONPATH), the version its pyproject.toml declares, and that it is not installed."""
    try:
        return f"{DISTRIBUTION} {metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        pass
    root = Path(__file__).resolve().parents[2]
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        if project["name"] == DISTRIBUTION:
            return f"{DISTRIBUTION} {project['version']} (not installed: the source tree at {root})"
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        pass
    return f"{DISTRIBUTION} (version unknown: not installed)"


def shipped_config(name: str) -> Path:
    """A configuration shipped in the package, ``exchange/defaults/NAME``: ``exchange.toml`` or ``demo.toml``."""
    resource = resources.files("exchange").joinpath("defaults", name)
    if isinstance(resource, Path):
        return resource
    return _extracted.enter_context(resources.as_file(resource))


def config_path(given: str | None, *, demo: bool = False) -> Path:
    """The file a command reads: ``--config`` when given; for the demo, the shipped ``demo.toml``; for every
    other command, :data:`LOCAL_CONFIG` if the working directory has it, else the shipped ``exchange.toml``."""
    if given:
        path = Path(given)
        if not path.is_file():
            instead = ("the demo configuration shipped in the package" if demo else
                       f"{LOCAL_CONFIG} in the working directory if there is one, else the configuration shipped in "
                       "the package")
            raise ConfigError(f"{path}: no such configuration file; pass an existing file, or leave out --config "
                              f"to use {instead}")
        return path
    if demo:
        return shipped_config("demo.toml")
    return LOCAL_CONFIG if LOCAL_CONFIG.is_file() else shipped_config("exchange.toml")


def _shipped(path: Path | None) -> bool:
    return path is not None and path.parent == shipped_config("exchange.toml").parent


def _replay_instruments(args: argparse.Namespace) -> tuple[Instrument, ...]:
    if args.symbol:
        if not (args.tick and args.lot):
            raise ConfigError("--symbol needs --tick and --lot (for example --tick 0.01 --lot 0.001)")
        try:
            return (Instrument.from_decimals(args.symbol, tick_size=args.tick, lot_size=args.lot,
                                             min_qty=args.min_qty, max_qty=args.max_qty,
                                             price_band_bps=args.band_bps, stp_default=args.stp),)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return load_instruments(config_path(args.config))


def _cmd_replay(args: argparse.Namespace) -> int:
    from exchange.cli import replay
    from exchange.pipeline.router import DEFAULT_MAX_MESSAGE_BYTES
    from exchange.wire.auth import ENV_KEYS, Verifier, parse_keys

    instruments = _replay_instruments(args)
    verifier = None
    if args.verify_signatures:
        keys = parse_keys(os.environ.get(ENV_KEYS))
        if not keys:
            print(f"exchange replay: --verify-signatures without {ENV_KEYS}: every operator action will be refused "
                  "(not_authorized), as the daemon refuses them without keys", file=sys.stderr)
        verifier = Verifier(keys)
    max_bytes = DEFAULT_MAX_MESSAGE_BYTES
    if not args.symbol:
        with contextlib.suppress(ConfigError):  # the daemon's own limit, when the file is a whole configuration
            max_bytes = load_settings(config_path(args.config)).kafka.max_message_bytes
    return replay.run(args.file, instruments, verifier=verifier, max_message_bytes=max_bytes)


def _load(args: argparse.Namespace) -> Settings:
    """The command's settings (see :func:`config_path`). The commands that log say in their log which file it
    is (:func:`_log_config`), ``config check`` in its output; the others when it is the shipped default."""
    settings = load_settings(config_path(args.config))
    if _shipped(settings.source) and args.command not in _LOGGED_COMMANDS and args.command != "config":
        print(f"exchange {args.command}: no {LOCAL_CONFIG} here: using the configuration shipped in the package, "
              f"{settings.source} (pass --config FILE to use another)", file=sys.stderr)
    return settings


def _log_config(settings: Settings) -> None:
    from exchange.telemetry.logging import get_logger

    get_logger("exchange").info("configuration", file=str(settings.source), shipped=_shipped(settings.source))


def _cmd_run(args: argparse.Namespace) -> int:
    from exchange.service.daemon import run_daemon
    from exchange.telemetry.logging import configure_logging

    settings = _load(args)
    configure_logging(settings.log.level, settings.log.format)  # run_daemon configures it again, the same way
    _log_config(settings)
    return run_daemon(settings)


def _cmd_migrate(args: argparse.Namespace) -> int:
    import asyncio

    from exchange.service.compose import make_store

    settings = _load(args)

    async def migrate() -> list[str]:
        store = make_store(settings)
        await store.start()
        try:
            return await store.migrate()
        finally:
            await store.stop()

    applied = asyncio.run(migrate())
    print("applied: " + ", ".join(applied) if applied else "the database is up to date")
    return 0


def _cmd_recover(args: argparse.Namespace) -> int:
    import asyncio

    from exchange.ports import StoreUnavailable
    from exchange.service.compose import make_store
    from exchange.telemetry.logging import configure_logging
    from recovery.verify import VerifyReport, unreadable, verify_store

    settings = _load(args)
    configure_logging(settings.log.level, settings.log.format)
    _log_config(settings)
    if not args.verify:
        raise ConfigError("recover needs --verify (the daemon recovers by itself at start-up)")

    if settings.storage.kind == "sqlite" and not Path(settings.storage.path).exists():
        raise ConfigError(f"{settings.storage.path}: no such SQLite store (run the daemon or the demo first)")

    async def check() -> VerifyReport:
        try:
            async with make_store(settings) as store:
                return await verify_store(store, settings.instruments)
        except StoreUnavailable as exc:
            if settings.storage.kind != "postgres":
                raise  # a damaged SQLite file: the one fatal line that says what to do
            return unreadable(exc)  # a database server that does not answer: the report says so

    report = asyncio.run(check())
    print(report.render())
    return 0 if report.ok else 1


def _cmd_config_check(args: argparse.Namespace) -> int:
    from exchange.settings import render_settings

    settings = _load(args)  # a ConfigError exits 2 with the file, the key and why
    print(render_settings(settings), end="")
    note = f", the configuration shipped in the package (no {LOCAL_CONFIG} here)" if _shipped(settings.source) else ""
    print(f"# {settings.source}: OK ({len(settings.instruments)} instruments){note}", file=sys.stderr)
    return 0


def _cmd_admin(args: argparse.Namespace) -> int:
    import asyncio

    from exchange.cli.admin import admin_message, operator_name, run_admin, signing_key

    operator = operator_name(args.operator, os.environ)
    settings = _load(args)
    if args.instrument not in settings.instrument_map():
        raise ConfigError(f"{args.instrument!r} is not an instrument of {settings.source} "
                          f"({', '.join(settings.instrument_map())})")
    client = getattr(args, "client", None)
    key = signing_key(os.environ, args.key_id)
    message = admin_message(args.action, args.instrument, operator=operator, client=client,
                            text=getattr(args, "text", ""), asset=getattr(args, "asset", None),
                            amount=getattr(args, "amount", None), transfer_id=getattr(args, "transfer_id", None))
    outcome = asyncio.run(run_admin(settings, message, timeout_s=args.timeout, key=key))
    where = f"{settings.kafka.orders_topic}[{outcome.partition}] offset {outcome.offset}"
    for event in outcome.events:
        print(msgspec.json.encode(event).decode())
    if not outcome.applied:
        print(f"exchange admin: sent as {where}, but the daemon (group {settings.kafka.group_id!r}) has not "
              f"applied it within {args.timeout:g} s; it will when it consumes that partition. Check that the "
              "daemon is running (`/readyz`) and that it consumes this topic.", file=sys.stderr)
        return 1
    rejected = [e for e in outcome.events if e.get("type") == "rejected"]
    summary = {"halt": "halted", "resume": "resumed", "snapshot": "snapshot requested",
               "cancel-all": f"{sum(e.get('type') == 'canceled' for e in outcome.events)} orders canceled",
               "deposit": "deposited", "withdraw": "withdrawn"}
    print(f"exchange admin: {args.action} {args.instrument}: "
          + (f"rejected ({rejected[0].get('reason')}: {rejected[0].get('text')})" if rejected
             else f"applied ({summary[args.action]}); {where}"), file=sys.stderr)
    return 1 if rejected else 0


def _cmd_accept_offset(args: argparse.Namespace) -> int:
    import asyncio

    from exchange.cli.admin import operator_name, run_accept_offset
    from exchange.ports import InputLedger, InputReset
    from exchange.service.compose import make_store

    operator = operator_name(args.operator, os.environ)
    settings = _load(args)
    topic = args.topic or settings.kafka.orders_topic
    if args.partition < 0 or args.offset < 0:
        raise ConfigError("the partition and the offset must not be negative")
    if not args.reason:
        raise ConfigError("--reason is required: it is journaled with the decision (what happened to the topic)")

    async def accept() -> InputReset:
        store = make_store(settings)
        await store.start()
        try:
            await store.migrate()  # the input_resets table, should the daemon not have created it yet
            assert isinstance(store, InputLedger)
            return await run_accept_offset(store, topic, args.partition, args.offset, operator=operator,
                                           reason=args.reason, timeout_s=args.timeout)
        finally:
            await store.stop()

    reset = asyncio.run(accept())
    where = f"{topic}[{args.partition}]"
    if reset.status == "applied":
        print(f"exchange admin: accept-offset {where}: {reset.note}", file=sys.stderr)
        return 0
    if reset.status == "refused":
        print(f"exchange admin: accept-offset {where}: {reset.note}", file=sys.stderr)
        return 1
    print(f"exchange admin: accept-offset {where}: recorded as request {reset.id}, but no daemon has applied it "
          f"within {args.timeout:g} s. A daemon applies it only while it holds that partition and does not read it "
          "(see its /readyz); it stays recorded and is applied when one does.", file=sys.stderr)
    return 1


def _cmd_topics_create(args: argparse.Namespace) -> int:
    import asyncio

    from exchange.adapters.kafka import client_options
    from exchange.adapters.kafka.topics import create_topics, daemon_topics

    settings = _load(args)
    if args.partitions < 1 or args.replication_factor < 1:
        raise ConfigError("--partitions and --replication-factor must be at least 1")
    topics = daemon_topics(settings)
    if not topics:
        raise ConfigError(f"{settings.source} uses no Kafka topic ([order_source] and [publisher] are not kafka)")
    report = asyncio.run(create_topics(settings.kafka, topics, partitions=args.partitions,
                                       replication_factor=args.replication_factor,
                                       options=client_options(settings.kafka)))
    for topic in topics:
        if topic.name in report.created:
            print(f"created {topic.name}: {args.partitions} partitions, replication factor "
                  f"{args.replication_factor} ({topic.role}, key: {topic.key})")
        else:
            have = report.existing[topic.name]
            note = "" if have == args.partitions else f"; not {args.partitions}: existing topics are not changed"
            print(f"exists  {topic.name}: {have} partitions ({topic.role}, key: {topic.key}){note}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    import asyncio

    from exchange.cli import watch

    settings = _load(args)
    if args.instrument not in settings.instrument_map():
        raise ConfigError(f"unknown instrument {args.instrument!r}; {settings.source} defines "
                          + ", ".join(sorted(settings.instrument_map())))
    if args.check:
        if settings.storage.kind == "sqlite" and not Path(settings.storage.path).exists():
            raise ConfigError(f"{settings.storage.path}: no such SQLite store ([storage] path); --check compares "
                              "with the store the daemon writes: pass the daemon's configuration with --config")
        return asyncio.run(watch.check(settings, args.instrument, seconds=args.seconds or 2.0))
    return asyncio.run(watch.watch(settings, args.instrument, levels=args.levels, seconds=args.seconds))


def _cmd_demo(args: argparse.Namespace) -> int:
    from exchange.cli.demo import run_demo

    if args.seconds is not None and args.seconds <= 0:
        raise ConfigError("--seconds must be positive")
    return run_demo(load_settings(config_path(args.config, demo=True)), headless=True if args.headless else None,
                    seconds=args.seconds, reset=args.reset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exchange", description="Single-writer order-matching engine.")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the distribution's name and version, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rp = sub.add_parser("replay", help="apply JSON-line commands from a file or stdin; one JSON line out per line",
                        description="Apply JSON-line commands; print one JSON line of events per input line. "
                                    "A line {\"op\": \"snapshot\"} prints every book. See README.md.")
    rp.add_argument("file", nargs="?", help="input file (default: stdin)")
    rp.add_argument("--config", help=f"TOML file with [[instruments]] (default: {LOCAL_CONFIG} if it exists, "
                                     "else the configuration shipped in the package)")
    rp.add_argument("--symbol", help="define one instrument on the command line instead of --config")
    rp.add_argument("--tick", help="price tick size, e.g. 0.01 (with --symbol)")
    rp.add_argument("--lot", help="quantity lot size, e.g. 0.001 (with --symbol)")
    rp.add_argument("--min-qty", help="minimum order quantity (with --symbol; default one lot)")
    rp.add_argument("--max-qty", help="maximum order quantity (with --symbol)")
    rp.add_argument("--band-bps", type=int, help="market-order price band in basis points (with --symbol)")
    rp.add_argument("--stp", default="none", choices=[m.value for m in StpMode],
                    help="default self-trade prevention mode (with --symbol)")
    rp.add_argument("--verify-signatures", action="store_true",
                    help="check operator actions' signatures as the daemon does (keys from EXCHANGE_ADMIN_KEYS; "
                         "each line's ts_ns is its time); default: the file is trusted, actions apply unsigned")
    rp.set_defaults(func=_cmd_replay)

    demo = sub.add_parser("demo", help="the daemon on the embedded default (SQLite, order generator) with a live view",
                          description="Run the daemon with no servers: SQLite storage, an in-process order "
                                      "generator, an in-process market-data bus, and a live view that follows "
                                      "it. Ctrl-C stops it cleanly; the next start recovers from the store.")
    demo.add_argument("--config", help="TOML configuration file (default: the demo configuration shipped in the "
                                        "package, exchange/defaults/demo.toml)")
    demo.add_argument("--headless", action="store_true",
                      help="print plain lines once a second instead of a live screen (default when stdout is not "
                           "a terminal)")
    demo.add_argument("--seconds", type=float, help="stop by itself this many seconds after becoming ready")
    demo.add_argument("--reset", action="store_true", help="delete the SQLite store first: start afresh")
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser("run", help="run the daemon: Kafka in, PostgreSQL durable, events out")
    run.add_argument("--config", help=_CONFIG_HELP)
    run.set_defaults(func=_cmd_run)

    mig = sub.add_parser("migrate", help="apply pending database migrations")
    mig.add_argument("--config", help=_CONFIG_HELP)
    mig.set_defaults(func=_cmd_migrate)

    rec = sub.add_parser("recover", help="check the stored state offline (--verify)")
    rec.add_argument("--config", help=_CONFIG_HELP)
    rec.add_argument("--verify", action="store_true",
                     help="rebuild every book from the open orders and compare with the latest snapshot "
                          "and with a replay of all stored events")
    rec.set_defaults(func=_cmd_recover)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    chk = cfg_sub.add_parser("check", help="validate a file; print the effective configuration, secrets masked",
                             description="Validate a configuration file (with the EXCHANGE_* environment "
                                         "overrides applied) and print the effective configuration as TOML with "
                                         "every secret masked. Exit status 2 on any error, naming the key.")
    chk.add_argument("--config", help=_CONFIG_HELP)
    chk.set_defaults(func=_cmd_config_check)

    adm = sub.add_parser("admin", help="operator actions: halt, resume, snapshot, cancel-all, deposit, withdraw, "
                                       "accept-offset",
                         description="Send a signed operator action through the orders topic, in order with the "
                                     "instrument's orders, wait until the daemon has applied it and print the "
                                     "events it caused. Exit 1 if it was rejected or not applied in time. The key "
                                     "comes from EXCHANGE_ADMIN_KEYS (key_id:secret), as the daemon's.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--operator", help="who asks, recorded in the events and the journal (default: $USER, "
                                           "else $LOGNAME; refused when neither is set)")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon (default 30)")
    common.add_argument("--config", help=_CONFIG_HELP)
    actions = adm.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, summary in (("halt", "stop trading an instrument (cancels still work)"),
                            ("resume", "trade on against the book as it was"),
                            ("snapshot", "snapshot the book now"),
                            ("cancel-all", "cancel every order (`cleared`), or one client's with --client"),
                            ("deposit", "money in: --amount of --asset to --client's available balance"),
                            ("withdraw", "money out: --amount of --asset from --client's available balance")):
        act = actions.add_parser(action, parents=[common], help=summary, description=summary)
        act.add_argument("instrument")
        act.add_argument("--key-id", help="which key of EXCHANGE_ADMIN_KEYS signs (default: the only one)")
        if action in ("halt", "resume", "cancel-all"):
            act.add_argument("--text", default="", help="a note recorded with the action, e.g. why")
        if action == "cancel-all":
            act.add_argument("--client", help="only this client's orders (default: every order, reason `cleared`)")
        if action in ("deposit", "withdraw"):
            act.add_argument("--client", required=True, help="whose balance")
            act.add_argument("--asset", required=True, help="the instrument's base or quote asset, e.g. USD")
            act.add_argument("--amount", required=True, help="a decimal on the asset's grid, e.g. 1000.00")
            act.add_argument("--transfer-id", required=True,
                             help="the funding system's id of this transfer: a repeat is refused, never applied twice")
        act.set_defaults(func=_cmd_admin)
    acc = actions.add_parser(
        "accept-offset", parents=[common], help="continue an orders partition whose log lost data from an offset",
        description="For an orders partition the daemon does not read because its log no longer holds what was "
                    "applied (/readyz names it): record the request to continue it from OFFSET (every stored "
                    "offset of the partition becomes OFFSET - 1), wait until the daemon applied or refused it, "
                    "and print the outcome. Journaled in the store's input_resets table.")
    acc.add_argument("partition", type=int, help="the orders partition, as /readyz names it")
    acc.add_argument("--offset", type=int, required=True, help="the first offset to read (0: the new log's start)")
    acc.add_argument("--topic", help="the orders topic (default: [kafka] orders_topic)")
    acc.add_argument("--reason", required=True, help="why (journaled): e.g. 'broker restarted without its volume'")
    acc.set_defaults(func=_cmd_accept_offset)

    tp = sub.add_parser("topics", help="Kafka topic tools")
    tp_sub = tp.add_subparsers(dest="topics_command", required=True, metavar="SUBCOMMAND")
    tpc = tp_sub.add_parser(
        "create", help="create the topics the configuration uses that do not exist yet",
        description="Create the Kafka topics this configuration uses (orders and dead letters with the Kafka "
                    "source; order events and trades with the Kafka publisher) that do not exist yet, with the "
                    "admin client; the orders topic with message.timestamp.type=LogAppendTime. Existing topics "
                    "are reported with their partition counts and left as they are, so running it again changes "
                    "nothing. Choose the partitions before the first order: an instrument lives on one orders "
                    "partition for good (README: Running `exchange run` from nothing, step 5).")
    tpc.add_argument("--partitions", type=int, required=True, help="partitions of each topic created")
    tpc.add_argument("--replication-factor", type=int, default=1,
                     help="replicas of each partition (default 1; 3 on a production cluster)")
    tpc.add_argument("--config", help=_CONFIG_HELP)
    tpc.set_defaults(func=_cmd_topics_create)

    wt = sub.add_parser("watch", help="follow an instrument's market data from Redis: book, spread, trades",
                        description="Follow the market-data sync procedure (README: Market data) and show the top "
                                    "of the book, the spread and the latest trades live; gaps and resyncs are "
                                    "reported. --check compares the local book with the persisted one.")
    wt.add_argument("instrument", help="the instrument's symbol, e.g. BTC-USD")
    wt.add_argument("--config", help=_CONFIG_HELP + "; it needs [redis], and for --check the daemon's [storage]")
    wt.add_argument("--levels", type=int, default=10, help="levels shown per side")
    wt.add_argument("--seconds", type=float, help="stop after this long (with --check: follow this long first, "
                                                  "default 2)")
    wt.add_argument("--check", action="store_true",
                    help="compare the local book with the book persisted in the configured store ([storage]: "
                         "PostgreSQL or SQLite) at the same seq; "
                         "exit 1 on any difference")
    wt.set_defaults(func=_cmd_watch)
    return parser


# The long-running commands, which configure logging: once they have, everything they write to stderr is
# a log line, uncaught exceptions included, and a fatal error is one critical line, then exit status 1.
_LOGGED_COMMANDS = frozenset({"run", "demo", "recover"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logged = args.command in _LOGGED_COMMANDS
    if logged:
        from exchange.telemetry.logging import capture_uncaught

        capture_uncaught()
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"exchange {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        from exchange.ports import cannot_start

        refused = cannot_start(exc)  # a start-up failure an operator puts right: one line saying what to do
        if not logged:
            if refused is None:
                raise
            print(f"exchange {args.command}: {refused}", file=sys.stderr)
            return 1
        from exchange.telemetry.logging import log_fatal

        log_fatal(refused or exc, traceback=refused is None)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
