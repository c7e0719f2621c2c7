"""`exchange watch`: the screen fits a terminal, silence is said, pipes get plain lines, a stale first key is no gap."""

from __future__ import annotations

from typing import Any

import pytest

from exchange.cli.watch import Follower, plain_line, render
from exchange.projections.booksync import OK, RESYNC, BookSync
from exchange.settings import RedisSettings


def _image(seq: int, levels: int = 15) -> dict[str, Any]:
    return {"type": "book", "instrument": "BTC-USD", "seq": seq, "last_trade_id": 0, "depth": 0,
            "bids": [[f"{29999.98 - i:.2f}", "0.0030"] for i in range(levels)],
            "asks": [[f"{30000.01 + i:.2f}", "0.0100"] for i in range(levels)]}


def _follower(*, levels: int = 15, trades: int = 20, notes: int = 5) -> Follower:
    f = Follower(RedisSettings(heartbeat_interval_s=1.0), "BTC-USD")
    f.connected = True
    assert f.sync.on_book(_image(10, levels))
    f.sync.on_message({"type": "trades", "instrument": "BTC-USD", "seq": 11, "trades": [
        {"trade_id": n, "seq": 11, "price": "30000.01", "qty": "0.0010", "side": "buy"} for n in range(1, trades + 1)]})
    for n in range(notes):
        f.note(f"gap: something {n}; resyncing from the book key")
    f.last_message_at = f.started_at
    return f


@pytest.mark.parametrize(("columns", "rows"), [(80, 24), (80, 12), (100, 50), (40, 8)])
def test_the_screen_fits_the_terminal_with_the_best_levels_the_spread_and_the_latest_trade(columns: int,
                                                                                         rows: int) -> None:
    f = _follower()
    screen = render(f, 10, (columns, rows), now=f.started_at + 0.5).split("\n")
    assert len(screen) <= rows - 1, "\n".join(screen)  # the last row keeps the cursor: nothing scrolls away
    assert all(len(line) <= columns for line in screen)
    text = "\n".join(screen)
    assert "29999.98" in text
    assert "30000.01" in text
    assert "spread 0.03" in text
    if rows >= 24:
        assert "#20" in text  # the latest trade
        assert "gap: something 4" in text  # the latest note
    if rows >= 50:
        assert "29990.98" in text
        assert "30009.01" in text
    if rows == 24:
        bids = [line for line in screen if line.endswith(".98")]
        assert 4 <= len(bids) < 10, "\n".join(screen)  # fewer levels on a short terminal, but some


def test_without_a_size_every_level_asked_for_is_shown() -> None:
    screen = render(_follower(), 10)
    assert "29990.98" in screen
    assert "29989.98" not in screen


def test_silence_is_said_plainly_after_three_heartbeat_intervals() -> None:
    f = _follower()
    assert "SILENT" not in render(f, 10, (80, 24), now=f.started_at + 2.9)
    screen = render(f, 10, (80, 24), now=f.started_at + 7.2)
    assert "SILENT: nothing for 7 s (a heartbeat is due every 1 s); is the daemon running?" in screen
    assert "silent 7s" in plain_line(f, now=f.started_at + 7.2)
    assert "silent" not in plain_line(f, now=f.started_at + 1.0)


def test_a_pipe_gets_readable_lines_not_tuples() -> None:
    line = plain_line(_follower(), now=0.0)
    assert line == "BTC-USD seq 10 bid 29999.98 x 0.0030 ask 30000.01 x 0.0100 spread 0.03 gaps 0 resyncs 0"
    empty = Follower(RedisSettings(), "BTC-USD")
    assert plain_line(empty, now=empty.started_at).startswith("BTC-USD seq - bid - ask - spread - gaps 0")
    assert "(" not in line
    assert "'" not in line


def _l2(prev: int, seq: int, sync_after: BookSync) -> dict[str, Any]:
    return {"type": "l2", "instrument": "BTC-USD", "prev_seq": prev, "seq": seq, "bids": [["29999.98", "0.0040"]],
            "asks": [], "checksum": sync_after.checksum()}


def _checksum_after(image: dict[str, Any]) -> BookSync:
    expected = BookSync("BTC-USD")
    expected.on_book({**image, "bids": [["29999.98", "0.0040"], *image["bids"][1:]]})
    return expected


def test_a_book_key_older_than_the_first_message_is_read_again_without_counting_a_gap() -> None:
    sync = BookSync("BTC-USD")
    assert sync.on_book(_image(5))  # the key, written before messages 6-8 that this subscriber never got
    msg = _l2(8, 9, _checksum_after(_image(8)))
    assert sync.on_message(msg) == RESYNC
    assert (sync.gaps, sync.resyncs, sync.stale_images, sync.synced) == (0, 0, 1, False)
    assert sync.on_book(_image(8))  # the key read again: the buffered message follows it
    assert sync.seq == 9
    assert sync.levels(True, 1) == [("29999.98", "0.0040")]
    # from now on the stream is confirmed: a message that skips seqs is a gap
    assert sync.on_message(_l2(12, 13, sync)) == RESYNC
    assert (sync.gaps, sync.stale_images) == (1, 1)


def test_a_heartbeat_ahead_of_the_first_key_is_no_gap_but_one_after_confirmation_is() -> None:
    sync = BookSync("BTC-USD")
    assert sync.on_book(_image(5))
    assert sync.on_message({"type": "heartbeat", "instrument": "BTC-USD", "seq": 7}) == RESYNC
    assert (sync.gaps, sync.stale_images) == (0, 1)
    assert sync.on_book(_image(7))
    assert sync.on_message({"type": "heartbeat", "instrument": "BTC-USD", "seq": 7}) == OK
    assert sync.on_message({"type": "heartbeat", "instrument": "BTC-USD", "seq": 8}) == RESYNC
    assert sync.gaps == 1
