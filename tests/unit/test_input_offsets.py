"""Where an orders partition is read from, and when it must not be read (exchange.pipeline.offsets.plan_partition);
the records the daemon produces stay under the broker's limit (exchange.adapters.kafka)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from exchange.adapters.kafka import KafkaEventPublisher
from exchange.core.types import RejectReason
from exchange.pipeline.offsets import OffsetTracker, PartitionPlan, plan_partition
from exchange.pipeline.router import Refusal


def plan(applied: list[int] | None = None, routed: int | None = None, committed: int | None = None,
         log_start: int = 0, log_end: int = 1000) -> PartitionPlan:
    return plan_partition(applied=applied or [], routed=routed, committed=committed, log_start=log_start,
                          log_end=log_end)


def test_a_fresh_partition_is_read_from_the_groups_offset_or_the_start() -> None:
    assert plan() == PartitionPlan(0)
    assert plan(committed=40) == PartitionPlan(40)
    assert plan(committed=3, log_start=10) == PartitionPlan(10)  # retention passed it: nothing of ours was there


def test_reading_starts_after_the_partitions_own_stored_offset() -> None:
    # an idle instrument far behind does not hold the read position back once the partition's row exists
    assert plan(applied=[5, 900], routed=950, committed=960) == PartitionPlan(951)
    # without the partition's row: the lowest of what the instruments applied and the group's commit
    assert plan(applied=[5, 900], committed=960) == PartitionPlan(6)
    assert plan(applied=[500, 900], committed=300) == PartitionPlan(300)


def test_a_log_that_lost_what_was_applied_is_a_problem_never_a_position() -> None:
    lost = plan(applied=[999], routed=999, log_end=0)  # the broker came back empty
    assert lost.problem is not None
    assert "ends at offset 0, below offset 999" in lost.problem
    assert plan(applied=[999], routed=998, log_end=999).problem is not None  # offset 999 itself is gone
    assert plan(applied=[999], routed=999, log_end=1000).problem is None


def test_a_log_that_lost_messages_not_yet_read_is_a_problem() -> None:
    gone = plan(applied=[100], routed=100, log_start=500, log_end=2000)
    assert gone.problem is not None
    assert "messages 101 - 499 were deleted" in gone.problem
    # ... unless the group committed past them: they were handled (dead letters, an instrument ahead)
    assert plan(applied=[100], routed=100, committed=600, log_start=500, log_end=2000) == PartitionPlan(500)
    assert plan(applied=[100], routed=100, log_start=101, log_end=2000) == PartitionPlan(101)


def test_a_group_offset_beyond_the_log_of_a_fresh_partition_is_a_problem() -> None:
    assert plan(committed=5000, log_end=10).problem is not None


def test_the_tracker_counts_one_partitions_messages_in_flight() -> None:
    tracker = OffsetTracker()
    tracker.dispatched(("t", 0), 1)
    tracker.dispatched(("t", 0), 2)
    tracker.dispatched(("t", 1), 7)
    tracker.durable(("t", 0), 1)
    assert (tracker.in_flight(("t", 0)), tracker.in_flight(("t", 1)), tracker.in_flight()) == (1, 1, 2)


# ---------------------------------------------------------------- bounded records

def _publisher(max_record_bytes: int = 20_000) -> KafkaEventPublisher:
    return KafkaEventPublisher(bootstrap_servers="127.0.0.1:1", events_topic="events", instruments={},
                               max_record_bytes=max_record_bytes)


def test_a_dead_letter_stays_under_the_record_limit_and_says_it_was_cut() -> None:
    pub = _publisher(20_000)
    record = SimpleNamespace(topic="orders", partition=2, offset=77, timestamp=5, key=b"k" * 5000,
                             value=b"v" * 1_000_000)
    letter = pub.dead_letter("orders.dlq", record, Refusal(RejectReason.MESSAGE_TOO_LARGE, "x" * 10_000))
    size = len(letter.value) + len(letter.key or b"") + sum(len(k) + len(v) for k, v in letter.headers)
    assert size <= 20_000
    headers = dict(letter.headers)
    assert headers["truncated"] == b"1000000"
    assert (headers["reason"], headers["source_partition"], headers["source_offset"]) == (
        b"message_too_large", b"2", b"77")
    assert letter.source_partition == 2
    small = SimpleNamespace(topic="orders", partition=0, offset=1, timestamp=5, key=None, value=b"{}")
    assert "truncated" not in dict(pub.dead_letter("dlq", small, Refusal(RejectReason.MALFORMED, "no")).headers)


def test_a_rejection_names_the_command_and_no_instrument_when_there_is_none() -> None:
    pub = _publisher()
    rec = pub.rejection(Refusal(RejectReason.INSTRUMENT_REQUIRED, "cancel_all needs an instrument", "alice",
                                command="cancel_all"), 7)
    wire = json.loads(rec.value)
    assert (wire["command"], wire["instrument"], wire["reason"], wire["seq"], rec.key) == (
        "cancel_all", None, "instrument_required", 0, b"alice")
    wrong = pub.rejection(Refusal(RejectReason.WRONG_PARTITION, "no", "bob", instrument="X", expected_partition=3), -5)
    assert json.loads(wrong.value)["expected_partition"] == 3
    assert json.loads(wrong.value)["ts_ns"] == 0  # an impossible time is not repeated


@pytest.mark.parametrize("sizes", [[10] * 1000, [5000] * 30, [15_000, 10, 15_000], [30_000]])
def test_event_records_are_split_by_count_and_by_bytes(sizes: list[int]) -> None:
    pub = _publisher(20_000)
    values = [b"e" * n for n in sizes]
    chunks = list(pub._chunks(values))
    assert [v for chunk in chunks for v in chunk] == values
    for chunk in chunks:
        assert len(chunk) <= 200
        assert len(chunk) == 1 or sum(len(v) + 1 for v in chunk) <= 20_000


def test_an_instrument_stays_on_its_stored_partition_whatever_murmur2_says_now() -> None:
    from typing import Any, cast

    from exchange.adapters.kafka import OrderSource, partition_for

    stored = {("BTC-USD", "orders", 1): 50, ("BTC-USD", "orders", 0): 7,  # fed from two partitions once
              ("ETH-USD", "orders", 2): 9, ("ETH-USD", "other-topic", 0): 3}
    source = OrderSource(bootstrap_servers="127.0.0.1:1", topic="orders", group_id="g", loops={}, instruments={},
                         applied_offsets=stored, publisher=cast(Any, None), dead_letter_topic="orders.dlq")
    assert source.partition_of("BTC-USD") == 1  # the one it reached furthest on
    assert source.partition_of("ETH-USD") == 2
    assert source.partition_of("SOL-USD") is None  # nothing stored and the topic not seen yet
    source._homes.counted(6)  # the group assignment showed the topic's partitions
    assert source.partition_of("SOL-USD") == partition_for("SOL-USD", 6)
