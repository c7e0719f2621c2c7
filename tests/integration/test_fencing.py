"""Ownership fencing in the stores: epochs, fenced commits, a take waiting for a commit, a batch found stored
already recognised by content (the two-writer corruption), SQLite held by one process. Real services, no mocks:
like ``test_stores.py``, a :class:`Backend` gives stores on ONE fresh database (PostgreSQL on its one-statement
and its COPY commit path, or a SQLite file), each store object what a second process would hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from exchange import CancelOrder, Command, Instrument, MatchingEngine, OrderCanceled, OrderType, PlaceOrder, Side
from exchange.adapters.postgres import PostgresStore
from exchange.adapters.sqlite import SqliteStore
from exchange.ports import Applied, Batch, Epochs, Fenced, InputPosition, StoreUnavailable
from recovery.verify import VerifyReport, verify_store
from tests.integration._workload import stamped
from tests.support.verify import verify

pytestmark = pytest.mark.integration

SPEC = Instrument.from_decimals("X", tick_size="0.01", lot_size="0.1")
SPECS = [SPEC]
TOPIC = "orders"
P0 = (TOPIC, 0)  # an orders partition (its own input_offsets row: instrument '')
TABLES = ("order_events", "orders", "trades", "positions", "engine_progress", "input_offsets", "snapshots")
ROOT = Path(__file__).resolve().parents[2]

AnyStore = PostgresStore | SqliteStore


@dataclass
class Backend:
    kind: str  # postgres | sqlite
    dsn: str = ""
    path: Path = Path()
    one_statement: bool = False  # PostgreSQL's one-statement commit path (else COPY)

    def new_store(self) -> AnyStore:
        """A store on this test's database, not started."""
        if self.kind == "postgres":
            return PostgresStore(self.dsn, SPECS, pool_size=2, one_statement_max_events=1000 * self.one_statement)
        return SqliteStore(self.path, SPECS)

    async def store(self, *, load: bool = True) -> AnyStore:
        """A started, migrated store; loaded (its caches at the stored state, as recovery leaves them) if ``load``:
        the one-statement path needs it."""
        store = self.new_store()
        await store.start()
        await store.migrate()
        if load:
            await store.load(SPECS)
        return store

    async def sql(self, statement: str) -> list[dict[str, Any]]:
        """One statement on a connection of its own, committed."""
        if self.kind == "postgres":
            conn = await asyncpg.connect(self.dsn)
            try:
                return [dict(r) for r in await conn.fetch(statement)]
            finally:
                await conn.close()
        with contextlib.closing(sqlite3.connect(self.path)) as lite:
            lite.row_factory = sqlite3.Row
            rows = [dict(r) for r in lite.execute(statement)]
            lite.commit()
            return rows

    async def contents(self) -> dict[str, list[str]]:
        """Every row of every table a commit writes."""
        return {t: sorted(map(repr, await self.sql(f"SELECT * FROM {t}"))) for t in TABLES}

    async def verify(self) -> VerifyReport:
        """``exchange recover --verify``'s check, on a store opened as it opens one."""
        if self.kind == "postgres":
            return await verify(self.dsn, SPECS)
        async with SqliteStore(self.path, SPECS) as store:
            return await verify_store(store, SPECS)

    def blob(self, data: bytes) -> str:
        return f"decode('{data.hex()}', 'hex')" if self.kind == "postgres" else f"X'{data.hex()}'"


