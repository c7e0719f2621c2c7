"""Operator halt and resume: exact events, what still works while halted, state and hash.

While halted, places and amends are rejected ``instrument_halted``; cancels,
cancel-all, clear and GTD expiry go on; resume restores trading on the book as
it was. The flag is engine state: exported, restored and hashed.
"""

from __future__ import annotations

from exchange import (
    BookCleared,
    CancelAll,
    ClearBook,
    HaltInstrument,
    InstrumentHalted,
    InstrumentResumed,
    MatchingEngine,
    RejectReason,
    ResumeInstrument,
)
from exchange.projections.applier import EventApplier
from exchange.wire.codec import decode_command, event_to_wire

from ._helpers import (
    BOB,
    BUY,
    CLEARED,
    GTD,
    SELL,
    SYM,
    amend,
    buy,
    canceled,
    expired,
    filled,
    make_spec,
    rejected,
    run,
    sell,
)

OPS = "ops-1"
HALTED = RejectReason.INSTRUMENT_HALTED


def halt(ts: int = 0, text: str = "") -> HaltInstrument:
    return HaltInstrument(SYM, OPS, text, ts)


def resume(ts: int = 0, text: str = "") -> ResumeInstrument:
    return ResumeInstrument(SYM, OPS, text, ts)


def test_halt_rejects_places_and_amends_but_cancels_still_work(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 5), buy("b2", 99, 5))
    events = run(engine,
                 halt(ts=10, text="news pending"),
                 sell("s1", 100, 1, client=BOB, ts=11),
                 amend("b1", price=101, ts=12),
                 buy("b1", 100, 5, ts=13),  # a duplicate id: halted comes first
                 CancelAll("alice", SYM, ts_ns=14))
    assert events == [
        InstrumentHalted(SYM, 3, 10, OPS, "news pending"),
        rejected(4, HALTED, "s1", client=BOB, ts=11),
        rejected(5, HALTED, "b1", command="amend", ts=12),
        rejected(6, HALTED, "b1", ts=13),
        canceled(7, 1, "b1", BUY, 100, 5, ts=14),
        canceled(8, 2, "b2", BUY, 99, 5, ts=14),
    ]
    assert engine.halted


def test_resume_trades_against_the_book_as_it_was(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 5), halt(ts=1))
    events = run(engine, resume(ts=2, text="ok"), sell("s1", 100, 2, client=BOB, ts=3))
    assert events[:1] == [InstrumentResumed(SYM, 3, 2, OPS, "ok")]
    assert events[2:] == [filled(5, 1, 100, 2, SELL, (1, "alice", "b1", 3), (2, BOB, "s1", 0), ts=3)]
    assert not engine.halted


def test_halting_twice_and_resuming_a_trading_instrument_are_rejected(engine: MatchingEngine) -> None:
    assert run(engine, resume(), halt(), halt()) == [
        rejected(1, RejectReason.NOT_HALTED, client=OPS, command="resume"),
        InstrumentHalted(SYM, 2, 0, OPS, ""),
        rejected(3, HALTED, client=OPS, command="halt"),
    ]
    assert engine.halted


def test_clear_and_expiry_still_work_while_halted(engine: MatchingEngine) -> None:
    run(engine, buy("g", 100, 1, tif=GTD, expire_ns=50, ts=1), buy("b", 99, 2, ts=2), halt(ts=3))
    assert run(engine, ClearBook(SYM, 60, OPS, "end of day")) == [
        expired(4, 1, "g", BUY, 100, 1, ts=60),  # expiries first, as for any input; not counted
        BookCleared(SYM, 5, 60, OPS, "end of day", 1),
        canceled(6, 2, "b", BUY, 99, 2, CLEARED, ts=60),
    ]


def test_the_halted_flag_is_state_and_part_of_the_hash(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 5))
    trading_hash = engine.state_hash()
    assert trading_hash == engine.book.state_hash()  # a trading book hashes as before halts existed
    run(engine, halt())
    assert engine.state_hash() != trading_hash
    state = engine.export_state()
    assert state.halted
    restored = MatchingEngine.from_state(engine.spec, state)
    assert restored.halted
    assert restored.state_hash() == engine.state_hash()
    assert run(restored, sell("s", 100, 1, client=BOB)) == [rejected(3, HALTED, "s", client=BOB)]
    run(engine, resume())
    assert engine.state_hash() == trading_hash


def test_the_event_applier_follows_halts_like_the_engine() -> None:
    spec = make_spec()
    engine = MatchingEngine(spec)
    applier = EventApplier(spec)
    for command in (buy("b1", 100, 5), halt(), sell("s", 100, 1, client=BOB), resume(), halt()):
        applier.apply_all(engine.apply(command))
        assert applier.state_hash() == engine.state_hash()
    assert applier.export_state() == engine.export_state()


def test_wire_halt_and_resume() -> None:
    specs = {SYM: make_spec()}
    assert decode_command(b'{"op": "halt", "instrument": "T", "client_id": "ops-1", "text": "why"}', specs,
                          ts_ns=7) == HaltInstrument(SYM, OPS, "why", 7)
    assert decode_command({"op": "resume", "instrument": "T", "client_id": "ops-1"}, specs,
                          ts_ns=8) == ResumeInstrument(SYM, OPS, "", 8)
    wire = event_to_wire(InstrumentHalted(SYM, 3, 10, OPS, "why"), specs[SYM])
    assert wire == {"type": "halted", "instrument": SYM, "seq": 3, "ts_ns": 10, "client_id": OPS, "text": "why"}
