"""The dedupe window: the client order ids of recently finished orders, per client and in all.

Pure: no I/O, no clock. :class:`DedupeWindow` is what an engine (and recovery's event applier) keeps;
:class:`NewestFirstWindow` rebuilds the same window from the finished orders read newest first, as
the stores do at start-up. The rule, why it can be kept incrementally and rebuilt exactly, the
structure and its memory per entry are in :class:`DedupeWindow`'s docstring.
"""

from __future__ import annotations

from collections import deque

__all__ = ["DedupeWindow", "NewestFirstWindow"]

_FIFO_AT = 32  # a client with more remembered ids than this gets a deque of them (see DedupeWindow)
_TOMBSTONE_SLACK = 64  # a sweep of the dedupe window's slots starts when its tombstones exceed live + this
_SWEEP_STEP = 4  # slots a sweep moves for every order remembered


class DedupeWindow:
    """The client order ids of recently finished orders: at most ``per_client`` a client, ``size`` in all.

    **The rule**, a pure function of the history of finished orders in the order
    the engine finished them (the store reproduces it as ``ORDER BY updated_seq,
    priority`` over the finished rows, see :mod:`exchange.projections.rows`): a
    finished order is remembered iff it is among its client's ``per_client`` (K)
    most recently finished orders AND among the ``size`` (N) most recent of the
    orders that pass that first test. So one client, however busy, counts at most
    K towards the cap: to push another client's id out it takes that client's own
    K later orders, or orders of at least N/K other clients. K above N behaves as N.

    Why an entry once forgotten never comes back (which is what lets an
    incremental structure evict and never re-admit): for an entry e, let n_c(e)
    be the number of orders of client c finished after e. The later orders that
    pass the per-client test are, for each client c, its K most recent, so
    min(K, n_c(e)) of them come after e: e is remembered iff n_own(e) < K and
    sum over c of min(K, n_c(e)) < N. Both quantities only grow as orders finish.

    Three consequences recovery relies on. (1) Whether e is remembered depends
    only on the orders finished after it, so a replay that knows only the orders
    finished after a snapshot remembers exactly the window's entries that finished
    after the snapshot, in the same order (:func:`recovery.rebuild.describe_difference`
    compares on that basis). (2) Remembering the entries of a window, oldest first,
    in a fresh window gives the same window and the same future: for a remembered
    e, min(K, n_c(e)) is the same counted in the window as in the whole history
    (every client holds at most K entries in the window, all of its latest).
    (3) Read newest first, the window is the orders whose client has fewer than K
    newer ones kept, until N are kept (:class:`NewestFirstWindow`, what the stores
    use at start-up).

    **The structure.** ``ids`` maps a client id to its remembered client order ids,
    each to its order id, in finish order (a dict keeps insertion order; an id is
    never overwritten: a client order id that is remembered, or live, cannot finish
    again); the matching hot path reads it directly. The slots, ``_clients`` (after
    ``_swept`` while a sweep runs), hold the client id of every finished order
    still counted, oldest first. An entry that leaves through the per-client bound
    is its client's oldest, so the slots a client lost that way are always its
    earliest ones: ``_dead`` counts them per client. These tombstones are dropped
    when they reach the front, and once they outnumber the live entries a sweep
    moves the slots, four for every order remembered, from ``_clients`` to
    ``_swept`` without them (a slot is a tombstone if its client has more
    tombstones than slots already swept): amortised O(1) an order, and never a
    pause (compacting a million-entry window at once took 0.25 s). The slots stay
    under about 2.7 times the live entries plus 90. Tombstones are counted, never
    matched by client order id, so an id reused after it was forgotten cannot be
    taken for its old slot (nor are order ids needed to tell them apart), and a
    slot holds no client order id, so a tombstone keeps none alive. The id a slot
    stands for is its client's oldest: the first key of its dict or, for a client
    past ``_FIFO_AT`` ids once it has forgotten one, the head of a deque of its
    ids, kept from then on until it has none (the first key of a dict that keeps
    losing its first keys is found by scanning the holes they leave; a client
    that has forgotten nothing has none). Recovery's event applier keeps a
    window too, so both rebuild the same one.

    Strings and integers in dictionaries and deques, not ``(client_id,
    client_order_id)`` tuples: the window holds up to a million entries per
    instrument, and each tuple would be an object the garbage collector tracks.
    Every order adds one, so they filled the collector's young generation, and a
    young collection (30 - 60 ms here, with the daemon's threshold) traversing tens
    of thousands of them fell into every 20 s of ``bench/e2e.py``'s phase 2.
    Strings, and dictionaries holding only strings and integers, are not tracked;
    a deque is, but there is one per client past ``_FIFO_AT`` ids, not one per entry.

    Memory per entry, a million entries, 64- and 10-character client order ids
    (tracemalloc: the ids and the order-id integers included, the client ids not,
    they exist anyway; ``.venv/bin/python -m tests.unit.dedupe_memory``):

    - 1,000 clients in turn: 193 and 139 bytes (184 and 132 MiB);
    - a million clients with one id each: 372 and 318 bytes (a dict per client);
    - one client, ``per_client`` = ``size``: 196 and 142 bytes;
    - 100,000 clients, one of them finishing nine orders in ten (past its bound:
      tombstones, sweeps, its deque of ids): 212 and 158 bytes;
    - one client at the default bound of 10,000: 216 and 162 bytes (2.1 MiB).

    The single FIFO this replaced cost about the same (199 and 145 bytes with
    1,000 clients, 388 and 334 with a million).
    """

    __slots__ = ("_clients", "_dead", "_fifos", "_swept", "_swept_counts", "_tombstones", "ids", "live",
                 "per_client", "size")

    def __init__(self, size: int, per_client: int) -> None:
        self.size = size
        self.per_client = min(per_client, size)
        self.ids: dict[str, dict[str, int]] = {}
        self.live = 0  # entries remembered: the sum of the lengths of ids' dictionaries
        self._clients: deque[str] = deque()  # the slots (after the swept ones), oldest first
        self._swept: deque[str] = deque()  # while a sweep runs: the slots it has kept, in front; else empty
        self._swept_counts: dict[str, int] | None = None  # while a sweep runs: client -> its slots in _swept
        self._dead: dict[str, int] = {}  # client -> how many of its earliest slots are tombstones
        self._tombstones = 0  # their sum
        self._fifos: dict[str, deque[str]] = {}  # clients past _FIFO_AT ids: their ids, oldest first

    def __len__(self) -> int:
        return self.live

    def remember(self, client_id: str, client_order_id: str, order_id: int) -> None:
        """An order finished: remember its id, and forget what the rule no longer keeps."""
        if not self.size:
            return
        done = self.ids.get(client_id)
        if done is None:
            done = self.ids[client_id] = {}
        elif client_order_id in done:
            raise ValueError(f"{client_id}/{client_order_id} finished (order {order_id}) while still remembered as "
                             f"order {done[client_order_id]}: a remembered client order id cannot be used again")
        done[client_order_id] = order_id
        self._clients.append(client_id)
        if self._fifos and (fifo := self._fifos.get(client_id)) is not None:
            fifo.append(client_order_id)  # (a client keeps its deque until it has no id left)
        if len(done) > self.per_client:
            if self.per_client == self.size:  # the client holds every entry: its oldest is the oldest
                self._forget_oldest()
            else:
                self._forget_own_oldest(client_id, done)
        elif self.live < self.size:
            self.live += 1
        else:
            self._forget_oldest()
        if self._swept_counts is not None:
            self._sweep()

    def get(self, client_id: str, client_order_id: str) -> int | None:
        """The order id a finished order in the window had, or None."""
        done = self.ids.get(client_id)
        return done.get(client_order_id) if done is not None else None

    def slots(self) -> int:
        """How many finished orders are counted: the live entries and the tombstones."""
        return len(self._swept) + len(self._clients)

    def entries(self) -> list[tuple[str, str, int]]:
        """``(client_id, client_order_id, order_id)``, oldest first (as in :class:`EngineState`)."""
        skip = dict(self._dead)
        items = {client: iter(done.items()) for client, done in self.ids.items()}
        out: list[tuple[str, str, int]] = []
        for slots in (self._swept, self._clients):
            for client in slots:
                n = skip.get(client)
                if n:
                    skip[client] = n - 1
                else:
                    out.append((client, *next(items[client])))
        return out

    def _oldest_of(self, client_id: str, done: dict[str, int]) -> str:
        """The client's oldest remembered id, taken off its deque if it has one. A client past ``_FIFO_AT`` ids
        gets its deque here, when it first forgets one (a dict losing its first keys would be scanned past the
        holes they leave): until then remembering costs no deque."""
        fifo = self._fifos.get(client_id) if self._fifos else None
        if fifo is None:
            if len(done) <= _FIFO_AT:
                return next(iter(done))
            fifo = self._fifos[client_id] = deque(done)
        return fifo.popleft()

    def _forget_own_oldest(self, client_id: str, done: dict[str, int]) -> None:
        """The client is past its bound: its oldest id leaves, and its slot becomes a tombstone."""
        del done[self._oldest_of(client_id, done)]
        self._dead[client_id] = self._dead.get(client_id, 0) + 1
        self._tombstones += 1
        if self._swept_counts is None and self._tombstones > self.live + _TOMBSTONE_SLACK:
            self._swept_counts = {}  # start a sweep

    def _forget_oldest(self) -> None:
        """The window is full: the oldest entry leaves (tombstones in front of it go first)."""
        dead = self._dead
        while True:
            if self._swept:
                client = self._swept.popleft()
                counts = self._swept_counts
                assert counts is not None
                if counts[client] == 1:
                    del counts[client]
                else:
                    counts[client] -= 1
            else:
                client = self._clients.popleft()
            n = dead.get(client) if dead else None
            if not n:
                break
            self._tombstones -= 1
            if n == 1:
                del dead[client]
            else:
                dead[client] = n - 1
        done = self.ids[client]
        del done[self._oldest_of(client, done)]
        if not done:
            del self.ids[client]
            self._fifos.pop(client, None)

    def _sweep(self) -> None:
        """Move up to ``_SWEEP_STEP`` slots past the sweep, dropping tombstones; at the end, the swept slots
        are the slots again."""
        counts = self._swept_counts
        assert counts is not None
        clients, swept, dead = self._clients, self._swept, self._dead
        for _ in range(_SWEEP_STEP):
            if not clients:
                self._clients, self._swept = swept, clients
                self._swept_counts = None
                return
            client = clients.popleft()
            n = dead.get(client)
            if n and n > counts.get(client, 0):  # one of the client's earliest slots: a tombstone
                self._tombstones -= 1
                if n == 1:
                    del dead[client]
                else:
                    dead[client] = n - 1
            else:
                swept.append(client)
                counts[client] = counts.get(client, 0) + 1