@pytest.fixture(params=["postgres-one-statement", "postgres-copy", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param.startswith("postgres"):
        return Backend("postgres", dsn=request.getfixturevalue("pg_dsn"),
                       one_statement=request.param == "postgres-one-statement")
    return Backend("sqlite", path=tmp_path / "exchange.sqlite")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def place(client: str, coid: str, side: Side, price: int, qty: int, ts: int) -> PlaceOrder:
    return PlaceOrder("X", client, coid, side, OrderType.LIMIT, price, qty, ts_ns=ts)


def batch(engine: MatchingEngine, commands: Sequence[Command], offset: int, *, epoch: int = 1) -> Batch:
    """The commands' outcomes (read from orders[3] from ``offset`` on) as one batch prepared under ``epoch``."""
    applied = [Applied("X", engine.apply(c), InputPosition(TOPIC, 3, offset + n)) for n, c in enumerate(commands)]
    return stamped(Batch(applied), epoch)


def alice_and_bob() -> tuple[MatchingEngine, Batch]:
    """Writer A's first batch: alice's buy rests as order 1 (seq 1), bob's sell above it as order 2 (seq 2)."""
    engine = MatchingEngine(SPEC)
    return engine, batch(engine, [place("alice", "a1", Side.BUY, 100, 5, 1), place("bob", "b1", Side.SELL, 200, 5, 2)],
                         0)


async def stop(*stores: AnyStore) -> None:
    for store in stores:
        await store.stop()


# ------------------------------------------------------------------------------------- take and epochs


def test_take_bumps_the_epochs_and_epochs_reads_them_back(backend: Backend) -> None:
    async def scenario() -> None:
        a, b = await backend.store(load=False), await backend.store(load=False)
        try:
            assert await a.epochs(["X", "Y"], [P0]) == Epochs({"X": 0, "Y": 0}, {P0: 0})  # never taken
            assert await a.take(["X", "Y"], [P0], "a") == Epochs({"X": 1, "Y": 1}, {P0: 1})
            assert await b.take(["X", "X"], [P0, (TOPIC, 1), P0], "b") == Epochs({"X": 2}, {P0: 2, (TOPIC, 1): 1})
            expected = Epochs({"X": 2, "Y": 1, "Z": 0}, {P0: 2, (TOPIC, 1): 1, (TOPIC, 2): 0})
            for store in (a, b):  # whoever asks
                assert await store.epochs(["Z", "Y", "X"], [(TOPIC, 2), (TOPIC, 1), P0]) == expected
            assert await b.take([], [(TOPIC, 1)], "b") == Epochs({}, {(TOPIC, 1): 2})
            assert await a.epochs(["X"], []) == Epochs({"X": 2}, {})
        finally:
            await stop(a, b)
        owners = await backend.sql("SELECT instrument, epoch, owner FROM instrument_owners ORDER BY instrument")
        assert [(r["instrument"], r["epoch"], r["owner"]) for r in owners] == [("X", 2, "b"), ("Y", 1, "a")]
        parts = await backend.sql("SELECT topic, partition, epoch, owner FROM partition_owners ORDER BY partition")
        assert [tuple(r.values()) for r in parts] == [(TOPIC, 0, 2, "b"), (TOPIC, 1, 2, "b")]

    run(scenario())


# ---------------------------------------------------------------- fencing in the commit's transaction


def test_a_batch_prepared_before_another_take_is_fenced_and_writes_nothing(backend: Backend) -> None:
    async def scenario() -> None:
        a, b = await backend.store(), await backend.store()
        try:
            assert (await a.take(["X"], [], "a")).instruments == {"X": 1}
            engine_a, first = alice_and_bob()
            await a.commit(first)
            if isinstance(a, PostgresStore):  # the commit path this backend runs
                assert a.one_statement_commits == int(backend.one_statement)
            durable = await backend.contents()
            assert (await b.take(["X"], [], "b")).instruments == {"X": 2}  # a second process takes X
            late = batch(engine_a, [place("carol", "c1", Side.SELL, 100, 2, 3)], 2)  # would fill alice
            for _ in range(2):  # a retry cannot help
                with pytest.raises(Fenced) as info:
                    await a.commit(late)
                assert info.value.current == Epochs({"X": 2}, {})
                assert not isinstance(info.value, StoreUnavailable)
                assert "X (epoch now 2)" in str(info.value)
                assert await backend.contents() == durable  # nothing of it: events, orders, progress, offsets

            # the new owner carries on from A's last durable state
            state = (await b.load(SPECS))["X"].state
            assert (state.seq, state.next_order_id, [o.order_id for o in state.orders]) == (2, 3, [1, 2])
            engine_b = MatchingEngine.from_state(SPEC, state)
            await b.commit(batch(engine_b, [place("dave", "d1", Side.SELL, 100, 2, 4)], 2, epoch=2))
            events = await backend.sql("SELECT seq, type, client_id FROM order_events ORDER BY seq")
            assert [(r["seq"], r["type"], r["client_id"]) for r in events] == [
                (1, "accepted", "alice"), (2, "accepted", "bob"), (3, "accepted", "dave"), (4, "filled", "dave")]
            progress = await backend.sql("SELECT seq FROM engine_progress")
            offsets = await backend.sql("SELECT instrument, partition, last_offset FROM input_offsets")
            assert ([r["seq"] for r in progress], [tuple(r.values()) for r in offsets]) == ([4], [("X", 3, 2)])
            with pytest.raises(Fenced):
                await a.commit(late)
        finally:
            await stop(a, b)
        report = await backend.verify()
        assert report.ok, report.render()

    run(scenario())


def test_a_partition_row_under_an_old_partition_epoch_is_fenced(backend: Backend) -> None:
    """A batch may carry an orders partition's own row (where reading resumes) without any instrument of that
    partition: the partition's epoch fences it, and the whole batch with it."""
    async def scenario() -> None:
        a, b = await backend.store(), await backend.store()
        try:
            assert await a.take(["X"], [P0], "a") == Epochs({"X": 1}, {P0: 1})
            engine, first = alice_and_bob()
            await a.commit(stamped(Batch(first.applied, partitions={P0: 5})))
            durable = await backend.contents()
            assert await b.take([], [P0], "b") == Epochs({}, {P0: 2})  # the partition only; A still owns X
            x_only = batch(engine, [place("carol", "c1", Side.BUY, 90, 1, 3)], 2)
            with pytest.raises(Fenced) as info:  # X's records are fine, orders[0]'s row is not
                await a.commit(stamped(Batch(x_only.applied, partitions={P0: 9})))
            assert info.value.current == Epochs({}, {P0: 2})
            assert "orders[0] (epoch now 2)" in str(info.value)
            with pytest.raises(Fenced) as info:  # the partition row alone
                await a.commit(stamped(Batch([], partitions={P0: 9})))
            assert info.value.current == Epochs({}, {P0: 2})
            assert await backend.contents() == durable
            # without the partition's row, A's batch for X (whose epoch is still current) goes through
            await a.commit(x_only)
            offsets = await backend.sql("SELECT instrument, partition, last_offset FROM input_offsets")
            assert sorted(tuple(r.values()) for r in offsets) == [("", 0, 5), ("X", 3, 2)]
        finally:
            await stop(a, b)

    run(scenario())


def test_a_batch_without_an_epoch_is_refused_for_good(backend: Backend) -> None:
    async def scenario() -> None:
        store = await backend.store()
        try:
            await store.take(["X"], [P0], "a")
            _, first = alice_and_bob()
            for unfenced, named in ((Batch(first.applied), "X"),  # no epoch for X
                                    (Batch(first.applied, partitions={P0: 1}, epochs={"X": 1}), "orders[0]")):
                with pytest.raises(StoreUnavailable) as info:
                    await store.commit(unfenced)
                assert not info.value.retriable
                assert f"no ownership epoch for {named}" in str(info.value)
                assert not any((await backend.contents()).values())
            await store.commit(stamped(Batch(first.applied, partitions={P0: 1})))  # the same rows, fenced
        finally:
            await store.stop()
        if backend.kind == "postgres":  # and the function itself refuses such a document (EXU03)
            fields = {"progress": dict.fromkeys(("instrument", "first_seq", "last_seq", "next_order_id",
                                                 "next_trade_id", "halted"), 0),
                      "offsets": {"instrument": 0, "topic": 1, "partition": 2, "last_offset": 3}}
            for rows, named in (({"progress": [["X"]]}, "X"), ({"offsets": [["", TOPIC, 0, 7]]}, "orders[0]")):
                document = {"fields": fields, "progress": [], "offsets": [], "epochs": [], "partition_epochs": [],
                            **rows}
                with pytest.raises(asyncpg.PostgresError) as pg:
                    await backend.sql(f"SELECT exchange_commit_batch('{json.dumps(document)}'::jsonb)")
                assert pg.value.sqlstate == "EXU03"
                assert f"rows of {named} but carries no ownership epoch" in str(pg.value)

    run(scenario())


# ------------------------------------------------------------------ a take waits for a commit (PostgreSQL)


def test_a_take_waits_for_a_commit_under_the_old_epoch(pg_dsn: str) -> None:
    """A commit holds its ownership rows FOR SHARE (``exchange_fence``, the first thing it does); a take waits for
    it to end, and gives up retriably after its 2 s lock_timeout."""
    async def scenario() -> None:
        a, b = PostgresStore(pg_dsn, SPECS, pool_size=2), PostgresStore(pg_dsn, SPECS, pool_size=2)
        holder = None
        try:
            for store in (a, b):
                await store.start()
                await store.migrate()
            assert await a.take(["X"], [P0], "a") == Epochs({"X": 1}, {P0: 1})
            fence = json.dumps({"epochs": [["X", 1]], "partition_epochs": [[TOPIC, 0, 1]]})
            holder = await asyncpg.connect(pg_dsn)
            for outcome in ("times out", "ends"):
                tx = holder.transaction()
                await tx.start()  # a commit under epoch 1, in flight
                assert await holder.fetchval("SELECT exchange_fence($1::text::jsonb)", fence) is None
                started = time.monotonic()
                taking = asyncio.ensure_future(b.take(["X"], [P0], "b"))
                await asyncio.sleep(0.5)
                assert not taking.done()
                if outcome == "times out":
                    with pytest.raises(StoreUnavailable) as info:
                        await taking
                    assert info.value.retriable
                    assert 1.9 < time.monotonic() - started < 10
                    assert "taking ownership of X" in str(info.value)
                    assert await a.epochs(["X"], [P0]) == Epochs({"X": 1}, {P0: 1})  # nothing taken
                    await tx.rollback()
                else:
                    await tx.commit()
                    assert await asyncio.wait_for(taking, 5) == Epochs({"X": 2}, {P0: 2})
        finally:
            if holder is not None:
                await holder.close()
            await stop(a, b)

    run(scenario())


# --------------------------------------------------- the two-writer corruption, and lost acknowledgements


@pytest.mark.parametrize("b_loaded", ["before A wrote", "never", "after A wrote"])
def test_a_second_writer_that_did_not_start_from_the_stored_state_is_refused(backend: Backend,
                                                                            b_loaded: str) -> None:
    """The regression: writer B, whose engine did not start from A's durable state, takes X and commits its own
    batch for the seqs A stored. It was acknowledged as "already durable" and B's next batch -- bob canceling
    order 1, his in B's book, alice's in the store -- landed. Now it is refused for good, nothing of it is
    stored, and ``recover --verify`` catches such an event if one ever gets in. ``b_loaded``: when B's store read
    the stored state (caches at seq 0, none, or at A's seq 2 while B's engine is fresh)."""
    async def scenario() -> None:
        a = await backend.store()
        b = await backend.store(load=b_loaded == "before A wrote")
        try:
            await a.take(["X"], [], "a")
            _, first = alice_and_bob()
            await a.commit(first)
            durable = await backend.contents()
            report = await backend.verify()
            assert report.ok, report.render()

            assert (await b.take(["X"], [], "b")).instruments == {"X": 2}
            if b_loaded == "after A wrote":
                assert (await b.load(SPECS))["X"].state.seq == 2
            engine_b = MatchingEngine(SPEC)  # not A's state
            mine = batch(engine_b, [place("bob", "bx", Side.SELL, 300, 5, 10),
                                    place("bob", "by", Side.SELL, 300, 3, 11)], 0, epoch=2)
            assert mine.last_seq() == first.last_seq() == {"X": 2}
            cancel = batch(engine_b, [CancelOrder("X", "bob", order_id=1, ts_ns=12)], 2, epoch=2)
            (canceled,) = cancel.applied[0].events
            assert isinstance(canceled, OrderCanceled)
            assert (canceled.order_id, canceled.client_id) == (1, "bob")
            for _ in range(2):  # the writer would retry a retriable refusal: it must not be one
                with pytest.raises(StoreUnavailable) as info:
                    await b.commit(mine)
                assert not info.value.retriable
                assert "stored already, with other events" in str(info.value)
                assert await backend.contents() == durable
            # B's writer stops there: its "cancel order 1" batch never lands; alice's order is open
            orders = await backend.sql("SELECT order_id, client_id, status FROM orders ORDER BY order_id")
            assert [tuple(r.values()) for r in orders] == [(1, "alice", "open"), (2, "bob", "open")]
            report = await backend.verify()
            assert report.ok, report.render()

            # what the corruption left: B's cancel of "order 1" stored as seq 3, alice's order 1 canceled by it
            payload = msgspec.json.encode(canceled)
            await backend.sql("INSERT INTO order_events (instrument, seq, ts_ns, type, order_id, client_id, payload) "
                              f"VALUES ('X', 3, 12, 'canceled', 1, 'bob', {backend.blob(payload)})")
            await backend.sql("UPDATE orders SET status = 'canceled', remaining_lots = 0, updated_seq = 3, "
                              "updated_ts_ns = 12 WHERE instrument = 'X' AND order_id = 1")
            await backend.sql("UPDATE engine_progress SET seq = 3 WHERE instrument = 'X'")
            report = await backend.verify()
            assert not report.ok
            (x,) = report.instruments
            assert any("seq 3 names client 'bob'" in p and "order 1, which belongs to 'alice'" in p
                       for p in x.problems), report.render()
            assert "full replay" in " ".join(x.problems)
            assert "MISMATCH" in report.render()
        finally:
            await stop(a, b)

    run(scenario())


def test_a_lost_acknowledgement_is_recognised_by_content(backend: Backend) -> None:
    """A store whose caches are behind (its commit "failed", but was durable) commits the batch again: the same
    events are acknowledged without writing twice; other events for those seqs -- here one timestamp off by a
    nanosecond -- are refused for good."""
    async def scenario() -> None:
        writer, retrier = await backend.store(), await backend.store()  # both at seq 0
        try:
            await writer.take(["X"], [], "w")
            engine, first = alice_and_bob()
            different = batch(MatchingEngine(SPEC), [place("alice", "a1", Side.BUY, 100, 5, 1),
                                                     place("bob", "b1", Side.SELL, 200, 5, 3)], 0)
            assert [type(e) for a in different.applied for e in a.events] == [
                type(e) for a in first.applied for e in a.events]
            await writer.commit(first)
            durable = await backend.contents()
            with pytest.raises(StoreUnavailable) as info:
                await retrier.commit(different)
            assert not info.value.retriable
            assert "stored already, with other events" in str(info.value)
            assert await backend.contents() == durable
            await retrier.commit(first)  # the very batch: acknowledged, nothing written
            assert await backend.contents() == durable
            second = batch(engine, [place("carol", "c1", Side.SELL, 100, 2, 4)], 2)
            await retrier.commit(second)
            await writer.commit(second)  # now the writer is the one behind
            events = await backend.sql("SELECT seq FROM order_events ORDER BY seq")
            assert [r["seq"] for r in events] == [1, 2, 3, 4]
        finally:
            await stop(writer, retrier)
        report = await backend.verify()
        assert report.ok, report.render()

    run(scenario())


# ------------------------------------------------------------------------- SQLite held by one process

_CHILD = """import asyncio, sys
from exchange import Instrument
from exchange.adapters.sqlite import SqliteStore
async def hold():
    async with SqliteStore(sys.argv[1], [Instrument.from_decimals("X", tick_size="0.01", lot_size="0.1")],
                           exclusive=True):
        print("holding", flush=True)
        sys.stdin.read()
asyncio.run(hold())"""


async def _held_by(path: Path, pid: int) -> None:
    """Another exclusive store is refused for good, naming ``pid``; a reader (as `exchange recover --verify` opens
    the file) reads and verifies it all the same."""
    with pytest.raises(StoreUnavailable) as info:
        await SqliteStore(path, SPECS, exclusive=True).start()
    assert not info.value.retriable
    for part in ("in use by another exchange process", f"pid {pid}", "run several on PostgreSQL"):
        assert part in str(info.value)
    async with SqliteStore(path, SPECS) as reader:
        assert (await reader.load(SPECS))["X"].state.seq == 2
        report = await verify_store(reader, SPECS)
        assert report.ok, report.render()


def test_sqlite_is_held_by_one_process(tmp_path: Path) -> None:
    path = tmp_path / "exchange.sqlite"

    async def scenario() -> None:
        first = SqliteStore(path, SPECS, exclusive=True)
        await first.start()
        try:
            await first.migrate()
            await first.take(["X"], [], "first")
            await first.commit(alice_and_bob()[1])
            await _held_by(path, os.getpid())
        finally:
            await first.stop()
        async with SqliteStore(path, SPECS, exclusive=True) as again:  # the file is free once the first stopped
            assert (await again.load(SPECS))["X"].state.seq == 2

    run(scenario())
    # another OS process holds it (the lock is the kernel's: it goes with the process, however it ends)
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], cwd=ROOT, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "holding", child.communicate()
            assert Path(f"{path}.lock").read_text().strip() == str(child.pid)
            run(_held_by(path, child.pid))
        finally:
            child.kill()  # SIGKILL: no stop(), no cleanup
            child.wait(10)

    async def free() -> None:  # once the child is gone
        async with SqliteStore(path, SPECS, exclusive=True) as store:
            assert (await store.load(SPECS))["X"].state.seq == 2

    run(free())
