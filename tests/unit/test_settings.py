"""Configuration: strict loading, environment overrides, connection security options, masked printing.

No TLS or SASL servers run here, so the mapping from settings to the driver
arguments (aiokafka, asyncpg) is what is tested; the drivers themselves are
trusted to honour their documented arguments.
"""

from __future__ import annotations

import ast
import json
import re
import ssl
import tomllib
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from exchange.adapters.kafka import client_options
from exchange.adapters.postgres import connect_options
from exchange.cli.main import main
from exchange.settings import (
    MASK,
    ConfigError,
    KafkaSettings,
    PostgresSettings,
    load_settings,
    mask_cut,
    mask_secrets,
    render_settings,
)
from exchange.telemetry.logging import mask_processor

ROOT = Path(__file__).resolve().parents[2]
INSTRUMENT = '[[instruments]]\nsymbol = "BTC-USD"\ntick_size = "0.01"\nlot_size = "0.0001"\n'
CA = str(Path(__file__).parent / "data" / "test-ca.pem")  # a self-signed CA certificate (its key was discarded)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exchange.toml"
    path.write_text(INSTRUMENT + text)
    return path


def test_every_shipped_config_file_loads() -> None:
    files = sorted((ROOT / "config").glob("*.toml")) + sorted((ROOT / "exchange" / "defaults").glob("*.toml"))
    assert files
    for path in files:
        assert load_settings(path, env={}).instruments, path


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[postgres]\nsslmod = 'require'\n")
    with pytest.raises(ConfigError, match=r"exchange\.toml \[postgres\]: unknown key 'sslmod'"):
        load_settings(path, env={})


def test_a_value_outside_its_choices_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[kafka\]: 'security_protocol' must be one of .*'SASL_SSL'.*got 'TLS'"):
        load_settings(write(tmp_path, "[kafka]\nsecurity_protocol = 'TLS'\n"), env={})
    with pytest.raises(ConfigError, match=r"\[postgres\]: 'sslmode' must be one of"):
        load_settings(write(tmp_path, "[postgres]\nsslmode = 'on'\n"), env={})
    with pytest.raises(ConfigError, match=r"\[postgres\]: 'pool_size' must be at least 1"):
        load_settings(write(tmp_path, "[postgres]\npool_size = 0\n"), env={})


def test_sasl_needs_credentials_and_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs sasl_username and sasl_password.*EXCHANGE_KAFKA_SASL_PASSWORD"):
        load_settings(write(tmp_path, "[kafka]\nsecurity_protocol = 'SASL_SSL'\nsasl_username = 'ex'\n"), env={})
    with pytest.raises(ConfigError, match=r"'sslrootcert' names '/nonexistent/ca.pem', which is not a readable file"):
        load_settings(write(tmp_path, "[postgres]\nsslmode = 'verify-full'\nsslrootcert = '/nonexistent/ca.pem'\n"),
                      env={})


def test_environment_overrides_connection_strings_and_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, "[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\nsasl_username = 'file-user'\n"
                           "sasl_password = 'file-secret'\n[postgres]\ndsn = 'postgresql://db/exchange'\n")
    env = {"EXCHANGE_KAFKA_BOOTSTRAP": "k1:9093,k2:9093", "EXCHANGE_KAFKA_SASL_USERNAME": "env-user",
           "EXCHANGE_KAFKA_SASL_PASSWORD": "env-secret", "EXCHANGE_POSTGRES_DSN": "postgresql://pg:5433/x",
           "EXCHANGE_POSTGRES_PASSWORD": "pg-secret"}
    s = load_settings(path, env=env)
    assert (s.kafka.bootstrap_servers, s.kafka.sasl_username, s.kafka.sasl_password) == (
        "k1:9093,k2:9093", "env-user", "env-secret")
    assert (s.postgres.dsn, s.postgres.password) == ("postgresql://pg:5433/x", "pg-secret")
    assert load_settings(path, env={}).kafka.sasl_password == "file-secret"


def test_each_process_on_a_host_gets_its_http_port_from_the_environment(tmp_path: Path) -> None:
    """Several engine processes on one host share one configuration file: ``EXCHANGE_HTTP_PORT`` sets each one's."""
    path = write(tmp_path, "[http]\nport = 8080\n")
    assert load_settings(path, env={"EXCHANGE_HTTP_PORT": "8081"}).http.port == 8081
    assert load_settings(path, env={}).http.port == 8080
    with pytest.raises(ConfigError, match=r"EXCHANGE_HTTP_PORT='x': \[http\] port must be an integer"):
        load_settings(path, env={"EXCHANGE_HTTP_PORT": "x"})


