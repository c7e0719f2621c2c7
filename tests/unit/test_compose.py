"""The compose stack, checked statically (no Docker engine runs here).

docker-compose.yml parses and has every service the daemon needs; the daemon's
environment, ports and command agree with config/compose.toml; Prometheus
scrapes the daemon where it listens; Grafana is provisioned from config/ and
its dashboard queries only metric names that exchange/telemetry/metrics.py defines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from exchange.settings import ENV_OVERRIDES, load_settings
from exchange.telemetry.metrics import Metrics
from exchange.wire.auth import ENV_KEYS

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    svc = compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def published(svc: dict[str, Any]) -> dict[int, str]:
    """container port -> host address, from ``"127.0.0.1:8080:8080"`` entries (the same port on both sides, or a
    range that starts with it: one host port per process of a scaled service)."""
    out = {}
    for entry in svc.get("ports", []):
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        assert parts[-2].split("-")[0] == parts[-1], f"{entry}: the host port differs from the container port"
        out[int(parts[-1])] = host_ip
    return out


def test_every_service_the_daemon_needs_is_there() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "kafka", "exchange", "prometheus", "grafana"} <= set(services)
    assert set(service("exchange")["depends_on"]) >= {"postgres", "redis", "kafka"}
    assert service("exchange")["build"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_kafka_runs_in_kraft_mode() -> None:
    env = service("kafka")["environment"]
    assert service("kafka")["image"].startswith("apache/kafka:")
    assert "controller" in env["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"]


def test_the_daemon_config_agrees_with_the_stack() -> None:
    exchange = service("exchange")
    config_arg = exchange["command"][exchange["command"].index("--config") + 1]
    assert config_arg == "config/compose.toml"
    env = {k: str(v) for k, v in exchange["environment"].items()}
    settings = load_settings(ROOT / config_arg, env=dict.fromkeys(env, "x"))
    # only documented overrides (and the operator keys, which only the environment holds), no secret in the TOML
    assert set(env) <= {*ENV_OVERRIDES.values(), ENV_KEYS}
    assert ENV_KEYS in env  # the stack shows how the operator keys are provided
    raw = (ROOT / config_arg).read_text()
    assert not re.search(r"^\s*(sasl_)?password\s*=", raw, re.MULTILINE)
    assert "EXCHANGE_POSTGRES_PASSWORD" in env
    assert env["EXCHANGE_POSTGRES_PASSWORD"] == str(service("postgres")["environment"]["POSTGRES_PASSWORD"])

    settings = load_settings(ROOT / config_arg, env={})
    # Kafka: the bootstrap address is a listener the broker advertises inside the network
    advertised = service("kafka")["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert all(f"//{server}" in advertised for server in settings.kafka.bootstrap_servers.split(","))
    # PostgreSQL: host, database and user of the DSN are the postgres service's
    dsn = urlsplit(settings.postgres.dsn)
    pg_env = service("postgres")["environment"]
    assert (dsn.hostname, dsn.port or 5432, dsn.path.lstrip("/"), dsn.username) == (
        "postgres", 5432, pg_env["POSTGRES_DB"], pg_env["POSTGRES_USER"])
    assert 5432 in published(service("postgres"))
    # HTTP: listens on all interfaces in the container, published on the host's loopback only, one host port per
    # process of `docker compose up --scale exchange=N`
    assert settings.http.host == "0.0.0.0"
    assert published(exchange) == {settings.http.port: "127.0.0.1"}
    low, high = map(int, exchange["ports"][0].split(":")[1].split("-"))
    assert high - low + 1 >= 3, "room for several processes"
    for name in compose()["services"]:
        assert set(published(service(name)).values()) <= {"127.0.0.1"}, f"{name} publishes beyond localhost"


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``"INTERNAL://kafka:19092,EXTERNAL://127.0.0.1:9092"`` -> name -> (host, port)."""
    out = {}
    for entry in value.split(","):
        name, address = entry.split("://")
        host, port = address.rsplit(":", 1)
        out[name] = (host, int(port))
    return out


def test_market_data_and_kafka_point_at_the_stacks_services() -> None:
    settings = load_settings(ROOT / "config" / "compose.toml", env={})
    # Redis: on, at the redis service (the default URL is 127.0.0.1, which inside the container is the daemon)
    assert settings.redis.enabled
    assert settings.publisher.marketdata == "redis"
    url = urlsplit(settings.redis.url)
    assert (url.scheme, url.hostname, url.port or 6379) == ("redis", "redis", 6379)
    assert 6379 in published(service("redis"))
    # Kafka: every bootstrap server is the kafka service on the listener it advertises inside the network
    advertised = _listeners(service("kafka")["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    for server in settings.kafka.bootstrap_servers.split(","):
        host, port = server.rsplit(":", 1)
        assert host == "kafka"
        assert (host, int(port)) == advertised["INTERNAL"]


def test_kafka_advertises_the_address_its_port_is_published_on() -> None:
    kafka = service("kafka")
    env = kafka["environment"]
    listen = _listeners(env["KAFKA_LISTENERS"])
    host, port = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])["EXTERNAL"]
    # "localhost" may resolve to ::1 first, which the 127.0.0.1-only published port refuses
    assert host == "127.0.0.1"
    assert published(kafka)[port] == "127.0.0.1"
    assert listen["EXTERNAL"][1] == port
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL"  # the daemon's listener stays in the network


