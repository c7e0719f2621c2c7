"""A seeded order flow in wire format, for tests, benchmarks and the demo.

``OrderFlow(instruments, seed).messages(n)`` yields ``n`` wire commands (dicts
ready for JSON) over several instruments: limit orders around a drifting mid
(some crossing), cancels and amends of earlier orders, market and IOC
orders that sweep levels, FOK, GTD and post-only orders, cancel-all,
resubmissions of earlier orders (duplicate client order ids) and, rarely,
malformed input. Every message carries ``ts_ns`` in whole milliseconds (what a Kafka
timestamp can hold), strictly increasing. The same seed gives the same flow.

On an instrument that keeps balances the flow also moves money: a client's first message on
it is a deposit of the base asset, its second one of the quote asset (enough for a few dozen
orders), and now and then a top-up, a withdrawal or a transfer id sent again; market buys then
often state a budget (``funds``), always where the instrument has no price band. Deposits and
withdrawals are operator-grade: ``signer`` (e.g. :func:`exchange.wire.auth.sign` with a key)
signs them for a daemon that checks signatures.

With ``order_types`` (off by default: the flows of the benchmarks and tests that do not ask stay
what they were) some orders are stops and stop-limits whose stop price is a few ticks beyond the
mid (a move of the mid or a sweep triggers them; some are already reached: rejected), a stop buy
naming a budget on an instrument with balances, some passive limits are icebergs, and waiting stops
are canceled and amended (stop price, quantity) like the other orders.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
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
        signer: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        order_types: bool = False,
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
        self._signer = signer
        self._funded: set[tuple[str, str, str]] = set()  # (instrument, client, asset) deposited once
        self._transfers: list[dict[str, Any]] = []  # earlier transfers, sent again now and then
        self._order_types = order_types
        self._stops: dict[str, list[tuple[str, str]]] = {spec.symbol: [] for spec in self._specs}  # placed stops

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
        transfer = self._transfer(spec, base, mid)
        if transfer is not None:
            return transfer
        if r < 0.22 and recent:
            owner, coid = recent[rng.randrange(len(recent))]
            return {**base, "op": "cancel", "client_id": owner, "client_order_id": coid}
        if r < 0.27 and recent:
            return self._amend(spec, base, recent, mid)
        if r < 0.275:
            return {**base, "op": "cancel_all"}
        if r < 0.28 and self._placed:  # a producer retry: the same order again, later
            return {**self._placed[rng.randrange(len(self._placed))], "ts_ns": ts_ns}
        side = rng.choice(("buy", "sell"))
        sign = 1 if side == "buy" else -1
        coid = f"o{self._n}"
        qty = spec.lots_to_qty(rng.randint(spec.min_qty_lots, spec.min_qty_lots * 50))
        msg = {**base, "op": "place", "client_order_id": coid, "side": side, "qty": qty}
        typed = self._stop(spec, msg, mid, r)
        if typed is not None:
            return typed
        if r < 0.30:
            msg.update(type="market", tif=rng.choice(("IOC", "IOC", "FOK")))
            self._budget(spec, msg, mid)
        elif r < 0.34:
            msg.update(price=spec.ticks_to_price(mid + sign * rng.randint(0, 10)), tif=rng.choice(("IOC", "FOK")))
        else:
            self._limit(spec, msg, mid, sign)
        self._placed.append(msg)
        if len(self._placed) > 1000:
            del self._placed[:500]
        return msg

    def _limit(self, spec: Instrument, msg: dict[str, Any], mid: int, sign: int) -> None:
        """A limit order around the mid, most passive (some post-only or GTD, some with an STP mode; with
        ``order_types`` some passive ones icebergs), kept among the recent orders to cancel and amend."""
        rng = self._rng
        offset = rng.randint(-3, 30)
        msg["price"] = spec.ticks_to_price(max(1, mid - sign * offset))
        roll = rng.random()
        if roll < 0.05:
            msg["post_only"] = True
        elif roll < 0.10:
            msg.update(tif="GTD", expire_ns=msg["ts_ns"] + rng.randint(1, 2000) * 1_000_000)
        if rng.random() < 0.2:
            msg["stp"] = rng.choice(("none", "cancel_resting", "cancel_incoming", "cancel_both"))
        if self._order_types and offset > 0 and rng.random() < 0.1:  # a passive iceberg
            msg["display_qty"] = spec.lots_to_qty(rng.randint(spec.min_qty_lots, spec.qty_to_lots(msg["qty"])))
        recent = self._recent[spec.symbol]
        recent.append((msg["client_id"], msg["client_order_id"]))
        if len(recent) > 400:
            del recent[: len(recent) - 400]

    def _stop(self, spec: Instrument, msg: dict[str, Any], mid: int, r: float) -> dict[str, Any] | None:
        """In three draws in five (None otherwise): a stop or stop-limit order a few ticks beyond the mid, or
        (``r`` at the top of its range) an amend of an earlier one's stop price or quantity."""
        rng = self._rng
        if not self._order_types or r >= 0.30 or rng.random() >= 0.6:
            return None
        stops = self._stops[spec.symbol]
        if r >= 0.29 and stops:
            owner, coid = stops[rng.randrange(len(stops))]
            amend = {key: msg[key] for key in ("instrument", "ts_ns")}
            amend.update(op="amend", client_id=owner, client_order_id=coid)
            if rng.random() < 0.7:
                amend["stop_price"] = spec.ticks_to_price(max(1, mid + rng.randint(-12, 12)))
            else:
                amend["qty"] = spec.lots_to_qty(rng.randint(spec.min_qty_lots, spec.min_qty_lots * 40))
            return amend
        sign = 1 if msg["side"] == "buy" else -1
        stop = max(1, mid + sign * rng.randint(-1, 12))
        msg["stop_price"] = spec.ticks_to_price(stop)
        if rng.random() < 0.5:
            msg.update(type="stop", tif="GTC")
            if spec.balances and msg["side"] == "buy":
                lots = spec.qty_to_lots(msg["qty"])
                msg["funds"] = spec.units_to_amount(spec.quote_asset, lots * stop * rng.randint(90, 130) // 100 + 1)
        else:
            msg.update(type="stop_limit", price=spec.ticks_to_price(max(1, stop + sign * rng.randint(0, 4))),
                       tif=rng.choice(("GTC", "GTC", "IOC", "FOK")))
        if rng.random() < 0.15 and msg["tif"] == "GTC":
            msg.update(tif="GTD", expire_ns=msg["ts_ns"] + rng.randint(1, 5000) * 1_000_000)
        stops.append((msg["client_id"], msg["client_order_id"]))
        self._recent[spec.symbol].append((msg["client_id"], msg["client_order_id"]))  # (canceled like the others)
        if len(stops) > 200:
            del stops[:100]
        return msg

    def _amend(self, spec: Instrument, base: dict[str, Any], recent: list[tuple[str, str]], mid: int
               ) -> dict[str, Any]:
        rng = self._rng
        owner, coid = recent[rng.randrange(len(recent))]
        msg = {**base, "op": "amend", "client_id": owner, "client_order_id": coid}
        if rng.random() < 0.5:
            msg["qty"] = spec.lots_to_qty(rng.randint(spec.min_qty_lots, spec.min_qty_lots * 40))
        else:
            msg["price"] = spec.ticks_to_price(mid + rng.randint(-20, 20))
        return msg

    def _budget(self, spec: Instrument, msg: dict[str, Any], mid: int) -> None:
        """On an instrument with balances, most market buys name a budget; always where no price band bounds them."""
        if spec.balances and msg["side"] == "buy" and (not spec.price_band_bps or self._rng.random() < 0.5):
            lots = spec.qty_to_lots(msg["qty"])
            msg["funds"] = spec.units_to_amount(spec.quote_asset, lots * mid * self._rng.randint(50, 120) // 100 + 1)

    def _transfer(self, spec: Instrument, base: dict[str, Any], mid: int) -> dict[str, Any] | None:
        """A deposit or withdrawal on an instrument that keeps balances, or None for an order message."""
        if not spec.balances:
            return None
        rng = self._rng
        symbol, client = spec.symbol, base["client_id"]
        big = spec.min_qty_lots * 50 * 40  # lots: a few dozen of the flow's largest orders
        msg: dict[str, Any] | None = None
        for asset, units in ((spec.base_asset, big), (spec.quote_asset, big * mid)):
            if (symbol, client, asset) not in self._funded:
                self._funded.add((symbol, client, asset))
                msg = {**base, "op": "deposit", "asset": asset, "amount": spec.units_to_amount(asset, units)}
                break
        if msg is None:
            roll = rng.random()
            if roll < 0.004 and self._transfers:  # a funding service's retry: refused, never applied twice
                return self._signed({**self._transfers[rng.randrange(len(self._transfers))], "ts_ns": base["ts_ns"]})
            if roll >= 0.012:
                return None
            asset, units = rng.choice(((spec.base_asset, big), (spec.quote_asset, big * mid)))
            msg = {**base, "op": "deposit" if roll < 0.008 else "withdraw", "asset": asset,
                   "amount": spec.units_to_amount(asset, rng.randint(1, units // 4))}
        msg["transfer_id"] = f"tr-{self._n}"
        self._transfers.append(msg)
        if len(self._transfers) > 200:
            del self._transfers[:100]
        return self._signed(msg)

    def _signed(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self._signer(msg) if self._signer is not None else msg