def test_kafka_options_plaintext_sasl_and_tls() -> None:
    assert client_options(KafkaSettings()) == {"security_protocol": "PLAINTEXT"}
    sasl = client_options(KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                                        sasl_username="ex", sasl_password="pw"))
    assert sasl == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_plain_username": "ex", "sasl_plain_password": "pw"}
    tls = client_options(KafkaSettings(security_protocol="SASL_SSL", sasl_username="ex", sasl_password="pw",
                                       ssl_check_hostname=False))
    assert tls["sasl_mechanism"] == "PLAIN"
    context = tls["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert not context.check_hostname
    plain_tls = client_options(KafkaSettings(security_protocol="SSL"))
    assert "sasl_plain_password" not in plain_tls
    assert plain_tls["ssl_context"].check_hostname


def test_postgres_options_password_and_sslmode() -> None:
    assert connect_options(PostgresSettings()) == {}
    assert connect_options(PostgresSettings(password="pw", sslmode="require")) == {"password": "pw", "ssl": "require"}
    assert connect_options(PostgresSettings(sslmode="disable")) == {"ssl": "disable"}


def test_postgres_options_with_a_ca_build_a_verifying_context() -> None:
    full = connect_options(PostgresSettings(sslmode="verify-full", sslrootcert=CA))["ssl"]
    assert isinstance(full, ssl.SSLContext)
    assert (full.verify_mode, full.check_hostname) == (ssl.CERT_REQUIRED, True)
    ca_only = connect_options(PostgresSettings(sslmode="verify-ca", sslrootcert=CA))["ssl"]
    assert (ca_only.verify_mode, ca_only.check_hostname) == (ssl.CERT_REQUIRED, False)
    encrypt_only = connect_options(PostgresSettings(sslmode="require", sslrootcert=CA))["ssl"]
    assert encrypt_only.verify_mode == ssl.CERT_NONE


def test_mask_secrets_covers_any_section_and_any_url() -> None:
    data: dict[str, Any] = {
        "redis": {"url": "rediss://default:r3dis@cache:6380/0", "password": "pw", "acl_token": "t",
                  "tls_credentials_file": "/run/creds", "username": "exchange", "port": 6379},
        "postgres": {"dsn": "postgresql://ex:s3cret@db/exchange?sslmode=require", "password": ""},
        "other": {"dsn": "host=db user=ex password=hunter2 dbname=x", "client_secret": "c", "list": ["a"]},
    }
    masked = mask_secrets(data)
    assert masked["redis"] == {"url": "rediss://default:***@cache:6380/0", "password": "***", "acl_token": "***",
                               "tls_credentials_file": "***", "username": "exchange", "port": 6379}
    assert masked["postgres"] == {"dsn": "postgresql://ex:***@db/exchange?sslmode=require", "password": ""}
    assert masked["other"] == {"dsn": "host=db user=ex password=*** dbname=x", "client_secret": "***", "list": ["a"]}
    text = json.dumps(masked)
    for secret in ("r3dis", "s3cret", "hunter2", '"pw"'):
        assert secret not in text


def test_log_lines_are_masked() -> None:
    out = mask_processor(None, "info", {"event": "connecting to postgresql://u:topsecret@db/x",
                                        "sasl_password": "pw", "n": 3})
    assert out == {"event": "connecting to postgresql://u:***@db/x", "sasl_password": "***", "n": 3}


# The masking before it was made linear (its URL pattern took time n²/2 in a run of n letters): the
# reference for which characters are masked. ``visible`` also says where each character it keeps came from.
_REFERENCE = (re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)(?P<secret>[^/@\s]+)(?P<tail>@)"),
              re.compile(r"(?P<head>\b(?:password|sslpassword)\s*=\s*)(?P<secret>'[^']*'|[^\s&]+)", re.IGNORECASE))


def _pick(*options: str) -> st.SearchStrategy[str]:
    return st.sampled_from(options)


# texts made of URLs, key=value pairs and stray characters, whole or broken, so that most hold a secret
_URL = st.tuples(_pick("postgresql", "a", "1a", "+", "1", ""), _pick("://", ":/", "//"), _pick("", "u", "u.x", "u:"),
                 _pick(":", ""), _pick("pw", "p:w", "p'w", "p w", "", "p/w"), _pick("@", "", "/", " ", "@h/x"))
_KV = st.tuples(_pick("password", "sslPassword", "xpassword", "pass"), _pick("", " ", "  "), _pick("=", ""),
                _pick("", " "), _pick("pw", "'p w'", "'p\nw'", "'pw", "p&w", ""))
TEXTS = st.lists(st.one_of(_URL.map("".join), _KV.map("".join),
                           _pick("a", " ", "\n", "'", "@", "/", ":", "=", "&", "x1", "://")), max_size=8).map("".join)


def visible(text: str, origin: list[int]) -> tuple[str, list[int]]:
    """``text`` masked as the reference masks it, and for each character kept its ``origin`` (-1: a mask)."""
    for pattern in _REFERENCE:
        out, out_origin, last = [], [], 0
        for m in pattern.finditer(text):
            start, end = m.span("secret")
            out += [text[last:start], MASK]
            out_origin += origin[last:start] + [-1] * len(MASK)
            last = end
        out.append(text[last:])
        text, origin = "".join(out), out_origin + origin[last:]
    return text, origin