def test_kafka_and_postgres_keep_their_data_in_named_volumes() -> None:
    named = set(compose().get("volumes") or {})

    def mounts(name: str) -> dict[str, str]:
        """container path -> named volume"""
        out = {}
        for volume in service(name).get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if source in named:
                out[target] = source
        return out

    # `docker compose down` keeps named volumes: the topics (and the group's offsets) with the journal's offsets
    log_dirs = service("kafka")["environment"]["KAFKA_LOG_DIRS"]
    assert all(d in mounts("kafka") for d in str(log_dirs).split(",")), "every Kafka log dir on a named volume"
    assert "/var/lib/postgresql/data" in mounts("postgres")
    assert set(mounts("kafka").values()).isdisjoint(mounts("postgres").values())


def test_the_dockerfile_installs_dependencies_in_a_layer_before_the_code() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    copies = [(i, line.split()[1:-1]) for i, line in enumerate(lines) if line.startswith("COPY ")]
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    first_copy, first_sources = copies[0]
    assert first_sources == ["pyproject.toml"], "the dependency layer depends on pyproject.toml only"
    code_copy = next(i for i, sources in copies if "exchange" in sources)
    assert first_copy < installs[0] < code_copy, "dependencies installed before the code is copied"
    package_install = next(i for i in installs if i > code_copy)
    assert "--no-deps" in lines[package_install]


def test_prometheus_scrapes_the_daemon() -> None:
    prom_service = service("prometheus")
    mounts = {v.split(":")[0]: v.split(":")[1] for v in prom_service["volumes"]}
    assert mounts["./config/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    prom = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    settings = load_settings(ROOT / "config" / "compose.toml", env={})
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    job = jobs["exchange"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # every process of the (scaled) service: DNS discovery of the service name, each address on the daemon's port
    assert [(d["names"], d["type"], d["port"]) for d in job["dns_sd_configs"]] == [
        (["exchange"], "A", settings.http.port)]


def test_grafana_is_provisioned_from_config() -> None:
    volumes = dict(v.rsplit(":", 1)[0].split(":", 1) for v in service("grafana")["volumes"])
    assert volumes["./config/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = volumes["./config/grafana/dashboards"]
    provider = yaml.safe_load((ROOT / "config/grafana/provisioning/dashboards/exchange.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_dir
    datasource = yaml.safe_load((ROOT / "config/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def _defined_metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def test_the_dashboard_shows_throughput_latency_depth_lag_recovery_with_defined_metrics() -> None:
    dashboard = json.loads((ROOT / "config/grafana/dashboards/exchange.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "depth", "lag", "recovery"):
        assert topic in titles, topic
    defined = _defined_metric_names()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bexchange_[a-z0-9_]+", target["expr"]))
    assert used
    assert used <= defined, f"dashboard queries undefined metrics: {sorted(used - defined)}"


def test_the_dashboard_uses_the_rate_interval_and_an_instrument_variable() -> None:
    dashboard = json.loads((ROOT / "config/grafana/dashboards/exchange.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # a fixed [1m] is empty when the scrape interval is 1 m or more, and jagged at any zoom; Grafana sizes this one
    assert not [e for e in exprs if "[1m]" in e]
    # (a rate over a window kept long on purpose, for rare events such as rebalances, may stay fixed)
    short = [e for e in exprs if re.search(r"\brate\([^()]*\[(\d+s|\dm)\]\)", e)]
    assert not short, "a rate() over a fixed short window: use $__rate_interval"
    assert any("[$__rate_interval]" in e for e in exprs)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    instrument = variables["instrument"]
    assert instrument["type"] == "query"
    assert instrument["datasource"]["uid"] == "prometheus"
    query = re.fullmatch(r"label_values\((exchange_[a-z0-9_]+), instrument\)", instrument["query"]["query"])
    assert query
    assert query[1] in _defined_metric_names()
    assert (instrument["multi"], instrument["includeAll"], instrument["allValue"]) == (True, True, ".*")
    # every query of a metric labelled by instrument keeps to the chosen instruments
    labelled = {"exchange_orders_received", "exchange_trades", "exchange_orders_matched", "exchange_orders_rejected",
                "exchange_book_depth_lots", "exchange_book_orders", "exchange_book_levels", "exchange_queue_depth",
                "exchange_instrument_halted", "exchange_snapshot_age_seconds"}
    for expr in exprs:
        for name, labels in re.findall(r"\b(exchange_[a-z0-9_]+)(\{[^}]*\})?", expr):
            if name.removesuffix("_total") in labelled:
                assert 'instrument=~"$instrument"' in labels, f"{expr}: not filtered by $instrument"
    assert any('instrument=~"$instrument"' in e for e in exprs)
