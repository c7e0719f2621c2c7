"""Kill the daemon with SIGKILL at random moments; the end state must be exactly an uninterrupted run's.

The input is a seeded stream of tens of thousands of orders, cancels and amends over several
instruments, produced in chunks while the daemon runs. The daemon runs with a snapshot every
50 ms so that kills land during batches, during snapshots and, right after a restart, during
recovery. At the end the database must hold exactly what an uninterrupted daemon (another
database, another consumer group, same topic) stored, and exactly what ``exchange replay``
computes from the same input: every event byte for byte, every trade once, every order's final
state, every position, every balance, and every book's state hash. Three of the instruments keep
balances, funded by signed deposits in the flow. The flow has stop and stop-limit orders (waiting,
triggered, amended, canceled) and icebergs in it, so kills land with stops waiting and icebergs
resting, and recovery must bring both back.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exchange.adapters.generator.flow import OrderFlow
from exchange.core.instruments import Instrument
from tests.integration.daemon import DaemonProcess, free_port, produce, signed, write_config
from tests.integration.expect import encoded, replay_messages, stored_progress, stored_state, wait_for_seq
from tests.support.broker import KafkaBroker
from tests.support.verify import verify

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INSTRUMENTS = (  # balances on three of them (signed deposits and withdrawals in the flow), fees and a rebate
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000",
                             price_band_bps=300, stp_default="cancel_resting", balances=True, maker_fee_bps=-2,
                             taker_fee_bps=7),
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000",
                             stp_default="cancel_incoming", balances=True, maker_fee_bps=3, taker_fee_bps=3),
    Instrument.from_decimals("SOL-USD", tick_size="0.001", lot_size="1", max_qty="100000",
                             stp_default="cancel_both"),
    Instrument.from_decimals("DOGE-USD", tick_size="0.00001", lot_size="10", max_qty="10000000", balances=True,
                             taker_fee_bps=10),
)
N_MESSAGES = 30_000
SEED = 20261121


def _daemon(tmp_path: Path, name: str, *, kafka: KafkaBroker, dsn: str, topic: str, group: str) -> DaemonProcess:
    port = free_port()
    # batches of up to 500 events fill up while catching up: many commits, so kills land in commits in flight
    # too (with 2,000 and a snapshot every 50 ms, hardly any did)
    config = write_config(tmp_path / f"{name}.toml", instruments=INSTRUMENTS, bootstrap=kafka.bootstrap_servers,
                          dsn=dsn, topic=topic, group_id=group, http_port=port, snapshot_interval_s=0.05,
                          max_events=500, publish_events=False)
    return DaemonProcess(config, port, tmp_path / f"{name}.log")


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(kafka: KafkaBroker,
                                                                 pg_factory: Callable[[], str],
                                                                 tmp_path: Path) -> None:
    rng = random.Random(SEED)
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 3, f"{topic}.events": 1, f"{topic}.trades": 1, f"{topic}.dlq": 1})
    messages: list[dict[str, Any] | bytes] = list(
        OrderFlow(INSTRUMENTS, seed=SEED, malformed_every=997, signer=signed, order_types=True).messages(N_MESSAGES))
    exchange, expected = replay_messages(messages, INSTRUMENTS)
    final_seq = {sym: evs[-1].seq for sym, evs in expected.items()}
    kinds = {type(e).__name__ for events in expected.values() for e in events}
    assert {"OrderTriggered", "OrderReplenished"} <= kinds  # the order types are in the flow ...
    assert all(engine.export_state().stops for engine in exchange.engines.values())  # ... and stops wait at the end

    crashed_dsn = pg_factory()
    daemon = _daemon(tmp_path, "crashed", kafka=kafka, dsn=crashed_dsn, topic=topic, group=f"crash-{topic}")
    plan = ["recovery", "running", "running", "recovery", "running"]  # one kill per chunk of input
    size = len(messages) // len(plan)
    for i, moment in enumerate(plan):
        chunk = messages[i * size: (i + 1) * size if i < len(plan) - 1 else len(messages)]
        asyncio.run(produce(kafka.bootstrap_servers, topic, chunk))
        daemon.start()
        if moment == "recovery":  # while it loads and checks the books
            daemon.wait_log("recovery started", timeout=30)
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # once this run has made something durable: mid-batch, mid-snapshot
            before = sum(asyncio.run(stored_progress(crashed_dsn)).values())
            deadline = time.monotonic() + 60
            while sum(asyncio.run(stored_progress(crashed_dsn)).values()) == before:
                daemon.check_alive()
                assert time.monotonic() < deadline, daemon.tail()
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
        daemon.kill()
    daemon.start()
    daemon.wait_ready(timeout=60)
    wait_for_seq(crashed_dsn, final_seq, timeout=180, check=daemon.check_alive)
    assert daemon.terminate(timeout=60) == 0, daemon.tail()

    clean_dsn = pg_factory()
    clean = _daemon(tmp_path, "clean", kafka=kafka, dsn=clean_dsn, topic=topic, group=f"clean-{topic}")
    clean.start()
    clean.wait_ready(timeout=60)
    wait_for_seq(clean_dsn, final_seq, timeout=180, check=clean.check_alive)
    assert clean.terminate(timeout=60) == 0, clean.tail()

    crashed = asyncio.run(stored_state(crashed_dsn))
    uninterrupted = asyncio.run(stored_state(clean_dsn))
    # byte-identical events, in the replay's order; hence no trade lost or duplicated
    assert crashed["events"] == encoded(expected), "events differ from exchange replay"
    assert uninterrupted["events"] == crashed["events"]
    assert crashed["trades"] == uninterrupted["trades"]
    assert len(crashed["trades"]) == exchange_trades(expected)
    assert len({(t["instrument"], t["trade_id"]) for t in crashed["trades"]}) == len(crashed["trades"])
    assert crashed["orders"] == uninterrupted["orders"]
    assert crashed["positions"] == uninterrupted["positions"]
    assert crashed["balances"] == uninterrupted["balances"]
    assert crashed["transfers"] == uninterrupted["transfers"]
    assert {b["instrument"] for b in crashed["balances"]} == {s.symbol for s in INSTRUMENTS if s.balances}
    assert crashed["progress"] == uninterrupted["progress"]

    # and the `exchange replay` command line on the same input ends with the same books
    hashes = _replay_cli_hashes(tmp_path, messages)
    assert hashes == {symbol: engine.state_hash() for symbol, engine in exchange.engines.items()}

    for dsn in (crashed_dsn, clean_dsn):
        report = asyncio.run(verify(dsn, INSTRUMENTS))
        assert report.ok, report.render()
        for rep in report.instruments:
            want = exchange.engines[rep.instrument].state_hash()
            for result in rep.results:
                assert result.state_hash == want, f"{rep.instrument} {result.source}: book differs from replay"


def exchange_trades(expected: dict[str, list[Any]]) -> int:
    return sum(1 for events in expected.values() for e in events if type(e).__name__ == "OrderFilled")


def _replay_cli_hashes(tmp_path: Path, messages: list[dict[str, Any] | bytes]) -> dict[str, str]:
    """Run ``exchange replay`` on the input as a file; the state hash of every book from its snapshot line."""
    lines = [m if isinstance(m, bytes) else json.dumps(m).encode() for m in messages]
    (tmp_path / "input.jsonl").write_bytes(b"\n".join([*lines, b'{"op": "snapshot"}']) + b"\n")
    out = subprocess.run([sys.executable, "-m", "exchange", "replay", "--config", str(tmp_path / "crashed.toml"),
                          str(tmp_path / "input.jsonl")], capture_output=True, check=True, timeout=300).stdout
    answers = out.splitlines()
    assert len(answers) == len(lines) + 1, "one output line per input line"
    snapshot = json.loads(answers[-1])["snapshot"]
    return {symbol: book["state_hash"] for symbol, book in snapshot.items()}
