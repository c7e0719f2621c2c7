"""Benchmark of the pure matching core through its in-process API.

    python bench/core.py                 # 200,000-command flow, commands per second
    python bench/core.py --memory        # one million resting orders, resident memory
    python bench/core.py --baseline      # the bare SortedDict-of-deques loop, for scale
    python bench/core.py --decode        # the edge instead: wire message -> command, per second
    python bench/core.py --snapshot      # a periodic snapshot's work on the event loop, full dedupe window
    python bench/core.py --balances      # the same flow with balances off and on, interleaved
    python bench/core.py --order-types   # the flow with stops and icebergs in it against the plain one, interleaved
    python bench/core.py --profile       # where the core's time goes: cProfile's own time per function, as shares
    python bench/core.py --against DIR   # this core against another checkout's (DIR), interleaved

The flow is deterministic (seeded): limit orders around a moving mid price,
cancels of live orders, amends, market orders and IOC limits that sweep several
levels, with the resting book held near a thousand orders. The commands are
generated first (not timed); the timed part is ``engine.apply`` alone, with
every event built exactly as the daemon gets it.

``--decode`` times the daemon's edge instead: parsing a wire message (JSON bytes,
as a Kafka record holds it) and decoding it into a command, with its decimal
price and quantity converted to ticks and lots, over ``bench/e2e.py``'s seeded
flow of three instruments.

``--snapshot`` fills an engine's dedupe window with ``--orders`` finished orders
(IOC orders that do not cross a book of a thousand resting ones) and times what a
periodic snapshot costs the daemon's event loop: the engine's image, its state
hash and its JSON encoding, as the snapshot and the journal writer make them;
then the same with the dedupe window in the image, as snapshots held it before.

``--balances`` times the flow on an instrument without balances and on the same instrument keeping
them (maker 1 bp, taker 5 bp, a price band wide enough for every market order of the flow; every
client funded beforehand by untimed deposits large enough that no order is refused, so both runs
match the same orders), interleaved 2,000 commands at a time so that the machine's drift falls on
both alike, and reports the median ratio of at least 5 passes.

``--order-types`` times the same seeded flow with stop and stop-limit orders (about 3% of the
commands, stop prices a few ticks beyond the market, so trades trigger them now and then) and
icebergs (a tenth of the passive limit orders) in it, against the plain flow, interleaved the same
way, and reports the median ratio of their commands per second.

``--against DIR`` times this checkout's core against the core of the checkout in DIR (its
``exchange`` package copied under another name into a temporary directory, so that both run in
this one process), on the same flow, interleaved 2,000 commands at a time; both must make the same
trades. It is how a change to the core is measured: old and new alternate, so the machine's drift
falls on both.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sortedcontainers import SortedDict

from exchange import (
    AmendOrder,
    CancelOrder,
    Command,
    Instrument,
    MatchingEngine,
    OrderType,
    PlaceOrder,
    Side,
    StpMode,
    TimeInForce,
)
from exchange.core.commands import Deposit

SYMBOL = "BENCH"
SPEC = Instrument.from_decimals(SYMBOL, tick_size="0.01", lot_size="1", stp_default=StpMode.NONE)


def generate(n: int, seed: int, book_target: int = 1000, order_types: bool = False) -> list[Command]:
    """A seeded command flow; a shadow engine tells which orders are live to cancel or amend. With
    ``order_types``, some commands are stops and some passive limits icebergs (see the module docstring)."""
    rng = random.Random(seed)
    shadow = MatchingEngine(SPEC)
    clients = [f"c{i}" for i in range(200)]
    commands: list[Command] = []
    mid = 100_000
    ts = 1_700_000_000_000_000_000
    seq = 0
    report_every = max(n // 10, 1)
    while len(commands) < n:
        ts += 1000
        bid, ask = shadow.book.best_bid(), shadow.book.best_ask()
        if bid is not None and ask is not None:
            mid = (bid + ask) // 2
        if rng.random() < 0.02:  # the mid drifts: now and then place around a nudged one
            mid += rng.choice((-3, -2, 2, 3))
        live = len(shadow.book)
        r = rng.random()
        client = rng.choice(clients)
        seq += 1
        side = Side.BUY if rng.random() < 0.5 else Side.SELL
        sign = 1 if side is Side.BUY else -1
        cmd: Command
        if live and rng.random() < 0.30 * min(live / book_target, 2.0):  # cancels and amends of live orders
            victim = _pick_live(shadow, rng)
            if rng.random() < 0.85:
                cmd = CancelOrder(SYMBOL, victim.client_id, victim.client_order_id, ts_ns=ts)
            elif rng.random() < 0.5:
                cmd = AmendOrder(SYMBOL, victim.client_id, victim.client_order_id,
                                 qty_lots=max(1, victim.qty - rng.randint(1, victim.qty)), ts_ns=ts)
            else:
                cmd = AmendOrder(SYMBOL, victim.client_id, victim.client_order_id,
                                 price_ticks=victim.price + rng.choice((-1, 1)), ts_ns=ts)
        elif order_types and r < 0.03:  # a stop or stop-limit beyond the market, waiting for a move
            stop = mid + sign * rng.randint(2, 12)
            if shadow.last_price and (stop <= shadow.last_price if side is Side.BUY else stop >= shadow.last_price):
                stop = shadow.last_price + sign * rng.randint(1, 4)
            limit = rng.random() < 0.5
            cmd = PlaceOrder(SYMBOL, client, f"o{seq}", side, OrderType.STOP_LIMIT if limit else OrderType.STOP,
                             stop + sign * 2 if limit else 0, rng.randint(5, 40), TimeInForce.GTC, ts,
                             stop_price_ticks=max(1, stop))
        elif r < 0.04:  # market order sweeping a few levels
            cmd = PlaceOrder(SYMBOL, client, f"o{seq}", side, OrderType.MARKET, 0, rng.randint(20, 150),
                             TimeInForce.IOC, ts)
        elif r < 0.07:  # aggressive IOC limit through several levels
            cmd = PlaceOrder(SYMBOL, client, f"o{seq}", side, OrderType.LIMIT, mid + sign * 8,
                             rng.randint(50, 250), TimeInForce.IOC, ts)
        elif r < 0.20:  # limit that crosses by a tick or two, remainder rests
            cmd = PlaceOrder(SYMBOL, client, f"o{seq}", side, OrderType.LIMIT, mid + sign * rng.randint(0, 2),
                             rng.randint(1, 30), TimeInForce.GTC, ts)
        else:  # passive limit near the mid (now and then an iceberg)
            qty = rng.randint(1, 50)
            display = rng.randint(1, max(1, qty // 3)) if order_types and qty > 5 and rng.random() < 0.1 else 0
            cmd = PlaceOrder(SYMBOL, client, f"o{seq}", side, OrderType.LIMIT,
                             max(1, mid - sign * rng.randint(1, 30)), qty, TimeInForce.GTC, ts,
                             display_qty_lots=display)
        shadow.apply(cmd)
        commands.append(cmd)
        if len(commands) % report_every == 0:
            print(f"  generated {len(commands):,}/{n:,} commands, resting {len(shadow.book):,}",
                  file=sys.stderr, flush=True)
    return commands


def _pick_live(engine: MatchingEngine, rng: random.Random):  # type: ignore[no-untyped-def]
    orders = engine.book.orders
    # dicts keep insertion order; sampling by a random walk over ids keeps this cheap
    oid = rng.randint(max(1, engine.next_order_id - 3 * len(orders)), engine.next_order_id - 1)
    order = orders.get(oid)
    if order is None:
        order = next(iter(orders.values()))
    return order


def run_core(commands: list[Command]) -> tuple[float, int, int, MatchingEngine]:
    engine = MatchingEngine(SPEC)
    apply = engine.apply
    n_events = 0
    n_trades = 0
    gc.collect()
    start = time.perf_counter()
    for cmd in commands:
        events = apply(cmd)
        n_events += len(events)
    elapsed = time.perf_counter() - start
    n_trades = engine.next_trade_id - 1
    return elapsed, n_events, n_trades, engine


BALANCES_SPEC = Instrument.from_decimals(SYMBOL, tick_size="0.01", lot_size="1", stp_default=StpMode.NONE,
                                         price_band_bps=10_000, balances=True, base_asset="B", quote_asset="Q",
                                         maker_fee_bps=1, taker_fee_bps=5)


def run_balances(commands: list[Command], repeat: int, chunk: int = 2_000) -> None:
    """The flow with balances off and on, interleaved: two engines take the same commands ``chunk`` at a time,
    in turns (which goes first alternates), so that the machine's drift, which is large on a shared machine
    even between two runs in a row, falls on both alike. Per pass the ratio of the two rates; the median of the
    passes is the figure, with their range."""
    clients = sorted({c.client_id for c in commands})
    funding = [cmd for i, client in enumerate(clients) for cmd in (
        Deposit(SYMBOL, client, "B", 10**9, f"b{i}"), Deposit(SYMBOL, client, "Q", 10**13, f"q{i}"))]
    chunks = [commands[i:i + chunk] for i in range(0, len(commands), chunk)]
    ratios, rates = [], []
    for run in range(repeat):
        engines = {"off": MatchingEngine(dataclasses.replace(BALANCES_SPEC, balances=False)),
                   "on": MatchingEngine(BALANCES_SPEC)}
        for cmd in funding:
            engines["on"].apply(cmd)
        elapsed = {"off": 0.0, "on": 0.0}
        gc.collect()
        for n, part in enumerate(chunks):
            for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
                apply = engines[mode].apply
                start = time.perf_counter()
                for cmd in part:
                    apply(cmd)
                elapsed[mode] += time.perf_counter() - start
        trades = {mode: engine.next_trade_id - 1 for mode, engine in engines.items()}
        assert trades["on"] == trades["off"], f"balances changed what traded: {trades}"
        ratios.append(elapsed["off"] / elapsed["on"])
        rates.append((len(commands) / elapsed["off"], len(commands) / elapsed["on"]))
        print(f"  pass {run + 1}/{repeat}: off {rates[-1][0]:,.0f} commands/s, on {rates[-1][1]:,.0f}, on/off "
              f"{ratios[-1]:.3f} ({trades['on']:,} trades each)", file=sys.stderr, flush=True)
    order = sorted(range(repeat), key=ratios.__getitem__)
    mid = order[len(order) // 2]
    print(f"balances on/off: {ratios[mid]:.3f} (median of {repeat} passes, {min(ratios):.3f} - {max(ratios):.3f}); "
          f"that pass: {rates[mid][0]:,.0f} commands/s off, {rates[mid][1]:,.0f} on")


def run_order_types(plain: list[Command], typed: list[Command], repeat: int, chunk: int = 2_000) -> None:
    """The plain flow and the flow with stops and icebergs, each on its own engine, interleaved ``chunk`` commands
    at a time (which goes first alternates); per pass the ratio of their commands per second, the median of the
    passes is the figure."""
    ratios, rates, event_ratios = [], [], []
    events: dict[str, int] = {}
    for run in range(repeat):
        engines = {"plain": MatchingEngine(SPEC), "typed": MatchingEngine(SPEC)}
        flows = {"plain": plain, "typed": typed}
        elapsed = {"plain": 0.0, "typed": 0.0}
        gc.collect()
        for n, start_at in enumerate(range(0, max(len(plain), len(typed)), chunk)):
            for mode in ("plain", "typed") if n % 2 == 0 else ("typed", "plain"):
                apply = engines[mode].apply
                part = flows[mode][start_at:start_at + chunk]
                start = time.perf_counter()
                for cmd in part:
                    apply(cmd)
                elapsed[mode] += time.perf_counter() - start
        typed_engine = engines["typed"]
        for mode, engine in engines.items():
            events[mode] = engine.seq
        ratios.append((len(typed) / elapsed["typed"]) / (len(plain) / elapsed["plain"]))
        event_ratios.append((events["typed"] / elapsed["typed"]) / (events["plain"] / elapsed["plain"]))
        rates.append((len(plain) / elapsed["plain"], len(typed) / elapsed["typed"]))
        print(f"  pass {run + 1}/{repeat}: plain {rates[-1][0]:,.0f} commands/s, with order types {rates[-1][1]:,.0f}, "
              f"ratio {ratios[-1]:.3f}", file=sys.stderr, flush=True)
    triggered = sum(1 for cmd in typed if type(cmd) is PlaceOrder and cmd.stop_price_ticks)
    icebergs = sum(1 for cmd in typed if type(cmd) is PlaceOrder and cmd.display_qty_lots)
    order = sorted(range(repeat), key=ratios.__getitem__)
    mid = order[len(order) // 2]
    print(f"order types: {triggered:,} stops and {icebergs:,} icebergs in {len(typed):,} commands "
          f"({typed_engine.next_trade_id - 1:,} trades, {len(typed_engine.export_state().stops):,} stops waiting at "
          f"the end); with / without: {ratios[mid]:.3f} (median of {repeat} passes, {min(ratios):.3f} - "
          f"{max(ratios):.3f}); that pass: {rates[mid][0]:,.0f} commands/s without, {rates[mid][1]:,.0f} with")
    print(f"events: {events['plain']:,} without, {events['typed']:,} with; events per second with / without: "
          f"{sorted(event_ratios)[len(event_ratios) // 2]:.3f} (median)")


def profile(commands: list[Command], top: int = 12) -> None:
    """The flow once under cProfile: each function's own time as a share of the total (the profiler adds a
    cost per call, so functions called often look dearer than they are; the shares rank, they do not time)."""
    import cProfile
    import pstats

    engine = MatchingEngine(SPEC)
    apply = engine.apply
    profiler = cProfile.Profile()
    profiler.enable()
    for cmd in commands:
        apply(cmd)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = sorted(((tt, nc, f"{Path(file).name}:{line} {name}") for (file, line, name), (_, nc, tt, _, _)
                   in stats.items()), reverse=True)
    total = sum(tt for tt, _, _ in rows)
    print(f"where the time goes ({len(commands):,} commands under cProfile, {total:.2f} s of own time):")
    for tt, calls, where in rows[:top]:
        print(f"  {tt / total:6.1%}  {calls:>9,} calls  {where}")


def _other_core(checkout: Path, scratch: Path) -> Any:
    """The ``exchange`` package of another checkout, importable as ``exchange_other`` (its own imports renamed)."""
    import importlib
    import re
    import shutil

    target = scratch / "exchange_other"
    shutil.copytree(checkout / "exchange", target, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    pattern = re.compile(r"\bexchange(?=[. ])")
    for path in target.rglob("*.py"):
        text = path.read_text()
        path.write_text(pattern.sub("exchange_other", text))
    sys.path.insert(0, str(scratch))
    return importlib.import_module("exchange_other")


def _convert(commands: list[Command], package: Any) -> list[Any]:
    """The same commands as the other package's structs (and enums)."""
    import importlib

    classes = importlib.import_module(package.__name__ + ".core.commands")
    types = importlib.import_module(package.__name__ + ".core.types")
    out = []
    for cmd in commands:
        cls = getattr(classes, type(cmd).__name__)
        fields = {}
        for name in cmd.__struct_fields__:
            value = getattr(cmd, name)
            if name not in cls.__struct_fields__:
                assert not value, f"{type(cmd).__name__}.{name} is not known to the other core"
                continue
            enum = getattr(types, type(value).__name__, None) if hasattr(value, "value") else None
            fields[name] = enum(value.value) if enum is not None else value
        out.append(cls(**fields))
    return out


