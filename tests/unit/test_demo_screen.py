"""`exchange demo`'s live screen fits an 80-column terminal: no line wraps (a wrapped line breaks the redraw)."""

from __future__ import annotations

from exchange.cli.demo import _screen


def _row(symbol: str, bid: str, ask: str, seq: str) -> dict[str, str]:
    return {"instrument": symbol, "bid": bid, "ask": ask, "spread": "0.03", "trades/s": "1,234", "orders/s": "2,000",
            "p50": "0.4ms", "p99": "112.3ms", "seq": seq, "levels": "1240", "resyncs": "12"}


ROWS = [_row("BTC-USD", "12.3456 @ 29999.98", "30000.01 x 12.3456", "12345678"),
        _row("ETH-USD", "120.125 @ 3000.01", "3000.02 x 1.000", "9876543"),
        _row("SOL-USD", "1000.25 @ 150.125", "150.126 x 3.50", "456")]
INTRO = ["configuration: exchange/defaults/demo.toml", "started fresh: nothing stored in .exchange/demo.sqlite yet",
         "generating 2,000 orders/s (seed 1) over 3 instruments; Ctrl-C to stop"]


def test_the_screen_fits_80_columns_and_keeps_every_value() -> None:
    lines = _screen(INTRO, ROWS, 12.5, stopping=True, columns=80)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    for row in ROWS:
        for value in row.values():
            assert value in text, value
    for head in ("bid", "ask", "spread", "seq", "resyncs", "orders/s", "trades/s", "p50", "p99", "levels"):
        assert head in text
    assert "(stopping: draining, final snapshot)" in text
    book = [line for line in lines if line.startswith("BTC-USD")]
    assert len(book) == 2  # one line in each table


def test_a_narrower_terminal_cuts_lines_rather_than_wrapping_them() -> None:
    lines = _screen(INTRO, ROWS, 1.0, stopping=False, columns=50)
    assert max(map(len, lines)) <= 50
