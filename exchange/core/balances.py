"""Balances inside the single writer: reserve when an order is accepted, settle fills, release when done.

An instrument with ``balances`` keeps, for every client, an available and a reserved amount of its
base asset (in lots) and of its quote asset (in quote units of tick x lot: a trade of ``q`` lots at
``p`` ticks has a notional of exactly ``p * q`` quote units). Money enters and leaves only through
deposits and withdrawals on the instrument's own ordered stream, so the engine, the one writer of its
book, is also the one writer of these balances: reservation, settlement and release need no lock,
and a replay of the same input gives the same balances. :class:`Ledger` holds them; the engine
(:mod:`exchange.core.matching`) calls it at each step.

The rules, integers throughout:

- **Fees** are basis points of a fill's notional, in the quote asset, on both sides: the buyer pays
  the notional plus its fee, the seller receives the notional minus its fee. A fee is rounded up to a
  whole quote unit, in the venue's favour (``ceil``; a maker rebate, a negative maker fee, is thereby
  rounded towards zero), and goes to the venue's fees account (client ``""`` in the events).
- **Reserve on accept.** A sell holds its quantity of base. A buy holds, per lot, its limit price plus
  the largest fee one lot of it could pay, ``rate = price + ceil(price * bps / 10000)`` with ``bps`` the
  larger of the maker and the taker fee (none when both are rebates). Fees are rounded per fill and
  ``ceil(q * x) <= q * ceil(x)``, so no fill of ``q`` lots at the limit or better ever costs more than
  ``q * rate``: the reservation always covers the fill, however the order fills. A market buy holds the
  budget it names (``funds``), or else its quantity at the rate of its price-band limit.
- **Settle at the maker's price.** A fill of ``q`` lots at ``p``: the buyer's reservation gives up
  ``q * rate`` (a budget gives up exactly what the fill costs), of which ``p * q + fee`` is spent and the
  rest -- price improvement, the fee reserve a lot did not need -- is available again at once; the buyer
  receives ``q`` lots; the seller gives ``q`` reserved lots and receives ``p * q - fee``.
- **Release when done.** What an order still holds when it ends (canceled, expired, an IOC or FOK
  remainder, self-trade prevention, a clear) is available again; an amend holds the difference (or is
  refused ``insufficient_funds``, leaving the order as it was) or releases it.

Invariants, after every command: no balance is negative; per asset, deposits minus withdrawals equal
every client's available plus reserved plus the fees account; each client's reserved amounts equal
what its open orders hold (``remaining * rate`` of each).

No I/O, no clock, no randomness: this module is part of the pure core.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from exchange.core.events import Balance
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState

__all__ = ["FEES_ACCOUNT", "Ledger", "ceil_bps", "digest", "refused", "summarize", "transfer_summary",
           "transferred"]

_MOD = 2**128
FEES_ACCOUNT = ""  # the venue's fees account in events and storage (a client id is never empty)
_BPS = 10_000
# an account: [base available, base reserved, quote available, quote reserved]
BASE_AVAILABLE, BASE_RESERVED, QUOTE_AVAILABLE, QUOTE_RESERVED = 0, 1, 2, 3


def ceil_bps(amount: int, bps: int) -> int:
    """``amount * bps / 10000`` rounded up to a whole unit (towards zero for a negative rate)."""
    return -((-amount * bps) // _BPS)


def transferred(kind: str, amount: str, asset: str, client: str, seq: int) -> str:
    """What a repeat of an applied transfer is told (``kind``: deposited, withdrawn)."""
    return f"{kind} {amount} {asset} for {client} at seq {seq}"


def refused(seq: int, reason: str, text: str) -> str:
    """What a repeat of a refused transfer is told."""
    return f"refused at seq {seq}: {reason} ({text})"


def _transfer_hash(transfer_id: str, outcome: str) -> int:
    return int.from_bytes(hashlib.blake2b(b"%s\x00%s" % (transfer_id.encode(), outcome.encode()),
                                          digest_size=16).digest(), "big")


def summarize(transfers: Iterable[tuple[str, str]]) -> tuple[int, int]:
    """``(count, sum)`` of remembered transfers: how many, and the sum modulo 2^128 of a hash of each
    ``(transfer_id, outcome)``. Order-independent and updated in O(1) per transfer, it stands for the
    transfers in the state hash and in a snapshot, which leaves the list out."""
    count = total = 0
    for transfer_id, outcome in transfers:
        count += 1
        total += _transfer_hash(transfer_id, outcome)
    return count, total % _MOD


def transfer_summary(state: EngineState) -> tuple[int, int]:
    """A state's :func:`summarize`: of its list when complete, else the totals it carries."""
    if state.transfers_complete:
        return summarize(state.transfers)
    return state.transfers_count, state.transfers_sum


