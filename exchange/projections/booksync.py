"""The subscriber's side of the market-data sync procedure (README "Market data"), without I/O.

:class:`BookSync` keeps one instrument's local level-2 book from the messages of
:mod:`exchange.projections.marketdata` and the book image in the Redis book key:

1. subscribe first, and hand every message to :meth:`BookSync.on_message`
   (while there is no book yet, ``l2`` messages and trades are buffered);
2. read the book key and hand it to :meth:`BookSync.on_book`: buffered ``l2``
   messages at or below its ``seq`` are dropped and the rest applied; if the first
   one left starts after the image (``prev_seq`` above its ``seq``) the image is
   older than the stream: read the key again a little later;
3. from then on an ``l2`` message at or below the local ``seq`` is a duplicate and
   is dropped; one whose ``prev_seq`` is above the local ``seq`` is a gap; a
   checksum that differs from the local book's, or a heartbeat whose ``seq`` is
   above the local ``seq``, is too. On a gap :meth:`on_message` returns
   ``RESYNC``: read the key again (step 2), keeping the subscription.

Right after an image, before any message has confirmed it, a message that starts after it (an ``l2``
``prev_seq`` or a heartbeat ``seq`` above the image's) says the image was older than the stream the
subscription joined (the key is rewritten at most every ``book_refresh_ms``; the messages between its
last write and the subscription were never ours to receive). That is not a gap: :meth:`on_message`
returns ``RESYNC`` without counting one, and counts a stale image instead.

Trades are deduplicated by ``trade_id`` (per instrument, +1 per trade); a jump
is counted as missed trades.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from sortedcontainers import SortedDict

from exchange.projections.marketdata import book_checksum

__all__ = ["OK", "RESYNC", "BookSync"]

OK = "ok"
RESYNC = "resync"

Level = tuple[str, str]


class BookSync:
    def __init__(self, instrument: str, *, trades_kept: int = 20) -> None:
        self.instrument = instrument
        self.seq: int | None = None  # None until synced from a book image
        self.depth = 0
        self.checksum_levels = 10
        self.last_trade_id: int | None = None
        self.bids: SortedDict[Decimal, Level] = SortedDict()  # -price -> (price, qty): best first
        self.asks: SortedDict[Decimal, Level] = SortedDict()
        self.trades: deque[dict[str, Any]] = deque(maxlen=trades_kept)
        self._pending: list[dict[str, Any]] = []  # l2 messages waiting for a book image
        self._pending_trades: list[dict[str, Any]] = []
        self.gaps = 0
        self.resyncs = 0
        self.duplicates = 0
        self.checksum_errors = 0
        self.missed_trades = 0
        self.stale_images = 0  # book images older than the first message after them: read again, no gap
        self.last_problem = ""
        self._unconfirmed = False  # an image is in place and no message has followed it yet

    @property
    def synced(self) -> bool:
        return self.seq is not None

    # ------------------------------------------------------------------ input

    def on_book(self, image: dict[str, Any]) -> bool:
        """Start from a book image; False if it is older than the buffered stream (read it again later)."""
        seq = int(image["seq"])
        pending = [m for m in self._pending if m["seq"] > seq]
        if pending and pending[0]["prev_seq"] > seq:
            return False
        self.bids.clear()
        self.asks.clear()
        self.depth = int(image.get("depth", 0))
        self.checksum_levels = min(10, self.depth) if self.depth else 10
        self._set(image["bids"], image["asks"])
        self.seq = seq
        last_trade = int(image.get("last_trade_id", 0))
        if self.last_trade_id is None or last_trade > self.last_trade_id:
            self.last_trade_id = last_trade
        self._pending = []
        for msg in pending:
            if self._apply_l2(msg) is RESYNC:
                return False
        trades, self._pending_trades = self._pending_trades, []
        for msg in trades:
            self._trades(msg)
        self._unconfirmed = not pending
        return True

    def on_message(self, msg: dict[str, Any]) -> str:
        """One pub/sub message (l2, trades, heartbeat; others are ignored). ``RESYNC``: read the key again."""
        kind = msg.get("type")
        if kind == "l2":
            if self.seq is None:
                self._pending.append(msg)
                return OK
            return self._apply_l2(msg)
        if kind == "trades":
            if self.seq is None:
                self._pending_trades.append(msg)
            else:
                self._trades(msg)
            return OK
        if kind == "heartbeat" and self.seq is not None:
            if msg["seq"] > self.seq:
                return self._gap(f"heartbeat at seq {msg['seq']} but the local book is at seq {self.seq}")
            self._unconfirmed = False
        return OK

    def lost(self, why: str) -> None:
        """The subscription broke (say, Redis restarted): everything until the next image is suspect."""
        self.resyncs += 1
        self.last_problem = why
        self.seq = None
        self._pending = []
        self._unconfirmed = False

    # ------------------------------------------------------------------ output

    def levels(self, buy: bool, depth: int = 0) -> list[Level]:
        side = self.bids if buy else self.asks
        values: Iterable[Level] = side.values()
        out = list(values)
        return out[:depth] if depth else out

    def checksum(self) -> int:
        n = self.checksum_levels
        return book_checksum(self.levels(True, n), self.levels(False, n), n)

    # --------------------------------------------------------------- internals

    def _apply_l2(self, msg: dict[str, Any]) -> str:
        assert self.seq is not None
        if msg["seq"] <= self.seq:
            self.duplicates += 1
            return OK
        if msg["prev_seq"] > self.seq:
            action = self._gap(f"l2 message covers seq {msg['prev_seq'] + 1}-{msg['seq']} but the local book is "
                               f"at seq {self.seq}")
            self._pending.append(msg)  # a fresher image may still let it apply
            return action
        self._unconfirmed = False
        self._set(msg["bids"], msg["asks"])
        self.seq = msg["seq"]
        if self.checksum() != msg["checksum"]:
            self.checksum_errors += 1
            return self._gap(f"checksum differs at seq {self.seq}")
        return OK

    def _gap(self, why: str) -> str:
        if self._unconfirmed:  # the image was older than the stream: read the key again, no gap
            self.stale_images += 1
            self.seq = None
            self._unconfirmed = False
            return RESYNC
        self.gaps += 1
        self.lost(why)
        return RESYNC

    def _set(self, bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]]) -> None:
        for levels, side, sign in ((bids, self.bids, -1), (asks, self.asks, 1)):
            for price, qty in levels:
                key = Decimal(price) * sign
                if Decimal(qty):
                    side[key] = (price, qty)
                else:
                    side.pop(key, None)
            if self.depth:
                while len(side) > self.depth:
                    side.popitem(-1)

    def _trades(self, msg: dict[str, Any]) -> None:
        for trade in msg["trades"]:
            tid = trade["trade_id"]
            if self.last_trade_id is not None and tid <= self.last_trade_id:
                continue
            if self.last_trade_id is not None and tid > self.last_trade_id + 1:
                self.missed_trades += tid - self.last_trade_id - 1
            self.last_trade_id = tid
            self.trades.append(trade)
