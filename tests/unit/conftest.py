from __future__ import annotations

from collections.abc import Iterator

import pytest

from exchange import MatchingEngine

from ._helpers import make_engine


@pytest.fixture
def engine() -> Iterator[MatchingEngine]:
    """A fresh engine for instrument ``T`` (tick 0.01, lot 1, no band, STP none); invariants checked at the end."""
    eng = make_engine()
    yield eng
    eng.book.check_invariants()