class Ledger:
    """One instrument's balances (see the module docstring). ``accounts`` holds a client only while one of its
    four amounts is not zero; ``transfers`` remembers every transfer id the engine decided on, with what a
    repeat is told."""

    __slots__ = ("accounts", "base", "fees", "maker_bps", "quote", "reserve_bps", "taker_bps", "transfers",
                 "transfers_sum")

    def __init__(self, spec: Instrument) -> None:
        self.base = spec.base_asset
        self.quote = spec.quote_asset
        self.maker_bps = spec.maker_fee_bps
        self.taker_bps = spec.taker_fee_bps
        self.reserve_bps = max(spec.maker_fee_bps, spec.taker_fee_bps, 0)
        self.accounts: dict[str, list[int]] = {}
        self.fees = 0  # quote units: fees taken minus rebates paid
        self.transfers: dict[str, str] = {}
        self.transfers_sum = 0  # summarize(self.transfers.items())[1], kept up to date by remember()

    # ---------------------------------------------------------------- what orders hold

    def rate(self, buy: bool, price: int) -> int:
        """What one lot of an order holds: a lot of base to sell; to buy at ``price``, quote units for the price
        and the largest fee the lot could pay."""
        return price + ceil_bps(price, self.reserve_bps) if buy else 1

    def affordable(self, budget: int, price: int) -> int:
        """The most lots a taker's ``budget`` buys at ``price``, its fees included."""
        lots = budget * _BPS // (price * (_BPS + self.taker_bps))  # at or above what the budget pays for
        while lots and price * lots + ceil_bps(price * lots, self.taker_bps) > budget:
            lots -= 1
        return lots

    # ---------------------------------------------------------------- accounts

    def available(self, client: str, buy: bool) -> int:
        """What ``client`` has available to place a buy (quote) or a sell (base)."""
        account = self.accounts.get(client)
        return account[QUOTE_AVAILABLE if buy else BASE_AVAILABLE] if account else 0

    def hold(self, client: str, buy: bool, amount: int) -> bool:
        """Move ``amount`` of quote (buy) or base (sell) from available to reserved; False if short."""
        if not amount:
            return True
        account = self.accounts.get(client)
        i = QUOTE_AVAILABLE if buy else BASE_AVAILABLE
        if account is None or account[i] < amount:
            return False
        account[i] -= amount
        account[i + 1] += amount
        return True

    def free(self, client: str, buy: bool, amount: int) -> None:
        """Move ``amount`` of quote (buy) or base (sell) from reserved back to available."""
        if amount:
            account = self.accounts[client]
            i = QUOTE_AVAILABLE if buy else BASE_AVAILABLE
            account[i + 1] -= amount
            account[i] += amount

    def fill(self, buyer: str, seller: str, price: int, lots: int, buyer_rate: int, maker_buys: bool
             ) -> tuple[int, int, list[Balance]]:
        """Settle one fill of ``lots`` at ``price`` (the maker's); ``buyer_rate`` is what each lot of the buy
        holds (0: a budget, which gives up exactly what the fill costs). Returns ``(maker_fee, taker_fee,
        balances)``: every balance the fill changed, both assets of the buyer and of the seller, then the fees
        account. (The hot path: the fees are :func:`ceil_bps` written out.)"""
        notional = price * lots
        maker_fee = -((-notional * self.maker_bps) // _BPS)
        taker_fee = -((-notional * self.taker_bps) // _BPS)
        accounts = self.accounts
        b = accounts[buyer]
        s = accounts[seller]  # (both hold something: the buy's quote and the sell's base are reserved)
        if maker_buys:
            cost = notional + maker_fee
            s[QUOTE_AVAILABLE] += notional - taker_fee
        else:
            cost = notional + taker_fee
            s[QUOTE_AVAILABLE] += notional - maker_fee
        s[BASE_RESERVED] -= lots
        if buyer_rate:
            held = lots * buyer_rate
            b[QUOTE_RESERVED] -= held
            b[QUOTE_AVAILABLE] += held - cost
        else:
            b[QUOTE_RESERVED] -= cost
        b[BASE_AVAILABLE] += lots
        fees = self.fees = self.fees + maker_fee + taker_fee
        base, quote = self.base, self.quote
        if b is s:
            return maker_fee, taker_fee, [(buyer, base, b[0], b[1]), (buyer, quote, b[2], b[3]),
                                          (FEES_ACCOUNT, quote, fees, 0)]
        return maker_fee, taker_fee, [(buyer, base, b[0], b[1]), (buyer, quote, b[2], b[3]),
                                      (seller, base, s[0], s[1]), (seller, quote, s[2], s[3]),
                                      (FEES_ACCOUNT, quote, fees, 0)]

    def deposit(self, client: str, base: bool, amount: int) -> None:
        account = self.accounts.get(client)
        if account is None:
            account = self.accounts[client] = [0, 0, 0, 0]
        account[BASE_AVAILABLE if base else QUOTE_AVAILABLE] += amount

    def withdraw(self, client: str, base: bool, amount: int) -> bool:
        """Take ``amount`` from the available balance; False (nothing changes) if it is short."""
        account = self.accounts.get(client)
        i = BASE_AVAILABLE if base else QUOTE_AVAILABLE
        if account is None or account[i] < amount:
            return False
        account[i] -= amount
        self._tidy(client, account)
        return True

    def _tidy(self, client: str, account: list[int]) -> None:
        if not any(account):
            del self.accounts[client]

    # ---------------------------------------------------------------- what events say

    def balances(self, client: str, buy: bool) -> list[Balance]:
        """``client``'s resulting balance of the quote (buy) or base (sell) asset, as events carry it."""
        account = self.accounts.get(client) or [0, 0, 0, 0]
        if buy:
            return [(client, self.quote, account[QUOTE_AVAILABLE], account[QUOTE_RESERVED])]
        return [(client, self.base, account[BASE_AVAILABLE], account[BASE_RESERVED])]

    def settled(self, clients: Iterable[str]) -> None:
        """Drop the accounts of ``clients`` that hold nothing any more."""
        accounts = self.accounts
        for client in clients:
            account = accounts.get(client)
            if account is not None and not any(account):
                del accounts[client]

    # ---------------------------------------------------------------- the engine image

    def remember(self, transfer_id: str, outcome: str) -> None:
        """Remember a transfer id the engine decided on, with what a repeat of it is told."""
        self.transfers[transfer_id] = outcome
        self.transfers_sum = (self.transfers_sum + _transfer_hash(transfer_id, outcome)) % _MOD

    def accounts_image(self) -> list[tuple[str, int, int, int, int]]:
        """The accounts sorted by client, as :class:`~exchange.core.state.EngineState` stores them."""
        return [(c, a[0], a[1], a[2], a[3]) for c, a in sorted(self.accounts.items()) if any(a)]

    def image(self) -> tuple[list[tuple[str, int, int, int, int]], int, list[tuple[str, str]]]:
        """``(accounts, fees, transfers)`` sorted, as :class:`~exchange.core.state.EngineState` stores them."""
        return self.accounts_image(), self.fees, sorted(self.transfers.items())

    def restore(self, accounts: Iterable[tuple[str, int, int, int, int]], fees: int,
                transfers: Iterable[tuple[str, str]]) -> None:
        self.accounts = {client: [ba, br, qa, qr] for client, ba, br, qa, qr in accounts if ba or br or qa or qr}
        self.fees = fees
        self.transfers = dict(transfers)
        self.transfers_sum = summarize(self.transfers.items())[1]

    def digest(self) -> bytes:
        """The balances as bytes for the state hash (see :func:`digest`)."""
        return digest(self.accounts_image(), self.fees, (len(self.transfers), self.transfers_sum))


def digest(accounts: Iterable[tuple[str, int, int, int, int]], fees: int, transfers: tuple[int, int]) -> bytes:
    """The balances, the fees account and the transfers' summary (:func:`summarize`) as bytes for the state hash:
    empty when nothing is held and no transfer was seen, so that an instrument without balances hashes as the
    bare book."""
    accounts = list(accounts)
    if not accounts and not fees and not transfers[0]:
        return b""
    parts = [b"F%d;T%d:%d;" % (fees, *transfers)]
    parts += [b"A%s:%d:%d:%d:%d;" % (c.encode(), ba, br, qa, qr) for c, ba, br, qa, qr in accounts]
    return b"".join(parts)