def against(commands: list[Command], checkout: Path, repeat: int, chunk: int = 2_000) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        other = _other_core(checkout, Path(scratch))
        theirs = _convert(commands, other)
        spec = other.Instrument.from_decimals(SYMBOL, tick_size="0.01", lot_size="1", stp_default=other.StpMode.NONE)
        ratios = []
        for run in range(repeat):
            engines = {"this": MatchingEngine(SPEC), "other": other.MatchingEngine(spec)}
            flows = {"this": commands, "other": theirs}
            elapsed = {"this": 0.0, "other": 0.0}
            gc.collect()
            for n, start_at in enumerate(range(0, len(commands), chunk)):
                for mode in ("this", "other") if n % 2 == 0 else ("other", "this"):
                    apply = engines[mode].apply
                    part = flows[mode][start_at:start_at + chunk]
                    start = time.perf_counter()
                    for cmd in part:
                        apply(cmd)
                    elapsed[mode] += time.perf_counter() - start
            trades = {mode: engine.next_trade_id - 1 for mode, engine in engines.items()}
            assert trades["this"] == trades["other"], f"the two cores made different trades: {trades}"
            ratios.append(elapsed["other"] / elapsed["this"])
            print(f"  pass {run + 1}/{repeat}: this {len(commands) / elapsed['this']:,.0f} commands/s, the other "
                  f"{len(commands) / elapsed['other']:,.0f}: {ratios[-1]:.3f}", file=sys.stderr, flush=True)
    ratios.sort()
    print(f"this core / the core of {checkout}: {ratios[len(ratios) // 2]:.3f} times as fast (median of {repeat} "
          f"passes, {ratios[0]:.3f} - {ratios[-1]:.3f})")