@hypothesis.settings(max_examples=1000, deadline=None)
@hypothesis.given(TEXTS, st.data())
def test_masking_masks_what_it_did_and_a_cut_shows_nothing_the_whole_text_hides(text: str, data: st.DataObject) -> None:
    masked, kept = visible(text, list(range(len(text))))
    assert mask_secrets(text) == masked
    hidden = set(range(len(text))) - set(kept)
    n = data.draw(st.integers(0, len(text)), label="cut at")
    cut = mask_cut(text[:n])
    origin = list(range(n)) if cut == text[:n] else [*range(len(cut) - len(MASK)), *[-1] * len(MASK)]
    shown, shown_origin = visible(cut, origin)
    assert mask_secrets(cut) == shown
    assert hidden.isdisjoint(shown_origin), shown


@pytest.mark.parametrize(("prefix", "masked"), [
    ("dsn postgresql://ex:hunt", "dsn postgresql://ex:***"),
    ("dsn postgresql://ex:hunter2@db/x and postgresql://ex:s3", "dsn postgresql://ex:hunter2@db/x and postgresql://ex:***"),
    ("host=db password='hunter 2", "host=db password=***"),
    ("host=db password=hunt", "host=db password=hunt"),  # mask_secrets masks it: its end is no different
    ("http://host:80", "http://host:***"),  # a port looks like a password cut short: masked too
    ("postgresql://ex", "postgresql://ex"),
    ("a plain text", "a plain text"),
])
def test_a_prefix_ending_inside_a_secret_has_it_masked(prefix: str, masked: str) -> None:
    assert mask_cut(prefix) == masked


@pytest.mark.timeout(60)
def test_masking_takes_linear_time_whatever_the_text() -> None:
    """4 MB of letters: about 3 hours each with the former URL pattern (6.7 s at 100 KB, n²), a second here."""
    n = 4_000_000
    assert mask_secrets("a" * n) == "a" * n
    assert mask_secrets("a" * n + "://" + "b" * n) == "a" * n + "://" + "b" * n
    assert mask_secrets("a" * n + "://u:hunter2@db") == "a" * n + "://u:***@db"
    assert mask_cut("a" * n + "://u:" + "p" * n) == "a" * n + "://u:***"
    m = n // 4
    for text in ("1" * m + "://", "+" * m, "a://" + "b:" * m, "a://u:" + ":" * m, "x://u:v" * (m // 7),
                 "password='" + "x" * m, "password" + " " * m, "password=" + " " * m, "password='a " * (m // 12),
                 "PaSsWoRd" * (m // 8), "ssl" * (m // 3), "a1+.-" * (m // 5)):
        mask_secrets(text)
        mask_cut(text)


def test_render_settings_masks_secrets_notes_overrides_and_reloads(tmp_path: Path) -> None:
    path = write(tmp_path, "[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\nsasl_username = 'ex'\n")
    env = {"EXCHANGE_KAFKA_SASL_PASSWORD": "kafka-secret", "EXCHANGE_POSTGRES_DSN": "postgresql://u:dsn-secret@db/x",
           "EXCHANGE_POSTGRES_PASSWORD": "pg-secret"}
    text = render_settings(load_settings(path, env=env), env=env)
    for secret in env.values():
        assert secret not in text.replace("postgresql://u:***@db/x", "")
    assert "kafka-secret" not in text
    assert "dsn-secret" not in text
    assert 'sasl_password = "***"  # from EXCHANGE_KAFKA_SASL_PASSWORD' in text
    again = tomllib.loads(text)
    assert again["kafka"]["sasl_username"] == "ex"
    assert again["instruments"][0]["tick_size"] == "0.01"
    reloaded = tmp_path / "again.toml"
    reloaded.write_text(text)
    assert load_settings(reloaded, env={}).instruments == load_settings(path, env=env).instruments


def test_config_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXCHANGE_POSTGRES_PASSWORD", "cli-secret")
    good = write(tmp_path, "")
    assert main(["config", "check", "--config", str(good)]) == 0
    out = capsys.readouterr()
    assert 'password = "***"  # from EXCHANGE_POSTGRES_PASSWORD' in out.out
    assert "cli-secret" not in out.out + out.err
    assert "OK (1 instruments)" in out.err
    bad = write(tmp_path, "[http]\nhots = '0.0.0.0'\n")
    assert main(["config", "check", "--config", str(bad)]) == 2
    assert "[http]: unknown key 'hots'" in capsys.readouterr().err


def test_no_log_call_passes_a_dsn_or_password() -> None:
    """Defence in depth besides the masking processor: no logging call in the package names a DSN or a secret."""
    offenders = []
    for path in sorted((ROOT / "exchange").rglob("*.py")) + sorted((ROOT / "recovery").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("debug", "info", "warning", "error", "critical", "exception")):
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    names = {n.id for n in ast.walk(arg) if isinstance(n, ast.Name)}
                    names |= {n.attr for n in ast.walk(arg) if isinstance(n, ast.Attribute)}
                    names |= {k.arg or "" for k in node.keywords}
                    if any(w in name.lower() for name in names for w in ("dsn", "password", "secret", "token")):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
