"""A seeded order flow in wire format, for tests, benchmarks and the demo.

``OrderFlow(instruments, seed).messages(n)`` yields ``n`` wire commands (dicts
ready for JSON) over several instruments: limit orders around a drifting mid
(some crossing), cancels and amends of earlier orders, market and IOC
orders that sweep levels, FOK, GTD and post-only orders, cancel-all,
resubmissions of earlier orders (duplicate client order ids) and, rarely,
malformed input. Every message carries ``ts_ns`` in whole milliseconds (what a Kafka
timestamp can hold), strictly increasing. The same seed gives the same flow.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from exchange.core.instruments import Instrument

__all__ = ["OrderFlow"]


class OrderFlow:
    def __init__(
        self,
        instruments: Sequence[Instrument],
        seed: int,
        *,
        clients: int = 20,
        start_ts_ns: int = 1_700_000_000_000_000_000,
        malformed_every: int = 0,
        mid_ticks: int = 100_000,
    ) -> None:
        self._specs = list(instruments)
        self._rng = random.Random(seed)
        self._clients = [f"client-{i}" for i in range(clients)]
        self._ts_ms = start_ts_ns // 1_000_000
        self._mid = {spec.symbol: mid_ticks for spec in self._specs}
        self._recent: dict[str, list[tuple[str, str]]] = {spec.symbol: [] for spec in self._specs}
        self._n = 0
        self._malformed_every = malformed_every
        self._placed: list[dict[str, Any]] = []  # earlier place messages, resubmitted now and then

    def messages(self, count: int) -> Iterator[dict[str, Any]]:
        for _ in range(count):
            yield self.next()

    def next(self) -> dict[str, Any]:
        rng = self._rng
        self._n += 1
        self._ts_ms += rng.randint(0, 2)
        ts_ns = self._ts_ms * 1_000_000
        if self._malformed_every and self._n % self._malformed_every == 0:
            return {
                "op": "place",
                "instrument": "NOPE-USD",
                "client_id": rng.choice(self._clients),
                "client_order_id": f"x{self._n}",
                "side": "buy",
                "price": "1",
                "qty": "1",
                "ts_ns": ts_ns,
            }
        spec = rng.choice(self._specs)
        symbol = spec.symbol
        if rng.random() < 0.02:
            self._mid[symbol] += rng.choice((-5, -3, -1, 1, 3, 5))
        mid = self._mid[symbol]
        client = rng.choice(self._clients)
        recent = self._recent[symbol]
        r = rng.random()
        base: dict[str, Any] = {"instrument": symbol, "client_id": client, "ts_ns": ts_ns}
        if r < 0.22 and recent:
            owner, coid = recent[rng.randrange(len(recent))]
            return {**base, "op": "cancel", "client_id": owner, "client_order_id": coid}
        if r < 0.27 and recent:
            owner, coid = recent[rng.randrange(len(recent))]
            msg = {**base, "op": "amend", "client_id": owner, "client_order_id": coid}
            if rng.random() < 0.5:
                msg["qty"] = spec.lots_to_qty(rng.randint(spec.min_qty_lots, spec.min_qty_lots * 40))
            else:
                msg["price"] = spec.ticks_to_price(mid + rng.randint(-20, 20))
            return msg
        if r < 0.275:
            return {**base, "op": "cancel_all"}
        if r < 0.28 and self._placed:  # a producer retry: the same order again, later
            return {**self._placed[rng.randrange(len(self._placed))], "ts_ns": ts_ns}
        side = rng.choice(("buy", "sell"))
        sign = 1 if side == "buy" else -1
        coid = f"o{self._n}"
        qty = spec.lots_to_qty(rng.randint(spec.min_qty_lots, spec.min_qty_lots * 50))
        msg = {**base, "op": "place", "client_order_id": coid, "side": side, "qty": qty}
        if r < 0.30:
            msg.update(type="market", tif=rng.choice(("IOC", "IOC", "FOK")))
        elif r < 0.34:
            msg.update(price=spec.ticks_to_price(mid + sign * rng.randint(0, 10)), tif=rng.choice(("IOC", "FOK")))
        else:
            offset = rng.randint(-3, 30)
            msg["price"] = spec.ticks_to_price(max(1, mid - sign * offset))
            roll = rng.random()
            if roll < 0.05:
                msg["post_only"] = True
            elif roll < 0.10:
                msg.update(tif="GTD", expire_ns=ts_ns + rng.randint(1, 2000) * 1_000_000)
            if rng.random() < 0.2:
                msg["stp"] = rng.choice(("none", "cancel_resting", "cancel_incoming", "cancel_both"))
            recent.append((client, coid))
            if len(recent) > 400:
                del recent[: len(recent) - 400]
        self._placed.append(msg)
        if len(self._placed) > 1000:
            del self._placed[:500]
        return msg
