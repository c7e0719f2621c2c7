"""The small vocabularies shared by commands and events (values are the wire strings)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CancelReason", "OrderType", "RejectReason", "Side", "StpMode", "TimeInForce"]


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"


class OrderType(StrEnum):
    LIMIT = "limit"
    MARKET = "market"
    STOP = "stop"  # waits for its stop price, then a market order (IOC)
    STOP_LIMIT = "stop_limit"  # waits for its stop price, then a limit order at its price


class TimeInForce(StrEnum):
    GTC = "GTC"  # good till canceled
    IOC = "IOC"  # immediate or cancel: the remainder is canceled
    FOK = "FOK"  # fill or kill: fills completely at once or does nothing
    GTD = "GTD"  # good till date: expires when an input timestamp reaches expire_ns


class StpMode(StrEnum):
    """Self-trade prevention, decided by the incoming (taker) order's mode."""

    NONE = "none"  # same-owner orders trade with each other
    CANCEL_RESTING = "cancel_resting"  # same-owner makers are canceled as matching reaches them
    CANCEL_INCOMING = "cancel_incoming"  # the incoming remainder is canceled at the first same-owner maker
    CANCEL_BOTH = "cancel_both"  # both the maker and the incoming remainder are canceled


class CancelReason(StrEnum):
    REQUESTED = "requested"
    IOC_REMAINDER = "ioc_remainder"  # also the unfilled part of a market order
    FOK_UNFILLED = "fok_unfilled"
    SELF_TRADE = "self_trade"
    CLEARED = "cleared"  # an operator cleared the book


class RejectReason(StrEnum):
    MALFORMED = "malformed"  # the command could not be understood
    UNKNOWN_INSTRUMENT = "unknown_instrument"
    INVALID_PRICE = "invalid_price"
    INVALID_QUANTITY = "invalid_quantity"
    INVALID_ORDER = "invalid_order"  # a combination of fields that makes no sense
    INVALID_EXPIRY = "invalid_expiry"
    DUPLICATE_CLIENT_ORDER_ID = "duplicate_client_order_id"
    POST_ONLY_WOULD_TRADE = "post_only_would_trade"
    UNKNOWN_ORDER = "unknown_order"
    TOO_LATE = "too_late"  # the order exists but is no longer open
    NOT_OWNER = "not_owner"
    INVALID_AMEND = "invalid_amend"
    INSTRUMENT_HALTED = "instrument_halted"  # new orders and amends wait for resume; cancels still work
    NOT_HALTED = "not_halted"  # resume of an instrument that is trading
    NOT_AUTHORIZED = "not_authorized"  # an operator action without a valid, fresh signature
    STOP_WOULD_TRIGGER = "stop_would_trigger"  # a stop whose condition already holds (placed, or amended)
    INSUFFICIENT_FUNDS = "insufficient_funds"  # the available balance does not cover what the command needs
    DUPLICATE_TRANSFER_ID = "duplicate_transfer_id"  # a deposit or withdrawal's transfer id was seen before
    INVALID_AMOUNT = "invalid_amount"  # a deposit, withdrawal or market-buy budget off its asset's grid, or zero
    UNKNOWN_ASSET = "unknown_asset"  # neither the instrument's base nor its quote asset
    BALANCES_DISABLED = "balances_disabled"  # a deposit or withdrawal on an instrument that keeps no balances
    INSTRUMENT_REQUIRED = "instrument_required"  # the daemon routes by instrument: the message must name one
    # refusals of the daemon's edge: the message never reached an instrument (dead-lettered, seq 0)
    MESSAGE_TOO_LARGE = "message_too_large"  # above [kafka] max_message_bytes
    INVALID_TIMESTAMP = "invalid_timestamp"  # the input time is outside 1970 - 2100
    WRONG_PARTITION = "wrong_partition"  # not on the instrument's orders partition, or not keyed by it
    INTERNAL_ERROR = "internal_error"  # the edge failed on this message (a bug): dead-lettered, never applied
