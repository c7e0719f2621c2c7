"""The edge's one guard (exchange.pipeline.router): one outcome per message, never an exception.

A unit test per class of hostile or careless input the daemon met: each gives a machine-readable
refusal (dead letter, seq-0 rejection) or a sequenced rejection, and nothing the store cannot hold
gets through.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from exchange.adapters.kafka import partition_for
from exchange.core.commands import CancelAll, CancelOrder, ClearBook, HaltInstrument, PlaceOrder, RejectInput
from exchange.core.instruments import Instrument
from exchange.core.types import RejectReason
from exchange.pipeline import router
from exchange.pipeline.router import Refusal, Router, SnapshotRequested
from exchange.wire import auth, codec
from exchange.wire.auth import Verifier, sign
from exchange.wire.codec import MAX_TS_NS

SPEC = Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001")
SPECS = {SPEC.symbol: SPEC}
TS = 1_700_000_000_000_000_000
KEYS = {"ops-1": b"0123456789abcdef0123456789abcdef"}
PARTITIONS = 4
HOME = partition_for("BTC-USD", PARTITIONS)


def daemon_router(**kw: Any) -> Router:
    return Router(SPECS, verifier=Verifier(KEYS), partitions={s: partition_for(s, PARTITIONS) for s in SPECS}, **kw)


def route(msg: dict[str, Any] | bytes, *, ts_ns: int = TS, key: bytes | None = b"BTC-USD",
          partition: int | None = HOME, r: Router | None = None) -> Any:
    value = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    return (r or daemon_router()).route(value, ts_ns, key=key, partition=partition)


def place(**fields: Any) -> dict[str, Any]:
    return {"op": "place", "instrument": "BTC-USD", "client_id": "alice", "client_order_id": "a-1", "side": "buy",
            "price": "100.00", "qty": "0.5", **fields}


def refused(outcome: Any, reason: RejectReason) -> Refusal:
    assert isinstance(outcome, Refusal), outcome
    assert outcome.reason is reason, outcome
    return outcome


def rejected(outcome: Any, reason: RejectReason) -> RejectInput:
    assert isinstance(outcome, RejectInput), outcome
    assert outcome.reason is reason, outcome
    return outcome


def test_a_valid_order_becomes_its_command() -> None:
    outcome = route(place())
    assert isinstance(outcome, PlaceOrder)
    assert (outcome.price_ticks, outcome.qty_lots, outcome.ts_ns) == (10_000, 500, TS)


# ---------------------------------------------------------------- 1. deep JSON, 2. wrong types

def test_deeply_nested_json_is_malformed_not_a_recursion_error() -> None:
    deep = b"[" * 20_000 + b"]" * 20_000
    assert "nested too deeply" in refused(route(deep), RejectReason.MALFORMED).text
    deep_object = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
    refused(route(deep_object), RejectReason.MALFORMED)


@pytest.mark.parametrize("instrument", [["BTC-USD"], {"x": 1}, 7, True, "", "x" * 65, "BTC\x00USD", "BTC\nUSD"])
def test_an_instrument_that_is_not_an_identifier_is_malformed(instrument: Any) -> None:
    for op in ("snapshot", "place", "cancel_all", "halt"):
        outcome = refused(route({"op": op, "instrument": instrument, "client_id": "alice"}), RejectReason.MALFORMED)
        assert outcome.client_id == "alice"  # the sender still hears back
        assert len(outcome.text) < 200


@pytest.mark.parametrize("op", [["place"], 1, None, "", "PLACE", "x" * 100_000])
def test_an_unknown_op_is_malformed_and_quoted_briefly(op: Any) -> None:
    outcome = refused(route(place(op=op), r=daemon_router(max_message_bytes=10**7)), RejectReason.MALFORMED)
    assert len(outcome.text) < 300


@pytest.mark.parametrize("value", [b"null", b"[]", b'"place"', b"12", b"\xff\xfe", b'{"op": "place"', b""])
def test_a_value_that_is_not_one_json_object_is_malformed(value: bytes) -> None:
    refused(route(value), RejectReason.MALFORMED)


def test_a_tombstone_is_malformed() -> None:
    refused(daemon_router().route(None, TS, key=b"BTC-USD", partition=HOME), RejectReason.MALFORMED)


# ---------------------------------------------------------------- 3. values the store cannot hold

@pytest.mark.parametrize("field", ["client_id", "client_order_id"])
@pytest.mark.parametrize("value", ["a\x00b", "\x00", "a\x1fb", "a\x7f", "x" * 65, "", 5, ["a"]])
def test_identifiers_the_store_cannot_key_on_are_refused(field: str, value: Any) -> None:
    outcome = route(place(**{field: value}))
    if field == "client_id":  # no sender to answer: a dead letter
        assert refused(outcome, RejectReason.MALFORMED).client_id is None
    else:  # the sender is known: a sequenced rejection, which never names the bad id
        assert rejected(outcome, RejectReason.MALFORMED).client_order_id is None


def test_identifiers_with_unicode_pass() -> None:
    outcome = route(place(client_id="élise-株", client_order_id="ü" * 64))
    assert isinstance(outcome, PlaceOrder)


@pytest.mark.parametrize("order_id", [2**63, 2**64, 10**30, 0, -1, True, "5", 1.5])
def test_an_order_id_outside_int64_is_refused(order_id: Any) -> None:
    msg = {"op": "cancel", "instrument": "BTC-USD", "client_id": "alice", "order_id": order_id}
    rejected(route(msg), RejectReason.MALFORMED)


def test_the_largest_order_id_passes() -> None:
    msg = {"op": "cancel", "instrument": "BTC-USD", "client_id": "alice", "order_id": 2**63 - 1}
    assert isinstance(route(msg), CancelOrder)


@pytest.mark.parametrize("expire_ns", [2**63, 2**70, MAX_TS_NS + 1, -5])
def test_an_expiry_outside_the_sane_range_is_refused(expire_ns: int) -> None:
    rejected(route(place(tif="GTD", expire_ns=expire_ns)), RejectReason.INVALID_EXPIRY)


@pytest.mark.parametrize("ts_ns", [-1, -1_000_000, MAX_TS_NS + 1, 9_223_372_036_854_775_807])
def test_an_input_time_outside_1970_to_2100_is_refused(ts_ns: int) -> None:
    refused(route(place(), ts_ns=ts_ns), RejectReason.INVALID_TIMESTAMP)


def test_a_producer_timestamp_in_2262_is_refused() -> None:
    ms_2262 = 9_223_372_036_855  # the first millisecond whose nanoseconds overflow int64
    refused(route(place(), ts_ns=ms_2262 * 1_000_000), RejectReason.INVALID_TIMESTAMP)


def test_an_operator_note_with_nul_or_too_long_is_refused() -> None:
    for text in ("why\x00", "x" * 201, 5):
        msg = sign({"op": "halt", "instrument": "BTC-USD", "client_id": "ops", "text": text}, "ops-1", KEYS["ops-1"],
                   TS // 1_000_000)
        refused(route(msg), RejectReason.MALFORMED)


def test_every_text_quotes_a_bounded_prefix_of_a_huge_value() -> None:
    huge = "\u00a0" * 440_000
    r = daemon_router(max_message_bytes=10**7)  # quoting, not the size limit, is under test
    for msg in (place(side=huge), place(tif=huge), place(price=huge), place(qty=huge), place(type=huge),
                place(stp=huge), place(price="nan" + " " * 100_000), {**place(), "op": huge}):
        outcome = route(msg, r=r)
        assert not isinstance(outcome, Refusal) or outcome.reason is not RejectReason.MESSAGE_TOO_LARGE
        text = outcome.text
        assert len(text) < 400, (msg.keys(), len(text))
        assert len(msgspec.json.encode(text)) < 2_000


# ---------------------------------------------------------------- 4. sizes

def test_a_message_above_the_limit_is_refused_unread() -> None:
    r = daemon_router(max_message_bytes=2048)
    big = json.dumps(place(text="x" * 3000)).encode()
    outcome = refused(r.route(big, TS, key=b"BTC-USD", partition=HOME), RejectReason.MESSAGE_TOO_LARGE)
    assert outcome.client_id is None  # not parsed: nobody to answer
    assert isinstance(r.route(json.dumps(place()).encode(), TS, key=b"BTC-USD", partition=HOME), PlaceOrder)


# ---------------------------------------------------------------- 8. one partition per instrument

def test_a_message_on_another_partition_is_refused_with_the_expected_one() -> None:
    other = (HOME + 1) % PARTITIONS
    outcome = refused(route(place(), partition=other), RejectReason.WRONG_PARTITION)
    assert outcome.expected_partition == HOME
    assert outcome.client_id == "alice"


@pytest.mark.parametrize("key", [None, b"btc-usd", b"ETH-USD", b"garbage", b"\xff"])
def test_a_message_not_keyed_by_its_instrument_is_refused(key: bytes | None) -> None:
    refused(route(place(), key=key), RejectReason.WRONG_PARTITION)


def test_operator_actions_obey_the_partition_rule_too() -> None:
    msg = sign({"op": "halt", "instrument": "BTC-USD", "client_id": "ops"}, "ops-1", KEYS["ops-1"], TS // 1_000_000)
    refused(route(msg, partition=(HOME + 1) % PARTITIONS), RejectReason.WRONG_PARTITION)
    assert isinstance(route(msg), HaltInstrument)


def test_partition_for_is_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    kafka = DefaultPartitioner()
    for symbol in ("BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD", "x", "株"):
        for n in (1, 2, 3, 7, 12):
            assert partition_for(symbol, n) == kafka(symbol.encode(), list(range(n)), list(range(n)))


# ---------------------------------------------------------------- 10. cancel_all without an instrument

def test_cancel_all_without_an_instrument_is_instrument_required_in_the_daemon() -> None:
    outcome = refused(route({"op": "cancel_all", "client_id": "alice"}, key=None), RejectReason.INSTRUMENT_REQUIRED)
    assert (outcome.command, outcome.instrument, outcome.client_id) == ("cancel_all", None, "alice")


def test_the_library_router_fans_cancel_all_out() -> None:
    r = Router(SPECS, verifier=None, fan_out=True)
    outcome = r.route(b'{"op": "cancel_all", "client_id": "alice"}', TS)
    assert outcome == CancelAll("alice", None, TS)
    assert r.route(b'{"op": "snapshot"}', TS) == SnapshotRequested(None, None)


# ---------------------------------------------------------------- 12. an invalid client_order_id

@pytest.mark.parametrize("coid", [["x"], 5, "x" * 65, "a\x00", ""])
@pytest.mark.parametrize("op", ["cancel", "amend"])
def test_an_invalid_client_order_id_is_a_rejection_even_with_an_order_id(op: str, coid: Any) -> None:
    msg = {"op": op, "instrument": "BTC-USD", "client_id": "alice", "client_order_id": coid, "order_id": 5,
           "qty": "1"}
    outcome = rejected(route(msg), RejectReason.MALFORMED)
    assert outcome.command == op


# ---------------------------------------------------------------- 13. signed operator actions

def halt(**fields: Any) -> dict[str, Any]:
    return {"op": "halt", "instrument": "BTC-USD", "client_id": "ops-anna", "text": "news", **fields}


def test_a_signed_fresh_operator_action_is_applied() -> None:
    msg = sign(halt(), "ops-1", KEYS["ops-1"], TS // 1_000_000 - 5_000)
    assert route(msg) == HaltInstrument("BTC-USD", "ops-anna", "news", TS)
    clear = sign({"op": "clear", "instrument": "BTC-USD", "client_id": "ops-anna", "text": "eod"}, "ops-1",
                 KEYS["ops-1"], TS // 1_000_000)
    assert route(clear) == ClearBook("BTC-USD", TS, client_id="ops-anna", text="eod")
    snap = sign({"op": "snapshot", "instrument": "BTC-USD", "client_id": "ops-anna"}, "ops-1", KEYS["ops-1"],
                TS // 1_000_000)
    assert route(snap) == SnapshotRequested("BTC-USD", "ops-anna")


def _not_authorized(msg: dict[str, Any], claimed: str, *, r: Router | None = None) -> str:
    outcome = rejected(route(msg, r=r), RejectReason.NOT_AUTHORIZED)
    assert outcome.client_id == claimed
    assert outcome.instrument == "BTC-USD"
    return outcome.text


def test_unsigned_wrongly_signed_stale_or_unknown_key_actions_are_not_authorized() -> None:
    ms = TS // 1_000_000
    assert "must be signed" in _not_authorized(halt(), "ops-anna")
    forged = sign(halt(), "ops-1", b"not the secret", ms)
    assert "does not match" in _not_authorized(forged, "ops-anna")
    tampered = sign(halt(), "ops-1", KEYS["ops-1"], ms)
    tampered["text"] = "something else"
    assert "does not match" in _not_authorized(tampered, "ops-anna")
    assert "stale" in _not_authorized(sign(halt(), "ops-1", KEYS["ops-1"], ms - 61_000), "ops-anna")
    assert "stale" in _not_authorized(sign(halt(), "ops-1", KEYS["ops-1"], ms + 61_000), "ops-anna")
    assert "unknown key" in _not_authorized(sign(halt(), "ops-2", KEYS["ops-1"], ms), "ops-anna")
    assert "auth must be" in _not_authorized(halt(auth="yes"), "ops-anna")
    assert "auth must be" in _not_authorized(halt(auth={"key_id": "ops-1", "ts_ms": "1", "signature": "x"}),
                                             "ops-anna")


def test_without_keys_every_operator_action_is_refused() -> None:
    no_keys = Router(SPECS, verifier=Verifier({}), partitions={s: partition_for(s, PARTITIONS) for s in SPECS})
    msg = sign(halt(), "ops-1", KEYS["ops-1"], TS // 1_000_000)
    assert "no operator keys" in _not_authorized(msg, "ops-anna", r=no_keys)


def test_every_operator_action_needs_a_signature() -> None:
    for msg, claimed in (({"op": "resume", "instrument": "BTC-USD", "client_id": "x"}, "x"),
                         ({"op": "clear", "instrument": "BTC-USD"}, ""),
                         ({"op": "snapshot", "instrument": "BTC-USD"}, ""),
                         ({"op": "cancel_all", "instrument": "BTC-USD", "client_id": "bob", "operator": "mallory",
                           "auth": {}}, "mallory")):
        outcome = rejected(route(msg), RejectReason.NOT_AUTHORIZED)
        assert (outcome.client_id, outcome.command) == (claimed, msg["op"])
    # a client's own cancel-all is not an operator action
    own = {"op": "cancel_all", "instrument": "BTC-USD", "client_id": "bob"}
    assert route(own) == CancelAll("bob", "BTC-USD", TS)


def test_the_signature_is_checked_against_the_messages_own_time() -> None:
    msg = sign(halt(), "ops-1", KEYS["ops-1"], 1_000)  # signed in 1970
    assert isinstance(route(msg, ts_ns=1_000 * 1_000_000 + 30_000 * 1_000_000), HaltInstrument)
    rejected(route(msg, ts_ns=TS), RejectReason.NOT_AUTHORIZED)


def test_the_canonical_form_is_sorted_compact_json_without_the_signature() -> None:
    msg = sign({"op": "halt", "instrument": "BTC-USD", "client_id": "ops", "text": "é"}, "k", b"s", 5)
    assert auth.canonical(msg) == (b'{"auth":{"key_id":"k","ts_ms":5},"client_id":"ops","instrument":"BTC-USD",'
                                   b'"op":"halt","text":"\\u00e9"}')
    import hashlib
    import hmac

    assert msg["auth"]["signature"] == hmac.new(b"s", auth.canonical(msg), hashlib.sha256).hexdigest()


def test_keys_are_parsed_from_the_environment_format() -> None:
    assert auth.parse_keys("a:one, b.2:two:with:colons") == {"a": b"one", "b.2": b"two:with:colons"}
    assert auth.parse_keys("") == {}
    for bad in ("nocolon", ":secret", "a:", "a:x,a:y", "bad id:x"):
        with pytest.raises(auth.AdminKeyError):
            auth.parse_keys(bad)


# ---------------------------------------------------------------- the guard itself

def test_anything_raised_on_the_way_becomes_an_internal_error_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise ZeroDivisionError("a bug in the decoder")

    monkeypatch.setattr(router, "decode_fields", broken)
    outcome = refused(route(place()), RejectReason.INTERNAL_ERROR)
    assert "ZeroDivisionError" in outcome.text
    assert isinstance(outcome.internal, ZeroDivisionError)
    monkeypatch.setattr(router, "parse_json", broken)
    refused(route(place()), RejectReason.INTERNAL_ERROR)
    # and the library's own decoder is unaffected: nothing else was patched
    assert isinstance(codec.decode_command(place(), SPECS, TS), PlaceOrder)


def test_replay_answers_an_error_line_when_the_edge_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from exchange.cli import replay

    def broken(*_: Any, **__: Any) -> None:
        raise RecursionError("deep")

    monkeypatch.setattr(router, "decode_fields", broken)
    out = io.BytesIO()
    replay.replay([json.dumps(place()).encode(), b'{"op": "snapshot"}'], out, [SPEC])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["error"]["reason"] == "internal_error"
    assert "snapshot" in lines[1]


def test_replay_and_the_daemon_agree_on_a_list_instrument() -> None:
    import io

    from exchange.cli import replay

    out = io.BytesIO()
    replay.replay([b'{"op":"snapshot","instrument":["BTC-USD"]}'], out, [SPEC])
    answer = json.loads(out.getvalue())
    assert answer["error"]["reason"] == "malformed"
    refused(route(b'{"op":"snapshot","instrument":["BTC-USD"]}'), RejectReason.MALFORMED)


def test_replay_reads_an_over_long_line_without_holding_it() -> None:
    import io

    from exchange.cli import replay

    huge = b'{"op": "place", "side": "' + b"x" * 5_000_000 + b'"}'
    lines = list(replay.bounded_lines(io.BytesIO(huge + b"\n" + json.dumps(place()).encode() + b"\n"), 1000))
    assert len(lines[0]) == 1001
    out = io.BytesIO()
    replay.replay(lines, out, [SPEC], max_message_bytes=1000)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["error"]["reason"] == "message_too_large"
    assert second["events"][0]["type"] == "accepted"


def test_replay_trusts_its_file_unless_asked_to_verify_signatures() -> None:
    import io
    import subprocess
    import sys

    from exchange.cli import replay

    unsigned = json.dumps(halt(ts_ns=TS)).encode()
    signed = json.dumps(sign(halt(ts_ns=TS + 1), "ops-1", KEYS["ops-1"], TS // 1_000_000)).encode()
    resume = json.dumps({"op": "resume", "instrument": "BTC-USD", "client_id": "ops", "ts_ns": TS + 2}).encode()

    def kinds(verifier: Verifier | None) -> list[str]:
        out = io.BytesIO()
        replay.replay([unsigned, signed, resume], out, [SPEC], verifier=verifier)
        return [e["type"] + (f":{e['reason']}" if "reason" in e else "")
                for line in out.getvalue().splitlines() for e in json.loads(line)["events"]]

    assert kinds(None) == ["halted", "rejected:instrument_halted", "resumed"]  # the operator's own file
    assert kinds(Verifier(KEYS)) == ["rejected:not_authorized", "halted", "rejected:not_authorized"]
    # the command line reads the keys from the environment, as the daemon does
    env = {"EXCHANGE_ADMIN_KEYS": "ops-1:" + KEYS["ops-1"].decode(), "PATH": "/usr/bin:/bin"}
    cli = subprocess.run([sys.executable, "-m", "exchange", "replay", "--symbol", "BTC-USD", "--tick", "0.01",
                          "--lot", "0.001", "--verify-signatures"], input=b"\n".join([unsigned, signed, resume]),
                         capture_output=True, env=env, timeout=60, check=True)
    types = [e["type"] for line in cli.stdout.splitlines() for e in json.loads(line)["events"]]
    assert types == ["rejected", "halted", "rejected"]
