"""Which topics a configuration uses, and what a missing one at start-up says (exchange.adapters.kafka.topics)."""

from __future__ import annotations

from pathlib import Path

from exchange.adapters.kafka.topics import Topic, daemon_topics, missing_topics
from exchange.ports import CannotStart
from exchange.settings import Settings, load_settings

ROOT = Path(__file__).parents[2]
ORDERS = Topic("orders", "orders", "instrument")
TRADES = Topic("trades", "trades", "instrument")


def _settings(tmp_path: Path, extra: str = "") -> Settings:
    path = tmp_path / "exchange.toml"
    path.write_text((ROOT / "exchange" / "defaults" / "exchange.toml").read_text() + extra)
    return load_settings(path, env={})


def test_the_shipped_configuration_uses_four_topics_with_their_keys(tmp_path: Path) -> None:
    assert [(t.name, t.role, t.key) for t in daemon_topics(_settings(tmp_path))] == [
        ("orders", "orders", "instrument"), ("orders.dlq", "dead letters", "the refused message's key"),
        ("order-events", "order events", "client id"), ("trades", "trades", "instrument")]


def test_no_trades_topic_and_no_kafka_source_leave_their_topics_out(tmp_path: Path) -> None:
    settings = _settings(tmp_path, '\n[kafka]\ntrades_topic = ""\n')
    assert [t.name for t in daemon_topics(settings)] == ["orders", "orders.dlq", "order-events"]
    generator = _settings(tmp_path, '\n[source]\nkind = "generator"\n\n[publisher]\nkind = "none"\n')
    assert daemon_topics(generator) == []


def test_a_topic_the_broker_does_not_create_stops_the_start_naming_it_and_the_command() -> None:
    refused = missing_topics("kafka:9092", [ORDERS, TRADES], {"orders": 3, "trades": 0})
    assert isinstance(refused, CannotStart)
    assert str(refused).startswith("topic 'orders' (orders, key: instrument) does not exist and the broker at "
                                   "kafka:9092 does not create topics automatically (auto.create.topics.enable="
                                   "false): create it with `exchange topics create --partitions N`")
    both = missing_topics("kafka:9092", [ORDERS, TRADES], {"orders": 3, "trades": 3})
    assert str(both).startswith("topic 'orders' (orders, key: instrument), topic 'trades' (trades, key: "
                                "instrument) do not exist")


def test_topics_the_broker_created_or_is_creating_are_no_reason_to_stop() -> None:
    assert missing_topics("kafka:9092", [ORDERS, TRADES], {"orders": 0, "trades": 5}) is None


def test_a_topic_this_client_may_not_see_says_which_acl_it_needs() -> None:
    refused = missing_topics("kafka:9092", [ORDERS], {"orders": 29})
    assert str(refused) == ("topic 'orders' (orders): topic authorization failed: grant this client's user "
                            "Describe, Read and Write on it")
