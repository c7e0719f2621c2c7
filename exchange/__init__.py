"""A single-writer, in-memory order-matching engine.

The pure core, usable as a library (for backtests, replay and tests)::

    from exchange import Instrument, MatchingEngine, PlaceOrder, Side, OrderType

    spec = Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001")
    engine = MatchingEngine(spec)
    events = engine.apply(PlaceOrder("BTC-USD", "alice", "a-1", Side.BUY, OrderType.LIMIT,
                                     price_ticks=spec.price_to_ticks("101.25"),
                                     qty_lots=spec.qty_to_lots("0.5")))
"""

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
from exchange.core.events import (
    BookCleared,
    Deposited,
    Event,
    InstrumentHalted,
    InstrumentResumed,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderExpired,
    OrderFilled,
    OrderRejected,
    OrderReplenished,
    OrderTriggered,
    Withdrawn,
)
from exchange.core.instruments import ConversionError, Instrument
from exchange.core.matching import Exchange, MatchingEngine
from exchange.core.state import EngineState, RestingOrder, StopOrder
from exchange.core.types import CancelReason, OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = [
    "AmendOrder",
    "BookCleared",
    "CancelAll",
    "CancelOrder",
    "CancelReason",
    "ClearBook",
    "Command",
    "ConversionError",
    "Deposit",
    "Deposited",
    "EngineState",
    "Event",
    "Exchange",
    "HaltInstrument",
    "Instrument",
    "InstrumentHalted",
    "InstrumentResumed",
    "MatchingEngine",
    "OrderAccepted",
    "OrderAmended",
    "OrderCanceled",
    "OrderExpired",
    "OrderFilled",
    "OrderRejected",
    "OrderReplenished",
    "OrderTriggered",
    "OrderType",
    "PlaceOrder",
    "RejectInput",
    "RejectReason",
    "RestingOrder",
    "ResumeInstrument",
    "Side",
    "StopOrder",
    "StpMode",
    "TimeInForce",
    "Withdraw",
    "Withdrawn",
]
