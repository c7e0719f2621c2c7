"""The edge's one guard: from one input message to exactly one outcome, never an exception.

Every source of wire messages (the Kafka consumer, the in-process generator, ``exchange replay``) hands
each message to :meth:`Router.route` (or, already parsed, :meth:`Router.route_message`) and gets back
exactly one of

- a :class:`~exchange.core.commands.Command` for one instrument's loop (a ``RejectInput`` among them:
  a sequenced ``rejected`` event, so the sender hears back in order);
- a :class:`SnapshotRequested`: an operator's "snapshot now", a control in the instrument's queue;
- a :class:`Refusal`: the message reaches no instrument. The daemon dead-letters it (with the
  reason code and text in headers) and, when the sender can be identified, answers it with an
  unsequenced ``rejected`` event (seq 0); ``exchange replay`` prints an ``error`` line (or, for an
  unknown instrument, the seq-0 ``rejected`` event the library gives).

Whatever goes wrong while parsing, decoding, validating or routing one message becomes a
:class:`Refusal` with reason ``internal_error`` and the exception type (``Refusal.internal`` holds
the exception for the caller to log once, with where the message came from): no input can raise
into the consumer or the replay tool, so no input can stop the daemon or put it in a crash loop.

The checks, in order (each a reason code of :class:`~exchange.core.types.RejectReason`):

1. size: a message above ``max_message_bytes`` is ``message_too_large`` (it is not parsed);
2. time: the input time (Kafka timestamp) must lie between 1970 and 2100: ``invalid_timestamp``;
3. JSON: one object (nesting, invalid UTF-8 and the rest): ``malformed``;
4. ``op`` and identity (instrument, client id, client order id; see :mod:`exchange.wire.codec`):
   ``malformed``; a daemon needs an instrument on every message (``instrument_required``; the
   library and ``exchange replay`` fan an instrument-less ``cancel_all`` out to every instrument);
5. the instrument: configured (``unknown_instrument``), and — with ``partitions`` (the daemon) —
   the message on that instrument's orders partition and keyed by the instrument
   (``wrong_partition``, ``Refusal.expected_partition``): an instrument's order is then never decided
   by the timing of two partitions' fetches;
6. operator actions (:mod:`exchange.wire.auth`): signed and fresh, unless the router trusts its input
   (``verifier`` None: ``exchange replay`` of the operator's own file). Refused ones become a
   sequenced ``rejected`` event with reason ``not_authorized`` and the claimed operator;
7. the command's own fields (:func:`exchange.wire.codec.decode_command`).

Pure: no I/O, no clock. The same message, time, key and partition always give the same outcome,
which is what lets a restart re-read the input and decide exactly as the first run did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exchange.core.commands import Command, RejectInput
from exchange.core.instruments import Instrument
from exchange.core.types import RejectReason
from exchange.wire.auth import OPERATOR_OPS, Verifier
from exchange.wire.codec import (
    MAX_TS_NS,
    OPS,
    WireError,
    decode_command,
    decode_fields,
    identity,
    message_ts_ns,
    parse_json,
    quote,
    valid_identifier,
)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Refusal", "Route", "Router", "SnapshotRequested"]

DEFAULT_MAX_MESSAGE_BYTES = 65_536  # an order is a few hundred bytes; anything near this is not an order
_ROUTED_OPS = (*OPS, "snapshot")
_ROUTED = frozenset(_ROUTED_OPS)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message no instrument will see: dead-lettered, and answered with seq 0 when ``client_id`` is known.

    ``command`` is the op the sender asked for (for the rejection's ``command``), ``place`` when none
    could be read. ``internal`` is the exception behind an ``internal_error``.
    """

    reason: RejectReason
    text: str
    client_id: str | None = None
    client_order_id: str | None = None
    instrument: str | None = None
    command: str = "place"
    expected_partition: int | None = None
    internal: BaseException | None = None


@dataclass(frozen=True, slots=True)
class SnapshotRequested:
    """``{"op": "snapshot", "instrument": ...}``: snapshot that instrument's book now, in order with its orders.

    ``instrument`` None (``exchange replay`` only): every book."""

    instrument: str | None
    operator: str | None


Route = Command | SnapshotRequested | Refusal


