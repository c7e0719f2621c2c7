"""Signed operator actions: HMAC-SHA256 over the canonical message, keys from the environment.

Operator actions travel in the orders topic, where any producer could write them. So ``halt``,
``resume``, ``clear``, ``snapshot``, the money movements ``deposit`` and ``withdraw`` (signed by the
funding system that moved the money) and a ``cancel_all`` sent for a client by an operator are
applied only when the message carries a valid, fresh signature::

    {"op": "halt", "instrument": "BTC-USD", "client_id": "ops-anna", "text": "news pending",
     "auth": {"key_id": "ops-2026", "ts_ms": 1700000000000, "signature": "5d41402a..."}}

- ``signature`` is the lowercase hex HMAC-SHA256, keyed with the secret of ``key_id``, of the
  **canonical message**: the whole message with ``auth.signature`` left out, as JSON with the keys of
  every object sorted, no whitespace and every non-ASCII character escaped as ``\\uXXXX`` — exactly
  Python's ``json.dumps(message, sort_keys=True, separators=(",", ":"))`` (:func:`canonical`). The
  key id and the signing time are inside what is signed.
- ``ts_ms`` must be within ``max_skew_ms`` of the message's own input time (its Kafka timestamp in
  the daemon, the line's ``ts_ns`` in ``exchange replay --verify-signatures``): the check uses only
  the message, never a clock, so a replay of the topic decides exactly as the live run did.
- Keys come from ``EXCHANGE_ADMIN_KEYS``: ``key_id:secret`` pairs separated by commas, so a new key
  can be added before the old one is removed (:func:`parse_keys`). No key: every operator action is
  refused.

A message that claims to be an operator action and fails any of this is not applied: the edge turns
it into a sequenced ``rejected`` event with reason ``not_authorized`` and the claimed operator in
``client_id``, journaled like every other outcome (the audit trail of attempts).

No I/O and no clock here: :class:`Verifier` is a pure function of the message and its input time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any

from exchange.settings import ConfigError

__all__ = ["ENV_KEYS", "OPERATOR_OPS", "AdminKeyError", "Verifier", "canonical", "parse_keys", "sign"]

ENV_KEYS = "EXCHANGE_ADMIN_KEYS"
OPERATOR_OPS = frozenset({"halt", "resume", "clear", "snapshot", "deposit", "withdraw"})  # and a cancel_all with "auth"
DEFAULT_MAX_SKEW_MS = 60_000
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class AdminKeyError(ConfigError):
    """``EXCHANGE_ADMIN_KEYS`` cannot be read; the message says how it must look."""


def parse_keys(text: str | None) -> dict[str, bytes]:
    """``"id1:secret1,id2:secret2"`` -> ``{id: secret}``; raises :class:`AdminKeyError` naming what is wrong.

    Key ids are 1-64 characters of letters, digits, ``.``, ``_`` and ``-``; a secret is everything after
    the first ``:`` up to the next comma (so it cannot hold a comma: use hex or base64)."""
    keys: dict[str, bytes] = {}
    if not text or not text.strip():
        return keys
    for n, item in enumerate(text.split(","), 1):
        item = item.strip()
        key_id, sep, secret = item.partition(":")
        if not sep or not _KEY_ID.fullmatch(key_id) or not secret:
            raise AdminKeyError(f"{ENV_KEYS}: entry {n} must be key_id:secret (key id of letters, digits, '.', '_' "
                            "or '-', a non-empty secret; entries separated by commas)")
        if key_id in keys:
            raise AdminKeyError(f"{ENV_KEYS}: key id {key_id!r} is given twice")
        keys[key_id] = secret.encode()
    return keys


def canonical(msg: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: ``msg`` without ``auth.signature``, keys sorted, compact, ASCII-escaped."""
    body = dict(msg)
    auth = body.get("auth")
    if isinstance(auth, Mapping):
        body["auth"] = {k: v for k, v in auth.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(msg: Mapping[str, Any], key_id: str, secret: bytes, ts_ms: int) -> dict[str, Any]:
    """``msg`` with its ``auth`` object: key id, signing time and signature."""
    body = {k: v for k, v in msg.items() if k != "auth"}
    body["auth"] = {"key_id": key_id, "ts_ms": ts_ms}
    body["auth"]["signature"] = hmac.new(secret, canonical(body), hashlib.sha256).hexdigest()
    return body


class Verifier:
    """Checks operator actions against ``keys`` (see the module docstring)."""

    def __init__(self, keys: Mapping[str, bytes], *, max_skew_ms: int = DEFAULT_MAX_SKEW_MS) -> None:
        self._keys = dict(keys)
        self.max_skew_ms = max_skew_ms

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def check(self, msg: Mapping[str, Any], input_ts_ns: int) -> str | None:
        """None if ``msg`` is validly signed and fresh at ``input_ts_ns``; else why not (a short text)."""
        auth = msg.get("auth")
        if auth is None:
            return "operator actions must be signed (auth with key_id, ts_ms and signature)"
        if not isinstance(auth, Mapping):
            return "auth must be an object with key_id, ts_ms and signature"
        key_id, ts_ms, signature = auth.get("key_id"), auth.get("ts_ms"), auth.get("signature")
        if not (isinstance(key_id, str) and isinstance(ts_ms, int) and not isinstance(ts_ms, bool)
                and isinstance(signature, str)):
            return "auth must be an object with key_id (string), ts_ms (integer) and signature (hex string)"
        if not self._keys:
            return "no operator keys are configured (EXCHANGE_ADMIN_KEYS): operator actions are refused"
        secret = self._keys.get(key_id)
        if secret is None:
            return f"unknown key id {key_id[:64]!r}"
        expected = hmac.new(secret, canonical(msg), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature[:128].lower()):
            return "the signature does not match the message"
        skew_ms = abs(ts_ms - input_ts_ns // 1_000_000)
        if skew_ms > self.max_skew_ms:
            return (f"the signature is stale: signed {skew_ms} ms away from the message's time "
                    f"(at most {self.max_skew_ms} ms)")
        return None