class NewestFirstWindow:
    """A :class:`DedupeWindow`'s entries rebuilt from finished orders read newest first (start-up).

    Feed :meth:`add` the finished orders in reverse finish order (``ORDER BY
    updated_seq DESC, priority DESC``) until it returns False: an order is kept
    while its client has fewer than ``per_client`` newer orders kept, until
    ``size`` are kept, which is the window's rule read backwards (see
    :class:`DedupeWindow`). Memory stays within the window: the kept entries and
    a count per client that has some. The number of rows read does not: when a
    few clients finish nearly every order, their rows beyond their newest K are
    read and skipped, up to every finished order of the instrument when fewer
    than N/K clients ever finished one.
    """

    __slots__ = ("_kept", "_seen", "per_client", "rows", "size")

    def __init__(self, size: int, per_client: int) -> None:
        self.size = size
        self.per_client = min(per_client, size)
        self.rows = 0  # rows read
        self._seen: dict[str, int] = {}  # client -> entries kept
        self._kept: list[tuple[str, str, int]] = []  # newest first

    def add(self, client_id: str, client_order_id: str, order_id: int) -> bool:
        """Take the next older finished order; False once the window is full (read no further)."""
        self.rows += 1
        kept = self._kept
        if len(kept) < self.size:
            seen = self._seen.get(client_id, 0)
            if seen < self.per_client:
                self._seen[client_id] = seen + 1
                kept.append((client_id, client_order_id, order_id))
        return len(kept) < self.size

    def __len__(self) -> int:
        return len(self._kept)

    def entries(self) -> list[tuple[str, str, int]]:
        """The window, oldest first (as :meth:`DedupeWindow.entries` and :class:`EngineState` list it)."""
        return self._kept[::-1]
