"""The ``exchange`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from exchange.instruments import Instrument
from exchange.settings import ConfigError, load_instruments
from exchange.types import StpMode

__all__ = ["main"]

DEFAULT_CONFIG = Path("config/exchange.toml")


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
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    if not args.config and not path.exists():
        raise ConfigError(f"no instruments: pass --config FILE or --symbol/--tick/--lot ({path} not found)")
    return load_instruments(path)


def _cmd_replay(args: argparse.Namespace) -> int:
    from exchange import replay

    return replay.run(args.file, _replay_instruments(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exchange", description="Single-writer order-matching engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rp = sub.add_parser("replay", help="apply JSON-line commands from a file or stdin; one JSON line out per line",
                        description="Apply JSON-line commands; print one JSON line of events per input line. "
                                    "A line {\"op\": \"snapshot\"} prints every book. See README.md.")
    rp.add_argument("file", nargs="?", help="input file (default: stdin)")
    rp.add_argument("--config", help=f"TOML file with [[instruments]] (default: {DEFAULT_CONFIG})")
    rp.add_argument("--symbol", help="define one instrument on the command line instead of --config")
    rp.add_argument("--tick", help="price tick size, e.g. 0.01 (with --symbol)")
    rp.add_argument("--lot", help="quantity lot size, e.g. 0.001 (with --symbol)")
    rp.add_argument("--min-qty", help="minimum order quantity (with --symbol; default one lot)")
    rp.add_argument("--max-qty", help="maximum order quantity (with --symbol)")
    rp.add_argument("--band-bps", type=int, help="market-order price band in basis points (with --symbol)")
    rp.add_argument("--stp", default="none", choices=[m.value for m in StpMode],
                    help="default self-trade prevention mode (with --symbol)")
    rp.set_defaults(func=_cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"exchange {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
