"""A/B benchmark: ``bench/e2e.py`` alternately from two checkouts, each running its own code.

    python bench/ab.py /path/to/old /path/to/new --pairs 10          # old, new, old, new, ...
    python bench/ab.py OLD NEW --pairs 3 -- --seconds 0               # arguments after -- go to e2e.py

Each run is ``python bench/e2e.py`` (this interpreter) started in its checkout's directory with
``PYTHONPATH`` set to it, so the benchmark and the daemon it starts (``python -m exchange``: the same
interpreter, working directory and environment) import that checkout's code rather than the package
installed in the interpreter's environment (an editable install of either). Before the first run the
script checks where each side imports ``exchange`` from; during each run it reads the last migration
the daemon applied to the benchmark's fresh database (the ``schema`` column), which tells the two sides
apart whenever their migrations differ. Runs never overlap, and they alternate so that a slow spell of
the shared machine falls on both sides.

Per run it prints phase 1's throughput (orders/s) and phase 2's p50 and p99 (ms); at the end, per
side, the median and the range of each, and the new/old ratio of each pair. Every run's full output
is kept in ``--logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import asyncpg

_THROUGHPUT = re.compile(r"e2e throughput: .* = ([\d,]+) orders/s")
_LATENCY = re.compile(r"e2e latency at .*: p50 ([\d.]+) ms, p99 ([\d.]+) ms")


def imported_from(checkout: Path) -> str:
    """Where ``exchange`` comes from for a process started as a run is."""
    return subprocess.run([sys.executable, "-c", "import exchange; print(exchange.__file__)"], cwd=checkout,
                          env=_env(checkout), capture_output=True, text=True, check=True).stdout.strip()


def _env(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout)}


async def _bench_databases(pg: str) -> set[str]:
    conn = await asyncpg.connect(pg)
    try:
        return {r[0] for r in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'exchange_bench_%'")}
    finally:
        await conn.close()


async def _last_migration(pg: str, database: str) -> str | None:
    with contextlib.suppress(Exception):  # not there yet, or already dropped
        conn = await asyncpg.connect(pg.rpartition("/")[0] + "/" + database)
        try:
            name = await conn.fetchval("SELECT max(name) FROM schema_migrations")
            return str(name) if name is not None else None
        finally:
            await conn.close()
    return None


async def _run(checkout: Path, e2e_args: list[str], pg: str, out: IO[bytes]) -> tuple[int, str | None]:
    """``bench/e2e.py`` in ``checkout``, its output to ``out``: its exit code, and the last migration its
    daemon applied to the benchmark's database."""
    before = await _bench_databases(pg)
    proc = await asyncio.create_subprocess_exec(sys.executable, "bench/e2e.py", *e2e_args, cwd=checkout,
                                                env=_env(checkout), stdout=out, stderr=subprocess.STDOUT)
    schema: str | None = None
    stable = False  # the same last migration seen twice: the daemon has migrated
    while proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 2)
        if not stable and proc.returncode is None:
            for database in await _bench_databases(pg) - before:
                seen = await _last_migration(pg, database)
                stable = seen is not None and seen == schema
                schema = seen or schema
    return proc.returncode, schema


def run_once(checkout: Path, e2e_args: list[str], pg: str, log: Path) -> dict[str, Any]:
    """One ``bench/e2e.py`` run in ``checkout``: its figures, the schema its daemon migrated to, its minutes."""
    started = time.monotonic()
    with log.open("wb") as out:
        code, schema = asyncio.run(_run(checkout, e2e_args, pg, out))
    text = log.read_text(errors="replace")
    throughput, latency = _THROUGHPUT.search(text), _LATENCY.search(text)
    if code != 0 or throughput is None:
        raise RuntimeError(f"{checkout}: bench/e2e.py failed (exit {code}); see {log}")
    return {"orders_per_s": int(throughput[1].replace(",", "")),
            "p50_ms": float(latency[1]) if latency else None, "p99_ms": float(latency[2]) if latency else None,
            "schema": schema, "minutes": round((time.monotonic() - started) / 60, 1)}


def _summary(name: str, runs: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in runs if r[key] is not None]
    if not values:
        return f"{name} {key}: -"
    return (f"{name} {key}: median {statistics.median(values):,.1f}, range {min(values):,.1f} - {max(values):,.1f} "
            f"({len(values)} runs)")


def main() -> None:
    argv = sys.argv[1:]
    e2e_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="the checkout run first in each pair")
    parser.add_argument("new", type=Path, help="the checkout run second in each pair")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--pg", default="postgresql://127.0.0.1:5432/test",
                        help="admin DSN (as bench/e2e.py's --pg; used to read the daemon's schema)")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/exchange-ab"), help="where each run's output goes")
    args = parser.parse_args(argv)
    if args.pg != "postgresql://127.0.0.1:5432/test" and "--pg" not in e2e_args:
        e2e_args += ["--pg", args.pg]
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    for name, checkout in sides.items():
        where = imported_from(checkout)
        print(f"{name}: {checkout} (exchange from {where})", flush=True)
        if not where.startswith(str(checkout) + os.sep):
            raise SystemExit(f"{name} would not run the code of {checkout}")
    args.logs.mkdir(parents=True, exist_ok=True)
    print(f"bench/e2e.py {' '.join(e2e_args)}; {args.pairs} pairs; logs in {args.logs}", flush=True)
    print(f"{'run':>4} {'side':>4} {'orders/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'min':>5}  schema", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for pair in range(args.pairs):
        for name, checkout in sides.items():
            run = run_once(checkout, e2e_args, args.pg, args.logs / f"{pair + 1:02d}-{name}.log")
            results[name].append(run)
            p50 = f"{run['p50_ms']:.1f}" if run["p50_ms"] is not None else "-"
            p99 = f"{run['p99_ms']:.1f}" if run["p99_ms"] is not None else "-"
            print(f"{pair + 1:>4} {name:>4} {run['orders_per_s']:>9,} {p50:>7} {p99:>7} {run['minutes']:>5}  "
                  f"{run['schema']}", flush=True)
    for key in ("orders_per_s", "p50_ms", "p99_ms"):
        for name in sides:
            print(_summary(name, results[name], key))
        ratios = [n[key] / o[key] for o, n in zip(results["old"], results["new"], strict=True)
                  if o[key] and n[key] is not None]
        if ratios:
            print(f"new/old {key} per pair: {', '.join(f'{r:.2f}' for r in ratios)}; median "
                  f"{statistics.median(ratios):.2f}; new higher in {sum(r > 1 for r in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
