"""The wire format: JSON commands in, JSON events out, decimals as strings.

This is the edge where decimal text meets the integer core. Decoding checks
every field and converts prices and quantities through the instrument
(:mod:`exchange.core.instruments`); encoding turns ``*_ticks`` and ``*_lots`` fields
back into decimal strings named without the suffix.

Decoding outcomes:

- a :class:`~exchange.core.commands.Command` ready for the engine;
- a :class:`~exchange.core.commands.RejectInput` when the sender and instrument are
  known but a field is wrong (off-grid price, bad side, ...): the engine turns
  it into a sequenced ``rejected`` event, so the sender hears back in order;
- a :class:`WireError` when the message cannot be understood well enough to
  know whom to answer (not JSON, no ``op``, no ``client_id``): the daemon sends
  it to the dead-letter topic, the replay tool prints an error line.

Everything that reaches the store is checked here against what the store can hold: every
identifier (instrument, client id, client order id) is a string of 1-64 characters with no control
character (NUL included: PostgreSQL text and jsonb refuse it), an operator's note at most 200
characters without NUL, every integer fits a signed 64-bit column (``order_id`` below 2^63), and
every time (``ts_ns``, ``expire_ns``) lies between 1970 and 2100 in nanoseconds. A text that explains
a refusal quotes at most a short prefix of the offending value (:func:`quote`), so a huge value never
makes a huge rejection. Which messages reach which instrument, and everything else the daemon's edge
decides, is :mod:`exchange.pipeline.router`.

msgspec does the JSON work: it parses into plain dicts and encodes structs
several times faster than the standard library, and the same library gives
the core its cheap immutable structs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from exchange.core.commands import (
    AmendOrder,
    CancelAll,
    CancelOrder,
    ClearBook,
    Command,
    Deposit,
    HaltInstrument,
    PlaceOrder,
    RejectInput,
    ResumeInstrument,
    Withdraw,
)
from exchange.core.events import Event
from exchange.core.instruments import ConversionError, Instrument
from exchange.core.types import OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = ["MAX_ID_LEN", "MAX_TEXT_LEN", "MAX_TS_NS", "OPS", "WireEncoder", "WireError", "decode_command", "encode",
           "encode_event", "event_to_wire", "identity", "message_ts_ns", "parse_json", "quote", "valid_identifier"]

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

OPS = ("place", "cancel", "amend", "cancel_all", "clear", "halt", "resume", "deposit", "withdraw")
MAX_ID_LEN = 64  # characters of an instrument, client id or client order id
MAX_TEXT_LEN = 200  # characters of an operator's note
INT64_MAX = 2**63 - 1  # every integer the store holds is a signed 64-bit column
MAX_TS_NS = 4_102_444_800 * 10**9  # 2100-01-01T00:00:00Z: the latest input time or expiry accepted
_QUOTE_LEN = 40  # characters of an offending value quoted in a text


def quote(value: object, limit: int = _QUOTE_LEN) -> str:
    """``repr(value)`` for a rejection text, at most about ``limit`` characters (hostile input can be huge)."""
    if isinstance(value, str):
        if len(value) > limit:
            return repr(value[:limit]) + f"... ({len(value)} characters)"
        return repr(value)
    if isinstance(value, int | float | bool) or value is None:
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} digits)"
    return f"a JSON {_json_kind(value)}"


def _json_kind(value: object) -> str:
    kinds: dict[type[Any], str] = {dict: "object", list: "array"}
    return kinds.get(type(value), type(value).__name__)


def valid_identifier(value: object) -> bool:
    """A string of 1-64 characters with no ASCII control character (NUL included): what the store can key on."""
    return _ident({"v": value}, "v") is not None


class WireError(ValueError):
    """A message that cannot become a command. Carries whatever identity could be read, and a reason code."""

    def __init__(self, text: str, *, client_id: str | None = None, client_order_id: str | None = None,
                 instrument: str | None = None, reason: RejectReason = RejectReason.MALFORMED) -> None:
        super().__init__(text)
        self.text = text
        self.client_id = client_id
        self.client_order_id = client_order_id
        self.instrument = instrument
        self.reason = reason

    def to_wire(self) -> dict[str, Any]:
        return {"reason": self.reason.value, "text": self.text, "client_id": self.client_id,
                "client_order_id": self.client_order_id, "instrument": self.instrument}


class _FieldError(Exception):
    def __init__(self, reason: RejectReason, text: str) -> None:
        self.reason = reason
        self.text = text


def parse_json(data: bytes | str) -> dict[str, Any]:
    """Parse one JSON object; :class:`WireError` if it is not one (nesting too deep included)."""
    try:
        obj = _decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise WireError(f"not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise WireError("not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise WireError(f"expected a JSON object, got a JSON {_json_kind(obj)}")
    return obj


def message_ts_ns(msg: Mapping[str, Any], default: int = 0) -> int:
    """The message's own ``ts_ns`` (``default`` when it has none); :class:`WireError` if it is not a time
    between 1970 and 2100 in nanoseconds."""
    raw = msg.get("ts_ns", default)
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw <= MAX_TS_NS:
        raise WireError(f"ts_ns must be an integer time in nanoseconds between 0 and {MAX_TS_NS} (the year 2100); "
                        f"got {quote(raw)}", reason=RejectReason.INVALID_TIMESTAMP,
                        client_id=_ident(msg, "client_id"), client_order_id=_ident(msg, "client_order_id"),
                        instrument=_ident(msg, "instrument"))
    return raw


def identity(msg: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """``(client_id, client_order_id, instrument)`` where each is a valid identifier, else None."""
    return _ident(msg, "client_id"), _ident(msg, "client_order_id"), _ident(msg, "instrument")


def decode_command(data: bytes | str | dict[str, Any], instruments: Mapping[str, Instrument],
                   ts_ns: int | None = None) -> Command:
    """Turn one wire message into a command (see the module docstring for the outcomes).

    ``ts_ns`` is the input timestamp (the daemon passes the Kafka message time);
    when it is None the message's own ``ts_ns`` field is used, else 0.
    """
    msg = data if isinstance(data, dict) else parse_json(data)
    op = msg.get("op")
    client_id, client_order_id, instrument = identity(msg)
    if "instrument" in msg and msg["instrument"] is not None and instrument is None:
        raise WireError(f"instrument must be a string of 1-{MAX_ID_LEN} characters without control characters; "
                        f"got {quote(msg['instrument'])}", client_id=client_id, client_order_id=client_order_id)
    if ts_ns is None:
        ts_ns = message_ts_ns(msg)
    if op not in OPS:
        raise WireError(f"op must be one of {', '.join(OPS)}; got {quote(op)}", client_id=client_id,
                        client_order_id=client_order_id, instrument=instrument)
    return decode_fields(msg, op, client_id, client_order_id, instrument, instruments, ts_ns)


def decode_fields(msg: Mapping[str, Any], op: str, client_id: str | None, client_order_id: str | None,
                  instrument: str | None, instruments: Mapping[str, Instrument], ts_ns: int) -> Command:
    """:func:`decode_command` once ``op`` is one of :data:`OPS`, the identity is read (:func:`identity`) and
    the time known: for a caller that has done that already (the router)."""
    if op == "cancel_all":
        if client_id is None:
            raise WireError(_NO_CLIENT, client_order_id=client_order_id, instrument=instrument)
        return CancelAll(client_id, instrument, ts_ns)
    if instrument is None:
        raise WireError(f"{op} needs an instrument", client_id=client_id, client_order_id=client_order_id,
                        reason=RejectReason.INSTRUMENT_REQUIRED)
    if op in ("clear", "halt", "resume"):  # operator actions: client_id names the operator
        if op != "clear" and client_id is None:
            raise WireError(_NO_CLIENT.replace("client_id", "client_id (the operator)"), instrument=instrument)
        if "client_id" in msg and client_id is None:
            raise WireError(_NO_CLIENT.replace("client_id", "client_id (the operator)"), instrument=instrument)
        text = msg.get("text", "")
        if not isinstance(text, str) or len(text) > MAX_TEXT_LEN or "\x00" in text:
            raise WireError(f"text must be a string of at most {MAX_TEXT_LEN} characters without NUL",
                            client_id=client_id, instrument=instrument)
        if op == "clear":
            return ClearBook(instrument, ts_ns, client_id=client_id or "", text=text)
        return (HaltInstrument if op == "halt" else ResumeInstrument)(instrument, client_id or "", text, ts_ns)
    if client_id is None:
        raise WireError(_NO_CLIENT, client_order_id=client_order_id, instrument=instrument)
    spec = instruments.get(instrument)
    if spec is None:
        # The engine layer answers this one (seq 0, unknown_instrument); no spec to convert with.
        return RejectInput(instrument, client_id, client_order_id, RejectReason.UNKNOWN_INSTRUMENT,
                           f"unknown instrument {quote(instrument)}", op, ts_ns)
    try:
        if "client_order_id" in msg and client_order_id is None:
            raise _FieldError(RejectReason.MALFORMED, f"client_order_id must be a string of 1-{MAX_ID_LEN} "
                              f"characters without control characters; got {quote(msg['client_order_id'])}")
        if op == "place":
            return _place(msg, spec, client_id, client_order_id, ts_ns)
        if op in ("deposit", "withdraw"):
            return _transfer(op, msg, spec, client_id, ts_ns)
        return _cancel_or_amend(op, msg, spec, client_id, client_order_id, ts_ns)
    except (_FieldError, ConversionError) as exc:
        return RejectInput(instrument, client_id, client_order_id, exc.reason, exc.text, op, ts_ns)


_NO_CLIENT = f"client_id is missing or not a string of 1-{MAX_ID_LEN} characters without control characters"


def _ident(msg: Mapping[str, Any], key: str) -> str | None:
    """``msg[key]`` if it is a valid identifier (:func:`valid_identifier`), else None."""
    value = msg.get(key)
    if value.__class__ is str and 0 < len(value) <= MAX_ID_LEN and (value.isprintable() or _no_controls(value)):
        return value
    return None


def _no_controls(value: str) -> bool:
    return not any(c < " " or c == "\x7f" for c in value)


_MEMBERS: dict[type[Any], dict[Any, Any]] = {
    enum: {m.value: m for m in enum} for enum in (Side, OrderType, TimeInForce, StpMode)}


def _enum(msg: Mapping[str, Any], key: str, enum: type[Any], default: Any) -> Any:
    value = msg.get(key)
    if value is None:
        return default
    members = _MEMBERS[enum]  # a dict lookup: calling the Enum class costs a microsecond
    member = members.get(value) if isinstance(value, str) else None
    if member is None:
        choices = ", ".join(members)
        raise _FieldError(RejectReason.MALFORMED, f"{key} must be one of {choices}; got {quote(value)}")
    return member


def _place(msg: Mapping[str, Any], spec: Instrument, client_id: str, client_order_id: str | None,
           ts_ns: int) -> Command:
    if client_order_id is None:
        raise _FieldError(RejectReason.MALFORMED, f"client_order_id is missing or not a string of 1-{MAX_ID_LEN} "
                          "characters without control characters")
    if "side" not in msg:
        raise _FieldError(RejectReason.MALFORMED, "side is missing (buy or sell)")
    side = _enum(msg, "side", Side, None)
    order_type = _enum(msg, "type", OrderType, OrderType.LIMIT)
    market = order_type is OrderType.MARKET
    tif = _enum(msg, "tif", TimeInForce, TimeInForce.IOC if market else TimeInForce.GTC)
    stp = _enum(msg, "stp", StpMode, None)
    post_only = msg.get("post_only", False)
    if not isinstance(post_only, bool):
        raise _FieldError(RejectReason.MALFORMED, "post_only must be true or false")
    expire_ns = msg.get("expire_ns", 0) or 0
    if not isinstance(expire_ns, int) or isinstance(expire_ns, bool) or not 0 <= expire_ns <= MAX_TS_NS:
        raise _FieldError(RejectReason.INVALID_EXPIRY, f"expire_ns must be an integer time in nanoseconds between 0 "
                          f"and {MAX_TS_NS} (the year 2100); got {quote(expire_ns)}")
    stop = order_type is OrderType.STOP
    if market or stop:
        if msg.get("price") is not None:
            raise _FieldError(RejectReason.INVALID_PRICE, "market orders take no price" if market else
                              "stop orders take no price (triggered, one trades as a market order): use stop_limit")
        price = 0
    else:
        price = spec.price_to_ticks(msg.get("price"))
    qty = spec.qty_to_lots(msg.get("qty"))
    # a stop price on a limit order, or a display quantity on a stop, is on the grid here and refused by the core
    stop_price = 0
    if stop or order_type is OrderType.STOP_LIMIT or msg.get("stop_price") is not None:
        stop_price = _named(spec.price_to_ticks, msg.get("stop_price"), "price", "stop_price")
    display = 0 if msg.get("display_qty") is None else _named(spec.qty_to_lots, msg["display_qty"], "quantity",
                                                               "display_qty")
    funds = 0
    if msg.get("funds") is not None:
        if not (spec.balances and (market or stop) and side is Side.BUY):
            raise _FieldError(RejectReason.INVALID_ORDER, "funds (a budget in the quote asset) is for market and "
                              "stop buys on an instrument that keeps balances")
        funds = spec.amount_to_units(spec.quote_asset, msg["funds"])
    return PlaceOrder(spec.symbol, client_id, client_order_id, side, order_type, price, qty, tif, ts_ns,
                      post_only, stp, expire_ns, funds, stop_price, display)


def _named(convert: Callable[[object], int], value: object, what: str, name: str) -> int:
    """``convert(value)`` (a price or quantity on the instrument's grid), with a refusal's text naming the field
    ``name`` instead of the ``what`` the instrument names (``stop_price 1.001 is not a multiple of 0.01``)."""
    try:
        return convert(value)
    except ConversionError as exc:
        raise ConversionError(exc.reason, name + exc.text[len(what):] if exc.text.startswith(what) else exc.text
                              ) from None


def _transfer(op: str, msg: Mapping[str, Any], spec: Instrument, client_id: str, ts_ns: int) -> Command:
    """A deposit or withdrawal: ``asset`` (the instrument's base or quote asset), ``amount`` (a decimal on
    that asset's grid) and ``transfer_id`` (what makes it idempotent) for the account ``client_id``."""
    transfer_id = _ident(msg, "transfer_id")
    try:
        if transfer_id is None:
            raise _FieldError(RejectReason.MALFORMED, f"transfer_id is missing or not a string of 1-{MAX_ID_LEN} "
                              f"characters without control characters (it makes a {op} happen once)")
        if not spec.balances:
            raise _FieldError(RejectReason.BALANCES_DISABLED, f"{spec.symbol} keeps no balances "
                              "([risk] balances = false)")
        asset = _ident(msg, "asset")
        if asset is None:
            raise _FieldError(RejectReason.UNKNOWN_ASSET, f"asset is missing or not a string: {spec.base_asset} "
                              f"or {spec.quote_asset}")
        amount = spec.amount_to_units(asset, msg.get("amount"))
    except (_FieldError, ConversionError) as exc:
        return RejectInput(spec.symbol, client_id, None, exc.reason, exc.text, op, ts_ns, transfer_id or "")
    return (Deposit if op == "deposit" else Withdraw)(spec.symbol, client_id, asset, amount, transfer_id, ts_ns)


def _order_id(msg: Mapping[str, Any]) -> int | None:
    value = msg.get("order_id")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= INT64_MAX:
        raise _FieldError(RejectReason.MALFORMED, f"order_id must be a positive integer below 2^63; got {quote(value)}")
    return value


def _cancel_or_amend(op: str, msg: Mapping[str, Any], spec: Instrument, client_id: str,
                     client_order_id: str | None, ts_ns: int) -> Command:
    order_id = _order_id(msg)
    if client_order_id is None and order_id is None:
        raise _FieldError(RejectReason.MALFORMED, f"{op} needs client_order_id or order_id")
    if op == "cancel":
        return CancelOrder(spec.symbol, client_id, client_order_id, order_id, ts_ns)
    price = None if msg.get("price") is None else spec.price_to_ticks(msg["price"])
    qty = None if msg.get("qty") is None else spec.qty_to_lots(msg["qty"])
    stop_price = None if msg.get("stop_price") is None else _named(spec.price_to_ticks, msg["stop_price"], "price",
                                                                   "stop_price")
    if price is None and qty is None and stop_price is None:
        raise _FieldError(RejectReason.INVALID_AMEND, "amend needs a new price, stop_price or qty")
    return AmendOrder(spec.symbol, client_id, client_order_id, order_id, price, qty, ts_ns, stop_price)


# ------------------------------------------------------------------ events out

_PLANS: dict[type[Any], tuple[tuple[str, str, str], ...]] = {}

# Balance fields (:mod:`exchange.core.events`) and the asset their units are in: "side" the order's (base
# lots to sell, quote units to buy), "quote" the quote asset, "asset" the event's own ``asset``.
_MONEY = {"reserved": "side", "released": "side", "funds": "quote", "maker_fee": "quote", "taker_fee": "quote",
          "amount": "asset", "balances": "balances"}
_SOMETIMES = frozenset({"funds", "transfer_id"})  # on the wire only when set, on any instrument


def _plan(cls: type[Any]) -> tuple[tuple[str, str, str], ...]:
    """``(field, wire name, kind)`` of every field of an event class; kind "price", "qty", "price?" or "qty?"
    (one with a default of 0, such as an ``accepted`` event's ``stop_price``: on the wire only when set, so
    the events of orders that do not use it encode as before), a balance kind (see ``_MONEY``), "sometimes"
    (:data:`_SOMETIMES`) or "" (as it is)."""
    plan = _PLANS.get(cls)
    if plan is None:
        fields = []
        for f in msgspec.structs.fields(cls):
            optional = "?" if f.default is not msgspec.NODEFAULT and f.default == 0 else ""
            if f.name.endswith("_ticks"):
                fields.append((f.name, f.name[: -len("_ticks")], "price" + optional))
            elif f.name.endswith("_lots"):
                fields.append((f.name, f.name[: -len("_lots")], "qty" + optional))
            elif f.name in _SOMETIMES:
                fields.append((f.name, f.name, "sometimes"))
            elif f.name in _MONEY:
                fields.append((f.name, f.name, _MONEY[f.name]))
            else:
                fields.append((f.name, f.name, ""))
        plan = _PLANS[cls] = tuple(fields)
    return plan


def _money(kind: str, value: Any, event: Event, spec: Instrument) -> Any:
    """A balance field as decimal strings in its asset (``spec`` keeps balances)."""
    if kind == "balances":
        return [{"client_id": client, "asset": asset, "available": spec.units_to_amount(asset, available),
                 "reserved": spec.units_to_amount(asset, reserved)} for client, asset, available, reserved in value]
    if kind == "side":
        asset = spec.base_asset if event.side is Side.SELL else spec.quote_asset  # type: ignore[union-attr]
    else:
        asset = spec.quote_asset if kind == "quote" else event.asset  # type: ignore[union-attr]
    return spec.units_to_amount(asset, value)


def event_to_wire(event: Event, spec: Instrument | None) -> dict[str, Any]:
    """One event as a JSON-ready dict with decimal strings (market prices are null).

    The balance fields (``reserved``, ``released``, ``maker_fee``, ``taker_fee``, ``balances``, a
    deposit's ``amount``) are decimal strings in their asset and present on an instrument that keeps
    balances only; ``funds`` and ``transfer_id`` are present when set, and so are the order-type fields
    (an ``accepted`` event's ``stop_price`` and ``display_qty``, an ``amended`` one's ``stop_price`` and
    ``hidden``). Without ``spec`` (an unknown
    instrument) numbers stay integers and unset fields are left out."""
    out: dict[str, Any] = {"type": type(event).__struct_config__.tag}
    money = spec is not None and spec.balances
    for name, wire_name, kind in _plan(type(event)):
        value = getattr(event, name)
        if kind in ("", "price", "qty"):
            if kind and spec is not None:
                if value is None or (kind == "price" and value == 0):
                    value = None
                else:
                    value = spec.ticks_to_price(value) if kind == "price" else spec.lots_to_qty(value)
        elif kind == "sometimes":
            if not value:
                continue
            if name == "funds" and spec is not None:
                value = spec.units_to_amount(spec.quote_asset, value)
        elif kind in ("price?", "qty?"):
            if not value:
                continue
            if spec is not None:
                value = spec.ticks_to_price(value) if kind == "price?" else spec.lots_to_qty(value)
        elif money:
            assert spec is not None
            value = _money(kind, value, event, spec)
        elif not value:
            continue
        out[wire_name] = value
    return out


def encode_event(event: Event, spec: Instrument | None) -> bytes:
    """One event as JSON bytes (see :func:`event_to_wire`)."""
    return _encoder.encode(event_to_wire(event, spec))


def encode(obj: object) -> bytes:
    """JSON-encode any wire structure (dicts, lists, Structs, enums)."""
    return _encoder.encode(obj)


_CACHE_MAX = 50_000


class WireEncoder:
    """:func:`encode_event` for one instrument, faster: the publisher encodes every event on the daemon's thread.

    The same bytes as ``encode_event(event, spec)``; the decimal strings of recent prices and
    quantities are cached, and fields are read with one ``astuple`` call.
    """

    def __init__(self, spec: Instrument) -> None:
        self._spec = spec
        self._plans: dict[type[Any], tuple[str, tuple[tuple[str, str, Callable[[int], str] | None], ...]]] = {}
        self._prices: dict[int, str] = {}
        self._qtys: dict[int, str] = {}

    def _plan(self, cls: type[Any]) -> tuple[str, tuple[tuple[str, str, Callable[[int], str] | None], ...]]:
        """``(tag, ((wire name, kind, convert), ...))``: :func:`_plan`'s kinds with those left out ("skip": the
        balance fields without balances) and those on the wire only when set ("sometimes", with the
        converter of their value if it is one) told apart once per class."""
        spec = self._spec
        fields: list[tuple[str, str, Callable[[int], str] | None]] = []
        for name, wire, kind in _plan(cls):
            if kind in ("", "price", "qty"):
                fields.append((wire, kind, None))
            elif kind in ("sometimes", "price?", "qty?"):
                convert = {"price?": spec.ticks_to_price, "qty?": spec.lots_to_qty}.get(kind)
                if name == "funds":
                    convert = functools.partial(spec.units_to_amount, spec.quote_asset)
                fields.append((wire, "sometimes", convert))
            else:  # without balances, the balance fields are left out
                fields.append((wire, kind if spec.balances else "skip", None))
        plan = self._plans[cls] = (str(cls.__struct_config__.tag), tuple(fields))
        return plan

    def encode(self, event: Event) -> bytes:
        cls = type(event)
        plan = self._plans.get(cls)
        if plan is None:
            plan = self._plan(cls)
        tag, fields = plan
        out: dict[str, Any] = {"type": tag}
        prices, qtys = self._prices, self._qtys
        for (wire_name, kind, convert), value in zip(fields, msgspec.structs.astuple(event), strict=True):
            if kind:
                if kind == "price":
                    if value == 0 or value is None:
                        value = None
                    else:
                        text = prices.get(value)
                        if text is None:
                            if len(prices) >= _CACHE_MAX:
                                prices.clear()
                            text = prices[value] = self._spec.ticks_to_price(value)
                        value = text
                elif kind == "qty":
                    if value is not None:
                        text = qtys.get(value)
                        if text is None:
                            if len(qtys) >= _CACHE_MAX:
                                qtys.clear()
                            text = qtys[value] = self._spec.lots_to_qty(value)
                        value = text
                elif kind == "skip" or (kind == "sometimes" and not value):
                    continue
                elif kind == "sometimes":
                    if convert is not None:
                        value = convert(value)
                else:
                    value = _money(kind, value, event, self._spec)
            out[wire_name] = value
        return _encoder.encode(out)