class Router:
    """Routes wire messages (see the module docstring).

    ``verifier``: checks operator actions; None trusts them (``exchange replay`` without
    ``--verify-signatures``). ``partitions``: each instrument's orders partition, for the daemon's
    partition and key check (an instrument it does not name is checked for its key only); None skips both
    (no partitions: a file, a generator). The daemon keeps the mapping current. ``fan_out``: an
    instrument-less ``cancel_all`` or ``snapshot`` is for every instrument (the library's rule) instead
    of a refusal (the daemon's, which routes by instrument).
    """

    def __init__(self, instruments: Mapping[str, Instrument], *, verifier: Verifier | None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 partitions: Mapping[str, int] | None = None, fan_out: bool = False) -> None:
        self._specs = instruments
        self._verifier = verifier
        self.max_message_bytes = max_message_bytes
        self._partitions = partitions
        self._fan_out = fan_out
        self._keys = {symbol: symbol.encode() for symbol in instruments}  # the key each instrument's messages carry

    def route(self, value: bytes | None, ts_ns: int | None, *, key: bytes | None = None,
              partition: int | None = None) -> Route:
        """One message as it arrived: ``value`` bytes, the input time (None: the message's own ``ts_ns``),
        and, from Kafka, its key and partition. Never raises."""
        try:
            if value is None:
                return Refusal(RejectReason.MALFORMED, "the message has no value (a tombstone?)")
            if len(value) > self.max_message_bytes:
                return Refusal(RejectReason.MESSAGE_TOO_LARGE, f"the message has {len(value)} bytes, more than "
                               f"the {self.max_message_bytes} this exchange takes (max_message_bytes)")
            if ts_ns is not None and not 0 <= ts_ns <= MAX_TS_NS:
                return Refusal(RejectReason.INVALID_TIMESTAMP, f"the message's timestamp {ts_ns // 1_000_000} ms is "
                               "not between 1970 and 2100")
            try:
                msg = parse_json(value)
            except WireError as exc:
                return _refusal(exc, "place")
            return self._route(msg, ts_ns, key, partition)
        except Exception as exc:  # the guard: anything unexpected is this message's outcome, not the consumer's
            return _internal(exc)

    def route_message(self, msg: dict[str, Any], ts_ns: int | None) -> Route:
        """An already parsed message (``exchange replay``, the generator); never raises."""
        try:
            return self._route(msg, ts_ns, None, None)
        except Exception as exc:
            return _internal(exc)

    def _route(  # noqa: C901 - the edge's checks in their documented order, one outcome per message
            self, msg: dict[str, Any], ts_ns: int | None, key: bytes | None, partition: int | None) -> Route:
        op = msg.get("op")
        client_id, client_order_id, instrument = identity(msg)
        routed = op.__class__ is str and op in _ROUTED
        command: str = op if routed else "place"  # type: ignore[assignment]
        try:
            if not routed:
                raise WireError(f"op must be one of {', '.join(_ROUTED_OPS)}; got {quote(op)}", client_id=client_id,
                                client_order_id=client_order_id, instrument=instrument)
            if instrument is None and msg.get("instrument") is not None:
                raw = msg["instrument"]
                raise WireError("instrument must be a string of 1-64 characters without control characters; got "
                                f"{quote(raw)}", client_id=client_id, client_order_id=client_order_id)
            if ts_ns is None:
                ts_ns = message_ts_ns(msg)
        except WireError as exc:
            return _refusal(exc, command)
        if instrument is None:
            operator = _operator(msg, op, client_id)
            if self._fan_out and op in ("cancel_all", "snapshot"):
                if op == "snapshot":
                    return SnapshotRequested(None, operator)
                return self._decode(msg, ts_ns, command)
            return Refusal(RejectReason.INSTRUMENT_REQUIRED, f"{op} needs an instrument: orders and operator actions "
                           "are routed by instrument (key = instrument)", client_id, client_order_id, None, command)
        own_key = self._keys.get(instrument)
        if own_key is None:
            return Refusal(RejectReason.UNKNOWN_INSTRUMENT, f"unknown instrument {quote(instrument)}", client_id,
                           client_order_id, instrument, command)
        if self._partitions is not None:
            expected = self._partitions.get(instrument)
            if expected is not None and partition != expected:
                return Refusal(RejectReason.WRONG_PARTITION, f"{instrument} lives on partition {expected} of the "
                               f"orders topic, not {partition}: key every message by its instrument and use the "
                               "murmur2 partitioner", client_id, client_order_id, instrument, command, expected)
            if key != own_key:
                got = "no key" if key is None else f"key {quote(key.decode(errors='replace'))}"
                return Refusal(RejectReason.WRONG_PARTITION, f"a message for {instrument} must be keyed by its "
                               f"instrument; it has {got}", client_id, client_order_id, instrument, command, expected)
        if command in OPERATOR_OPS or (command == "cancel_all" and "auth" in msg):
            operator = _operator(msg, op, client_id)
            if self._verifier is not None:
                problem = self._verifier.check(msg, ts_ns)
                if problem is not None:
                    transfer_id = msg.get("transfer_id") if command in ("deposit", "withdraw") else None
                    return RejectInput(instrument, operator or "", None, RejectReason.NOT_AUTHORIZED, problem,
                                       command, ts_ns, str(transfer_id) if valid_identifier(transfer_id) else "")
            if command == "snapshot":
                return SnapshotRequested(instrument, operator)
        try:
            return decode_fields(msg, command, client_id, client_order_id, instrument, self._specs, ts_ns)
        except WireError as exc:
            return _refusal(exc, command)

    def _decode(self, msg: dict[str, Any], ts_ns: int, command: str) -> Route:
        try:
            return decode_command(msg, self._specs, ts_ns)
        except WireError as exc:
            return _refusal(exc, command)


def _operator(msg: Mapping[str, Any], op: object, client_id: str | None) -> str | None:
    """Who claims an operator action: ``client_id`` (halt, resume, clear, snapshot), or ``operator``
    for a cancel_all an operator sends on a client's behalf."""
    if op == "cancel_all":
        claimed = identity({"client_id": msg.get("operator")})[0]
        return claimed or client_id
    return client_id


def _refusal(exc: WireError, command: str) -> Refusal:
    return Refusal(exc.reason, exc.text, exc.client_id, exc.client_order_id, exc.instrument, command)


def _internal(exc: Exception) -> Refusal:
    return Refusal(RejectReason.INTERNAL_ERROR, f"the exchange could not process this message "
                   f"({type(exc).__name__}); it was not applied", internal=exc)
