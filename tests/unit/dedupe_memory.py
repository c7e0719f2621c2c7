"""What one remembered finished order costs in a :class:`~exchange.core.dedupe.DedupeWindow` (not a test).

``.venv/bin/python -m tests.unit.dedupe_memory [N]`` fills windows of ``N`` (default 1,000,000)
entries, plus a fifth more so that evictions run (twelve times as many when one client finishes
nine orders in ten, so that the others fill the window and its tombstones and their sweeps reach
their steady state), and prints the traced memory per entry
(tracemalloc): the client order ids and order-id integers created for them count, the client
ids do not (they exist anyway: shared with the orders, the commands, everything else).
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

from exchange.core.dedupe import DedupeWindow


def per_entry(size: int, per_client: int, clients: int, id_len: int, busy: bool = False) -> tuple[float, int]:
    """Bytes per entry and entries held, for ``clients`` clients finishing orders in turn (with ``busy``, the
    first of them finishes nine orders in ten: past its bound, it leaves a tombstone per order)."""
    names = [f"client-{i:07d}" for i in range(clients)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    window = DedupeWindow(size, per_client)
    pad = "x" * id_len
    for n in range(size + size // 5 if not busy else 12 * size):
        client = names[0] if busy and n % 10 else names[n % clients]
        window.remember(client, f"{n:010d}{pad}"[:id_len], 10**12 + n)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(window), len(window)


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    cases = [
        ("1,000 clients", 10_000, 1_000, False),
        (f"{size:,} clients, one id each", 10_000, size, False),
        ("one client, dedupe_per_client = dedupe_window", size, 1, False),
        ("one client, dedupe_per_client 10,000", 10_000, 1, False),
        (f"{size // 10:,} clients, one of them finishing 9 orders in 10", 10_000, size // 10, True),
    ]
    for id_len in (64, 10):
        for what, per_client, clients, busy in cases:
            cost, held = per_entry(size, per_client, clients, id_len, busy)
            print(f"{id_len:2d}-character ids, {what}: {cost:6.1f} bytes an entry ({held:,} entries, "
                  f"{cost * held / 2**20:,.1f} MiB)")


if __name__ == "__main__":
    main()
