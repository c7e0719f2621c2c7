"""``exchange demo`` as a process: the embedded default (SQLite, generator, no servers).

- it runs headless for a few seconds and produces trades; a restart recovers the
  very books the first run left (same seq and state hash per instrument) and
  goes on from there; both times the view's books, kept from the in-process
  market-data bus with the sync procedure, equal the engines' books at the end;
- killed with SIGKILL mid-run, the store passes ``exchange recover --verify``, a
  restart recovers and continues, and every stored event equals what the same
  seeded flow gives when applied straight to fresh engines: nothing lost,
  nothing doubled, byte for byte.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from exchange.adapters.generator.source import GENERATOR_TOPIC, generated_commands
from exchange.adapters.sqlite import SqliteStore
from exchange.core.events import Event
from exchange.core.matching import MatchingEngine
from exchange.settings import load_settings
from exchange.wire.codec import decode_command

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SUMMARY = re.compile(r"^  (\S+): (\d+) orders .*?, (\d+) trades, .*; seq (\d+) -> (\d+), (\d+) resting, "
                     r"state hash (\w+)$", re.M)
MARKET_DATA = re.compile(r"^  (\S+) market data: (.*)$", re.M)
RECOVERED = re.compile(r"^  (\S+): seq (\d+), (\d+) open orders, state hash (\w+)$", re.M)


def write_config(tmp_path: Path, *, rate: int = 1500, snapshot_interval_s: float = 0.5) -> Path:
    """The shipped demo configuration with the store in ``tmp_path``, a snapshot every half second."""
    text = (ROOT / "exchange" / "defaults" / "demo.toml").read_text()
    text = text.replace('path = ".exchange/demo.sqlite"', f'path = "{tmp_path / "demo.sqlite"}"')
    text = re.sub(r"(?m)^rate = \d+", f"rate = {rate}", text)
    text = re.sub(r"(?m)^snapshot_interval_s = \S+", f"snapshot_interval_s = {snapshot_interval_s}", text)
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path


def demo(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exchange", "demo", "--config", str(config), "--headless", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def summary(stdout: str) -> dict[str, tuple[int, int, int, int, int, str]]:
    """instrument -> (orders, trades, start seq, final seq, resting, state hash) from the final summary."""
    return {m[1]: (int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]), m[7]) for m in SUMMARY.finditer(stdout)}


def recovered(stdout: str) -> dict[str, tuple[int, int, str]]:
    """instrument -> (seq, open orders, state hash) from the start-up lines."""
    return {m[1]: (int(m[2]), int(m[3]), m[4]) for m in RECOVERED.finditer(stdout)}


def test_demo_produces_trades_and_a_restart_recovers_the_same_books(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    symbols = [spec.symbol for spec in load_settings(config).instruments]

    first = demo(config, "--seconds", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "started fresh" in first.stdout
    assert re.search(r"t=\s*\d+\.\ds BTC-USD: bid \S+ @ \S+  ask", first.stdout)  # the periodic lines
    ran = summary(first.stdout)
    assert sorted(ran) == sorted(symbols), first.stdout[-2000:]
    for symbol, (orders, trades, start, seq, _, _) in ran.items():
        assert orders > 0, (symbol, ran[symbol])
        assert trades > 0, (symbol, ran[symbol])
        assert start == 0
        assert seq > orders
    assert '"event": "stopped"' in first.stderr  # the daemon's own shutdown path and summary line
    # the view's books, kept from the in-process market-data bus, equal the engines' at their final seq
    views = dict(MARKET_DATA.findall(first.stdout))
    assert sorted(views) == sorted(symbols), first.stdout[-2000:]
    for symbol, verdict in views.items():
        assert verdict.startswith(f"the view's book (from the bus) equals the engine's at seq {ran[symbol][3]}:"), \
            (symbol, verdict)
    # the shipped demo keeps balances: the generator funded its clients, and fees were taken
    money = {symbol: (int(clients), fees) for symbol, clients, fees in re.findall(
        r"^  (\S+) balances: (\d+) clients hold .*; fees taken (\S+) ", first.stdout, re.M)}
    assert sorted(money) == sorted(symbols), first.stdout[-2000:]
    assert all(clients > 0 and fees.strip("0.") for clients, fees in money.values()), money

    second = demo(config, "--seconds", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "recovered from" in second.stdout
    back = recovered(second.stdout)
    assert back == {symbol: (seq, resting, digest) for symbol, (_, _, _, seq, resting, digest) in ran.items()}
    went_on = summary(second.stdout)
    verdicts = MARKET_DATA.findall(second.stdout)
    assert len(verdicts) == len(symbols), second.stdout[-2000:]
    assert all("equals the engine's" in v for _, v in verdicts), verdicts
    for symbol, (orders, _, start, seq, _, _) in went_on.items():
        assert start == ran[symbol][3]
        assert orders > 0
        assert seq > start

    # the store holds exactly the books the second run reported
    settings = load_settings(config)

    async def load() -> dict[str, str]:
        async with SqliteStore(settings.storage.path, settings.instruments) as store:
            rec = await store.load(settings.instruments)
        return {spec.symbol: MatchingEngine.from_state(spec, rec[spec.symbol].state).state_hash()
                for spec in settings.instruments}

    assert asyncio.run(load()) == {symbol: row[5] for symbol, row in went_on.items()}


def test_demo_killed_mid_run_recovers_to_exactly_the_seeded_flow(tmp_path: Path) -> None:
    config = write_config(tmp_path, snapshot_interval_s=0.05)  # kill it amid snapshots too
    settings = load_settings(config)
    specs = settings.instrument_map()
    log = tmp_path / "run1.out"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "exchange", "demo", "--config", str(config), "--headless",
                                 "--seconds", "120"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 90
            while not re.search(r"BTC-USD: bid .* seq [1-9]\d{3,}", log.read_text()):  # a thousand events in
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    assert "stopped after" not in log.read_text()  # it really died mid-run

    check = subprocess.run([sys.executable, "-m", "exchange", "recover", "--verify", "--config", str(config)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    assert "verdict: OK" in check.stdout

    again = demo(config, "--seconds", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "recovered from" in again.stdout
    went_on = summary(again.stdout)
    assert all(orders > 0 for orders, *_ in went_on.values())

    # every stored event == the same seeded flow applied to fresh engines, up to each instrument's stored offset
    async def stored() -> tuple[dict[str, list[Event]], dict[str, int]]:
        async with SqliteStore(settings.storage.path, settings.instruments) as store:
            rec = await store.load(settings.instruments)
            events = {spec.symbol: [e async for chunk in store.read_events(spec.symbol, 0) for e in chunk]
                      for spec in settings.instruments}
        return events, {symbol: r.offsets[(GENERATOR_TOPIC, 0)] for symbol, r in rec.items()}

    events, offsets = asyncio.run(stored())
    engines = {symbol: MatchingEngine(spec) for symbol, spec in specs.items()}
    expected: dict[str, list[Event]] = {symbol: [] for symbol in specs}
    flow = generated_commands(specs, settings.order_source.seed, settings.order_source.clients)
    for offset in range(max(offsets.values()) + 1):
        msg = flow.next()
        command = decode_command(msg, specs, ts_ns=msg["ts_ns"])
        symbol = command.instrument or ""
        if offset <= offsets[symbol]:
            expected[symbol].extend(engines[symbol].apply(command))
    for symbol in specs:
        assert len(events[symbol]) == went_on[symbol][3]
        assert msgspec.json.encode(events[symbol]) == msgspec.json.encode(expected[symbol]), symbol
        assert engines[symbol].state_hash() == went_on[symbol][5]