def run_baseline(commands: list[Command]) -> float:
    """The obvious loop: SortedDict of deques, FIFO matching, lazy cancel, no events, no validation."""
    bids: SortedDict = SortedDict()
    asks: SortedDict = SortedDict()
    index: dict[tuple[str, str], list[int]] = {}
    start = time.perf_counter()
    for cmd in commands:
        if type(cmd) is PlaceOrder:
            buy = cmd.side is Side.BUY
            opp = asks if buy else bids
            remaining = cmd.qty_lots
            limit = (cmd.price_ticks if buy else -cmd.price_ticks) if cmd.order_type is OrderType.LIMIT else 1 << 62
            while remaining and opp:
                key, q = opp.peekitem(0)
                if key > limit:
                    break
                while q and remaining:
                    maker = q[0]
                    if maker[0] == 0:
                        q.popleft()
                        continue
                    fill = min(remaining, maker[0])
                    maker[0] -= fill
                    remaining -= fill
                    if maker[0] == 0:
                        q.popleft()
                if not q:
                    del opp[key]
            if remaining and cmd.tif is TimeInForce.GTC:
                own = bids if buy else asks
                key = -cmd.price_ticks if buy else cmd.price_ticks
                entry = [remaining, key]
                own.setdefault(key, deque()).append(entry)
                index[(cmd.client_id, cmd.client_order_id)] = entry
        elif type(cmd) is CancelOrder:
            entry = index.pop((cmd.client_id, cmd.client_order_id or ""), None)
            if entry is not None:
                entry[0] = 0
        elif type(cmd) is AmendOrder:
            entry = index.get((cmd.client_id, cmd.client_order_id or ""))
            if entry is not None and cmd.qty_lots and cmd.qty_lots < entry[0]:
                entry[0] = cmd.qty_lots
    return time.perf_counter() - start


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(n_orders: int, levels_per_side: int) -> None:
    base = rss_mb()
    engine = MatchingEngine(SPEC)
    mid = 1_000_000
    report_every = n_orders // 10
    for i in range(n_orders):
        buy = i % 2 == 0
        level = (i // 2) % levels_per_side + 1
        price = mid - level if buy else mid + level
        ts = i + 1
        engine.apply(PlaceOrder(SYMBOL, f"client{i % 5000}", f"order-{i}", Side.BUY if buy else Side.SELL,
                                OrderType.LIMIT, price, 1 + i % 100, TimeInForce.GTC, ts))
        if (i + 1) % report_every == 0:
            print(f"  loaded {i + 1:,} orders, RSS {rss_mb():,.0f} MB", file=sys.stderr, flush=True)
    gc.collect()
    total = rss_mb()
    engine.book.check_invariants() if n_orders <= 100_000 else None
    print(f"resting orders: {len(engine.book):,} over {len(engine.book.bids) + len(engine.book.asks):,} levels")
    print(f"resident memory: {total:,.0f} MB in all ({total - base:,.0f} MB for the book; "
          f"{(total - base) * 1024 * 1024 / n_orders:,.0f} bytes per order)")


def decode(n: int, seed: int, repeat: int) -> None:
    import msgspec

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from e2e import INSTRUMENTS  # the same three instruments and flow as the end-to-end benchmark

    from exchange.adapters.generator.flow import OrderFlow
    from exchange.adapters.kafka import partition_for
    from exchange.pipeline.router import Router
    from exchange.wire.auth import Verifier

    flow = OrderFlow(INSTRUMENTS, seed=seed)
    partitions = 3
    records = []  # (value, key, partition, ts_ns) as the daemon's consumer gets them
    for _ in range(n):
        msg = flow.next()
        symbol = msg["instrument"]
        records.append((msgspec.json.encode(msg), symbol.encode(), partition_for(symbol, partitions), msg["ts_ns"]))
    best = float("inf")
    for run in range(repeat):
        specs = {s.symbol: dataclasses.replace(s) for s in INSTRUMENTS}  # copies with nothing converted yet
        # the daemon's edge: size, time, JSON, identity, partition and key, signatures, fields
        router = Router(specs, verifier=Verifier({}),
                        partitions={s: partition_for(s, partitions) for s in specs})
        route = router.route
        gc.collect()
        start = time.perf_counter()
        for value, key, partition, ts_ns in records:
            route(value, ts_ns, key=key, partition=partition)
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        print(f"  run {run + 1}/{repeat}: {n / elapsed:,.0f} messages/s", file=sys.stderr)
    print(f"decode: {n:,} wire messages through the edge (exchange.pipeline.router), {n / best:,.0f} messages/s "
          f"({best / n * 1e6:.2f} us each), best of {repeat}")


def snapshot(n_finished: int, repeat: int) -> None:
    import msgspec

    spec = dataclasses.replace(SPEC, dedupe_window=n_finished)
    engine = MatchingEngine(spec)
    mid = 1_000_000
    for i in range(1000):
        engine.apply(PlaceOrder(SYMBOL, f"maker{i % 50}", f"rest-{i}", Side.BUY, OrderType.LIMIT, mid - 1 - i % 100,
                                1 + i % 10, TimeInForce.GTC, i + 1))
    report_every = max(1, n_finished // 5)
    for i in range(n_finished):
        engine.apply(PlaceOrder(SYMBOL, f"client{i % 500}", f"order-{i:09d}", Side.SELL, OrderType.LIMIT, mid + 1,
                                1, TimeInForce.IOC, 1000 + i))  # rests nowhere: finished, remembered
        if (i + 1) % report_every == 0:
            print(f"  finished {i + 1:,} orders", file=sys.stderr, flush=True)
    encode = msgspec.json.Encoder().encode
    for window, label in ((False, "snapshot (book, counters, halted)"), (True, "with the dedupe window")):
        best = float("inf")
        for _ in range(repeat):
            gc.collect()
            start = time.perf_counter()
            state = engine.export_state(window=window)
            engine.state_hash()
            raw = encode(state)
            best = min(best, time.perf_counter() - start)
        print(f"{label}: {len(state.orders):,} resting orders, {len(state.done):,} window entries: "
              f"{best * 1000:,.1f} ms, {len(raw) / 1e6:,.2f} MB encoded (best of {repeat})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the best is reported (with --baseline, "
                        "pairs of runs; their median ratio)")
    parser.add_argument("--baseline", action="store_true", help="also time the bare loop with no events")
    parser.add_argument("--memory", action="store_true", help="measure one million resting orders instead")
    parser.add_argument("--decode", action="store_true", help="time wire message -> command instead")
    parser.add_argument("--snapshot", action="store_true", help="time a snapshot with a full dedupe window instead")
    parser.add_argument("--balances", action="store_true", help="time the flow with balances off and on instead")
    parser.add_argument("--profile", action="store_true", help="where the core's time goes, by function")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="time this core against the core of the checkout in DIR instead, interleaved")
    parser.add_argument("--order-types", action="store_true",
                        help="time the flow with stops and icebergs against the plain flow instead")
    parser.add_argument("--orders", type=int, default=1_000_000,
                        help="resting orders for --memory; finished orders (the window) for --snapshot")
    parser.add_argument("--levels", type=int, default=2_000, help="price levels per side for --memory")
    args = parser.parse_args()
    if args.memory:
        memory(args.orders, args.levels)
        return
    if args.decode:
        decode(args.commands, args.seed, args.repeat)
        return
    if args.snapshot:
        snapshot(args.orders, args.repeat)
        return
    print(f"generating {args.commands:,} commands (seed {args.seed})", file=sys.stderr)
    commands = generate(args.commands, args.seed)
    if args.balances:
        run_balances(commands, max(args.repeat, 5))
        return
    if args.profile:
        profile(commands)
        return
    if args.against:
        against(commands, args.against.resolve(), max(args.repeat, 5))
        return
    if args.order_types:
        print(f"generating {args.commands:,} commands with stops and icebergs (seed {args.seed})", file=sys.stderr)
        run_order_types(commands, generate(args.commands, args.seed, order_types=True), max(args.repeat, 5))
        return
    best = best_base = float("inf")
    ratios = []
    for run in range(args.repeat):
        # with --baseline, each run is a pair (which goes first alternates): the ratio of the pair is the figure
        base = run_baseline(commands) if args.baseline and run % 2 else None
        elapsed, n_events, n_trades, engine = run_core(commands)
        if args.baseline and base is None:
            base = run_baseline(commands)
        best = min(best, elapsed)
        note = ""
        if base is not None:
            best_base = min(best_base, base)
            ratios.append(base / elapsed)
            note = f", bare loop {len(commands) / base:,.0f}: {ratios[-1]:.3f}"
        print(f"  run {run + 1}/{args.repeat}: {len(commands) / elapsed:,.0f} commands/s{note}", file=sys.stderr)
    print(f"core: {len(commands):,} commands, {n_events:,} events, {n_trades:,} trades, "
          f"{len(engine.book):,} resting at the end, state {engine.state_hash()}")
    print(f"core: {len(commands) / best:,.0f} commands/s ({n_events / best:,.0f} events/s), best of {args.repeat}")
    if args.baseline:
        print(f"baseline (SortedDict of deques, no events): {len(commands) / best_base:,.0f} commands/s, best of "
              f"{args.repeat}")
        ratios.sort()
        print(f"core / baseline: {ratios[len(ratios) // 2]:.3f} (median of {len(ratios)} pairs, "
              f"{ratios[0]:.3f} - {ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
