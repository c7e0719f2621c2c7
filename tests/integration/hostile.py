"""A seeded stream of hostile and careless Kafka messages, and what the daemon must do with each.

``HostileFlow(...).records(n)`` yields :class:`Record` s: a value (bytes or None), a key, an
explicit partition or None (the producer's partitioner then picks: the contract), and a Kafka
timestamp. Every class of the hostile-input issue is there, plus seeded random mutations of valid
messages (bytes flipped or cut, fields given other types, sizes, nesting, NUL, huge integers,
wrong keys and partitions, unsigned or forged operator actions, deposits, withdrawals and budgets
with hostile amounts, assets and transfer ids).

Messages that would reach an instrument's loop go only to the instrument ``target`` (so the other
instruments' events are exactly those of the valid flow); the rest name any instrument and must
be refused before a loop sees them. :func:`expected_outcomes` computes, with the daemon's own
router, what each produced message must become.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from exchange.adapters.kafka import partition_for
from exchange.core.instruments import Instrument
from exchange.pipeline.router import Router
from exchange.wire.auth import Verifier, sign

__all__ = ["HostileFlow", "Record", "expected_outcomes"]

_TS_2262_MS = 9_223_372_036_855  # nanoseconds of this millisecond overflow int64


@dataclass(frozen=True, slots=True)
class Record:
    value: bytes | None
    key: bytes | None
    partition: int | None  # None: the default partitioner on the key
    timestamp_ms: int
    kind: str  # the class of hostility, for the test's report


class HostileFlow:
    def __init__(self, instruments: Sequence[Instrument], target: Instrument, *, seed: int, partitions: int,
                 key: tuple[str, bytes], start_ms: int = 1_700_000_000_000, max_message_bytes: int = 65_536) -> None:
        self.max_message_bytes = max_message_bytes
        self._specs = list(instruments)
        self._symbols = [s.symbol for s in self._specs] + [target.symbol]
        self._target = target
        self._rng = random.Random(seed)
        self._partitions = partitions
        self._key_id, self._secret = key
        self._ms = start_ms
        self._n = 0

    def records(self, count: int) -> Iterator[Record]:
        for _ in range(count):
            yield self.next()

    def next(self) -> Record:
        rng = self._rng
        self._n += 1
        self._ms += rng.randint(0, 1)
        kinds = (self._deep, self._wrong_types, self._store_values, self._too_large, self._huge_fields,
                 self._wrong_partition, self._no_instrument, self._bad_coid, self._operator, self._mutation,
                 self._mutation, self._mutation, self._unknown_instrument, self._garbage, self._money)
        return kinds[rng.randrange(len(kinds))]()

    # --------------------------------------------------------------- helpers

    def _valid(self, symbol: str) -> dict[str, Any]:
        rng = self._rng
        self._n += 1
        op = rng.choice(("place", "place", "place", "cancel", "amend", "cancel_all"))
        msg: dict[str, Any] = {"op": op, "instrument": symbol, "client_id": f"h-{rng.randrange(30)}"}
        if op == "place":
            msg.update(client_order_id=f"h{self._n}", side=rng.choice(("buy", "sell")),
                       price=f"{rng.randint(90, 110)}.00", qty=str(rng.randint(1, 5)))
        elif op in ("cancel", "amend"):
            msg["client_order_id"] = f"h{rng.randrange(max(1, self._n))}"
            if op == "amend":
                msg["qty"] = str(rng.randint(1, 9))
        return msg

    def _home(self, symbol: str) -> int:
        return partition_for(symbol, self._partitions)

    def _to_target(self, msg: dict[str, Any] | bytes, kind: str, *, ms: int | None = None) -> Record:
        """A message that reaches the target's loop: on its partition, keyed by it."""
        value = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        symbol = self._target.symbol
        return Record(value, symbol.encode(), self._home(symbol), self._ms if ms is None else ms, kind)

    def _anywhere(self, value: bytes | None, kind: str, *, key: bytes | None = None, partition: int | None = None,
                  ms: int | None = None) -> Record:
        """A message that must be refused before any loop sees it (any instrument, any partition)."""
        if partition is None and key is None:
            partition = self._rng.randrange(self._partitions)
        return Record(value, key, partition, self._ms if ms is None else ms, kind)

    # --------------------------------------------------------------- classes

    def _deep(self) -> Record:
        depth = self._rng.choice((1_000, 3_000, 10_000))
        opener, closer = self._rng.choice(((b"[", b"]"), (b'{"a":', b"}")))
        body = opener * depth + (b"1" if opener != b"[" else b"") + closer * depth
        return self._anywhere(body, "deep json", key=self._rng.choice(self._symbols).encode())

    def _wrong_types(self) -> Record:
        rng = self._rng
        symbol = rng.choice(self._symbols)
        msg = self._valid(symbol)
        msg["instrument"] = rng.choice(([symbol], {"s": symbol}, 7, True, None, "", "x" * 65, f"{symbol}\x00"))
        if rng.random() < 0.3:
            msg["op"] = rng.choice((["place"], 1, None, "PLACE", "snapshot "))
            msg["instrument"] = symbol
            if msg["op"] == "snapshot ":
                msg["op"] = ["snapshot"]
        return self._anywhere(json.dumps(msg).encode(), "wrong types", key=symbol.encode(),
                              partition=self._home(symbol))

    def _store_values(self) -> Record:
        """Values the edge used to accept and the store refused."""
        rng = self._rng
        symbol = self._target.symbol
        msg = self._valid(symbol)
        choice = rng.randrange(6)
        if choice == 0:  # NUL in the client id: nobody to answer, a dead letter
            msg["client_id"] = "h\x00" + str(rng.randrange(9))
        elif choice == 1:
            msg.update(op="place", client_order_id="nul\x00id", side="buy", price="100.00", qty="1")
        elif choice == 2:
            msg = {"op": "cancel", "instrument": symbol, "client_id": "h-1", "order_id": rng.choice((2**63, 2**64,
                                                                                                     10**40))}
        elif choice == 3:
            msg.update(op="place", client_order_id=f"gtd{self._n}", side="sell", price="101.00", qty="1", tif="GTD",
                       expire_ns=rng.choice((2**63, 2**64 + 5, 10**30)))
        elif choice == 4:  # a producer timestamp at or after 2262
            return self._to_target(msg, "timestamp 2262", ms=_TS_2262_MS + rng.randrange(10**6))
        else:
            msg["ts_ns"] = 2**64  # ignored by the daemon (the Kafka timestamp is the time)
        return self._to_target(msg, "store values")

    def _too_large(self) -> Record:
        rng = self._rng
        limit = self.max_message_bytes  # mostly just above the limit; now and then far above it
        size = rng.choice((200_000, 600_000)) if rng.random() < 0.005 else limit + rng.randrange(1, 2 * limit)
        symbol = rng.choice([*self._symbols, "NOPE-" + "X" * rng.randrange(100, 5000)])
        filler = rng.choice(("a", "\u00a0", "http://user:" + "s" * 10))
        msg = {"op": rng.choice(("place", "bogus")), "instrument": symbol, "client_id": "h-big",
               "side": filler * (size // len(filler.encode()))}
        return self._anywhere(json.dumps(msg, ensure_ascii=False).encode(), "too large", key=symbol.encode()[:64])

    def _huge_fields(self) -> Record:
        """Under the size limit, but huge values: rejection texts must quote a bounded prefix."""
        rng = self._rng
        msg = self._valid(self._target.symbol)
        msg.update(op="place", client_order_id=f"huge{self._n}", qty="1", price="100.00", side="buy")
        field = rng.choice(("side", "tif", "type", "stp", "price", "qty"))
        filler = rng.choice(("\u00a0", "b", "9", "http://u:p@"))
        msg[field] = filler * rng.randint(50, (self.max_message_bytes - 300) // (6 * len(filler)))  # under the limit
        return self._to_target(msg, "huge field")

    def _wrong_partition(self) -> Record:
        rng = self._rng
        symbol = rng.choice(self._symbols)
        msg = self._valid(symbol)
        home = self._home(symbol)
        choice = rng.randrange(3)
        value = json.dumps(msg).encode()
        if choice == 0 and self._partitions > 1:  # right key, other partition (another partitioner)
            other = (home + rng.randrange(1, self._partitions)) % self._partitions
            return self._anywhere(value, "wrong partition", key=symbol.encode(), partition=other)
        if choice == 1:  # right partition, wrong key
            return self._anywhere(value, "wrong key", key=rng.choice((b"garbage", symbol.lower().encode(), b"")),
                                  partition=home)
        return self._anywhere(value, "unkeyed", key=None, partition=rng.randrange(self._partitions))

    def _no_instrument(self) -> Record:
        rng = self._rng
        op = rng.choice(("cancel_all", "cancel_all", "snapshot", "clear", "halt", "place"))
        msg = {"op": op, "client_id": f"h-{rng.randrange(30)}"}
        return self._anywhere(json.dumps(msg).encode(), "no instrument", key=rng.choice((None, b"BTC-USD")))

    def _bad_coid(self) -> Record:
        rng = self._rng
        msg = {"op": rng.choice(("cancel", "amend")), "instrument": self._target.symbol, "client_id": "h-2",
               "client_order_id": rng.choice((["x"], 5, "x" * 65, "a\x00", "", {"a": 1})), "order_id": 1,
               "qty": "2"}
        return self._to_target(msg, "invalid client_order_id")

    def _operator(self) -> Record:
        rng = self._rng
        symbol = self._target.symbol
        op = rng.choice(("halt", "resume", "clear", "snapshot", "cancel_all"))
        msg: dict[str, Any] = {"op": op, "instrument": symbol, "client_id": rng.choice(("mallory", "ops-anna"))}
        if op == "cancel_all":
            msg["operator"] = "mallory"
            msg["auth"] = {}
        choice = rng.randrange(5)
        if choice == 1:
            msg = sign(msg, self._key_id, b"not the secret", self._ms)
        elif choice == 2:
            msg = sign(msg, self._key_id, self._secret, self._ms - rng.choice((61_000, 10**9)))  # stale
        elif choice == 3:
            msg = sign(msg, "no-such-key", self._secret, self._ms)
        elif choice == 4:
            msg = sign(msg, self._key_id, self._secret, self._ms)
            msg["text"] = "tampered after signing"
        return self._to_target(msg, "unsigned or forged operator action")

    def _money(self) -> Record:
        """Deposits and withdrawals (signed, unsigned or forged) and budgets with hostile fields, for the target
        (which keeps balances when the test configures it so; else they are refused ``balances_disabled``)."""
        rng = self._rng
        symbol = self._target.symbol
        fine = rng.random() < 0.5  # half of them well-formed: applied, refused for funds, or repeated
        amount = rng.choice(("100", "1000.00", "12.34", "5", str(10**22)) if fine else (
            "0.001", "100.005", "0", "-5", "1e3", "NaN", "9" * 40, str(10**24 + 1), 1.5, 10**30, None, [], {"a": 1},
            True))
        client = f"h-{rng.randrange(30)}" if fine or rng.random() < 0.5 else rng.choice(("", None, "a\x00", "x" * 65))
        if rng.random() < 0.3:  # a place with a hostile budget
            msg: dict[str, Any] = {"op": "place", "instrument": symbol, "client_id": client or "h-1",
                                   "client_order_id": f"f{self._n}", "side": rng.choice(("buy", "sell")),
                                   "type": rng.choice(("market", "limit")), "qty": str(rng.randint(1, 5)),
                                   "funds": amount}
            if msg["type"] == "limit":
                msg["price"] = "100.00"
            return self._to_target(msg, "hostile budget")
        msg = {"op": rng.choice(("deposit", "withdraw")), "instrument": symbol, "client_id": client,
               "asset": rng.choice(("HOST", "USD") if fine else ("EUR", None, 5, "", "usd", "HOST", "USD")),
               "amount": amount,
               "transfer_id": f"t{rng.randrange(200)}" if fine else rng.choice((
                   f"t{rng.randrange(200)}", f"t{self._n}", None, "", "x" * 65, "a\x00", 7))}
        how = rng.randrange(4)
        if how == 1:
            msg = sign(msg, self._key_id, b"not the secret", self._ms)
        elif how >= 2:  # signed: its fields reach the edge's checks and the engine's
            msg = sign(msg, self._key_id, self._secret, self._ms)
        return self._to_target(msg, "money")

    def _mutation(self) -> Record:
        """A valid message for the target, mutated at random."""
        rng = self._rng
        msg = self._valid(self._target.symbol)
        field = rng.choice([*msg.keys(), "price", "qty", "order_id", "expire_ns", "tif", "post_only", "stp"])
        msg[field] = rng.choice((
            None, True, 1.5, -1, 0, 2**63, 2**100, -(2**63) - 1, [], [1, [2]], {"x": {"y": 1}}, "",
            "\x00", "a\x00", "\u2028", "\ud7ff", "1e5", "NaN", "-0", "0.0000000000000000001", "9" * 40,
            "x" * rng.randint(1, 3000), "💥" * 10))
        value = json.dumps(msg).encode()
        if field in ("op", "instrument"):  # it may now be refused, or routed elsewhere: keep it off the others
            return self._anywhere(value, "mutation", key=self._target.symbol.encode(),
                                  partition=self._home(self._target.symbol))
        if rng.random() < 0.25:  # bytes: flipped, cut, doubled
            data = bytearray(value)
            how = rng.randrange(3)
            if how == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif how == 1:
                del data[rng.randrange(len(data)):]
            else:
                data = data + data
            value = bytes(data)
            try:  # a flip that still parses may now name another instrument or op: keep it off the others
                obj = json.loads(value)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj.get("instrument") != self._target.symbol:
                return self._anywhere(value, "mutation (bytes)", key=b"garbage",
                                      partition=self._home(self._target.symbol))
        return self._to_target(value, "mutation")

    def _unknown_instrument(self) -> Record:
        rng = self._rng
        symbol = rng.choice(("NOPE-USD", "btc-usd", "BTC-USD ", "X" * 64, "株-USD"))
        msg = self._valid(symbol)
        return self._anywhere(json.dumps(msg).encode(), "unknown instrument", key=symbol.encode())

    def _garbage(self) -> Record:
        rng = self._rng
        value = rng.choice((None, b"", b"\xff\xfe\xfd", b"not json", bytes(rng.randrange(256) for _ in range(64)),
                            b"null", b"[]", b"12", b'"place"', b'{"op":"place"'))
        key = rng.choice((None, b"BTC-USD")) if value is not None else b"BTC-USD"  # a tombstone has a key
        return self._anywhere(value, "garbage", key=key)


def expected_outcomes(records: Sequence[tuple[Record, int, int]], instruments: Sequence[Instrument],
                      partitions: int, keys: dict[str, bytes], max_message_bytes: int) -> list[Any]:
    """What the daemon's router decides for each produced ``(record, partition, offset)``, in that order."""
    specs = {s.symbol: s for s in instruments}
    router = Router(specs, verifier=Verifier(keys), partitions={s: partition_for(s, partitions) for s in specs},
                    max_message_bytes=max_message_bytes)
    return [router.route(r.value, r.timestamp_ms * 1_000_000, key=r.key, partition=p) for r, p, _ in records]
