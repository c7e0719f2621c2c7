"""Property test: the incremental dedupe window is the rule applied to the whole history.

Random histories of finished orders -- several clients, client order ids reused
once they are forgotten (as the engine allows), small ``dedupe_per_client`` (K)
and ``dedupe_window`` (N) -- go through :class:`exchange.core.dedupe.DedupeWindow`
one finish at a time. After every finish its entries must equal
:func:`tests.property.reference.dedupe_window` of the history so far, and its
lookups must agree with them; at the end a window restored from the entries,
and the newest-first rebuild the stores use (:class:`NewestFirstWindow`), must
agree too, and the restored window must go on exactly like the original.
Histories long enough for clients past ``_FIFO_AT`` ids and for sweeps of the
tombstones are drawn as well.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.core.dedupe import _FIFO_AT, DedupeWindow, NewestFirstWindow

from .reference import dedupe_window

CLIENTS = ["a", "b", "c", "d"]

# a finish: (client, client order id number); a low number is likely reused
finishes = st.tuples(st.sampled_from(CLIENTS[:1] * 3 + CLIENTS), st.integers(0, 12))


def _feed(window: DedupeWindow, history: list[tuple[str, str, int]], steps: list[tuple[str, int]],
          per_client: int | None = None) -> None:
    """Finish ``steps`` one by one; with ``per_client`` (K as configured, maybe above N) check each against the
    reference."""
    for client, n in steps:
        coid = f"k{n}"
        if window.get(client, coid) is not None:
            continue  # remembered: the engine would reject it as a duplicate, so it cannot finish
        oid = len(history) + 1
        window.remember(client, coid, oid)
        history.append((client, coid, oid))
        if per_client is not None:
            expected = dedupe_window(history, window.size, per_client)
            assert window.entries() == expected
            assert len(window) == len(expected) == sum(map(len, window.ids.values()))
            assert all(window.ids.values()), "a client without remembered ids keeps an entry"
            assert {(c, k): o for c, k, o in expected} == {(c, k): o for c, d in window.ids.items()
                                                              for k, o in d.items()}
            assert window.slots() <= 3 * len(window) + 90


def _agree_at_the_end(window: DedupeWindow, history: list[tuple[str, str, int]],
                      more: list[tuple[str, int]]) -> None:
    entries = window.entries()
    rebuilt = NewestFirstWindow(window.size, window.per_client)
    for entry in reversed(history):
        if not rebuilt.add(*entry):
            break
    assert rebuilt.entries() == entries
    restored = DedupeWindow(window.size, window.per_client)
    for entry in entries:
        restored.remember(*entry)
    assert restored.entries() == entries
    copy = list(history)
    _feed(window, history, more)
    _feed(restored, copy, more)
    assert restored.entries() == window.entries()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 9), per_client=st.integers(1, 6), steps=st.lists(finishes, max_size=80),
       more=st.lists(finishes, max_size=20))
def test_the_window_is_the_rule_over_the_history(size: int, per_client: int, steps: list[tuple[str, int]],
                                                  more: list[tuple[str, int]]) -> None:
    window = DedupeWindow(size, per_client)
    history: list[tuple[str, str, int]] = []
    _feed(window, history, steps, per_client)
    _agree_at_the_end(window, history, more)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(_FIFO_AT, 3 * _FIFO_AT), per_client=st.integers(_FIFO_AT - 2, 2 * _FIFO_AT),
       steps=st.lists(st.tuples(st.sampled_from(["a"] * 4 + CLIENTS), st.integers(0, 200)), min_size=100,
                      max_size=300),
       more=st.lists(finishes, max_size=40))
def test_long_histories_with_busy_clients(size: int, per_client: int, steps: list[tuple[str, int]],
                                          more: list[tuple[str, int]]) -> None:
    """Clients past ``_FIFO_AT`` ids (a deque of their ids) and enough tombstones for sweeps."""
    window = DedupeWindow(size, per_client)
    history: list[tuple[str, str, int]] = []
    _feed(window, history, steps)
    assert window.entries() == dedupe_window(history, size, per_client)
    _agree_at_the_end(window, history, more)
