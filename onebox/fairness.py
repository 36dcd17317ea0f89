"""Per-client fairness in the reactor: who holds how much, who waits in line, whom to cut.

A client is as the guard counts clients (an IPv4 address, an IPv6 /64). A trusted proxy's
connections are not counted at accept (their key is None), but its requests' waits are, by the
client each names (``Connection.wait_key``).

``Fairness``, the rules (issue 12, issue 19):
  - at most ``max_workers_per_client`` of a client's requests are in workers at once; the rest
    wait in its ready line (``Wait.READY``), first come first served;
  - at most ``max_waiting_per_client`` of its bodies and responses wait in the reactor at once;
    the rest wait in its wait line (``Wait.LINE``), unread and untimed;
  so one client's slowness costs others nothing.
  - at ``max_connections``, room is made before anyone is refused, from the clients that hold
    the most (issue 19: 130 addresses x 32 uploads that each kept the minimum rate held the whole
    cap, and a normal client got 503 for a minute): (1) a connection already answered and
    lingering to close; else (2) if the client holding the most connections holds more than the
    newcomer's client would with it, one of its connections, whatever it waits for, the
    cheapest first (``SHED_RANK``; one in a worker's handler never); else (3) the longest-idle
    kept connection (parked in the reactor, else one a worker holds). Else the newcomer is
    refused. So a client's allowance shrinks as the total grows: at the cap it is "fewer than
    the largest", and a client holding one connection is never refused while another holds
    more.

``MemoryBudget`` (``max_buffered_bytes``): whatever the reactor reads into a connection's buffer
(request heads, and the bodies it buffers), and TLS handshakes under way, are charged to the
connection and its client until a worker is done with the request (``Connection.charged``).
Past the budget, the waits of the clients charged the most are shed until it is 7/8 full, so
memory stays within the budget plus one read whatever the number of clients. Worst case:
``max_connections`` clients each sending a body at exactly the minimum rate hold the budget;
the largest holders are cut, and the rest go on.

These classes decide and count; the reactor moves connections (``Connection.waiting``) and does
the I/O. No sockets and no clock here: tests/test_fairness.py runs the rules as tables of events.
Owned by the reactor thread. Imports the standard library and onebox/handoff.py.
"""
import collections
import heapq

from onebox.handoff import Wait

# Which of a client's connections is taken first to make room at max_connections (lowest
# first): what it costs the client to lose it. None: kept, held by a worker (Workers._hold).
# A connection in a worker's handler (None, not held) is never a candidate.
# An event stream costs its browser a reconnect (and it resumes where it was): as cheap as idle.
SHED_RANK = {Wait.LINGER: 0, Wait.IDLE: 1, None: 1, Wait.EVENTS: 1, Wait.HANDSHAKE: 2,
             Wait.NEW: 2, Wait.HEAD: 3, Wait.LINE: 4, Wait.BODY: 5, Wait.SEND: 6, Wait.READY: 7}
# The waits whose charged memory can be given back by shedding them (a request in a worker
# cannot be shed: the rest of the memory is what it takes to make progress).
# (An event stream is charged the events its client has not taken: onebox/streams.py.)
CHARGED_WAITS = frozenset({Wait.HEAD, Wait.BODY, Wait.LINE, Wait.READY, Wait.HANDSHAKE,
                           Wait.EVENTS})


class Fairness:
    """Per client: connections (``opened``, ``closed``, ``holds``), workers (``may_work``,
    ``left_worker``, ``leave_ready_line``), body and send waits (``may_wait``, ``wait_over``,
    ``leave_wait_line``), and whom to close for room (``room``). The caps are attributes, set
    again on a reload (a line already formed drains by the new cap)."""

    def __init__(self, max_workers_per_client, max_waiting_per_client):
        self.max_workers_per_client = max_workers_per_client
        self.max_waiting_per_client = max_waiting_per_client
        # client key -> its open connections, oldest first (a dict used as an ordered set;
        # None: trusted proxies)
        self.connections = {}
        self.in_workers = {}     # client key -> its connections in workers
        self.ready_line = {}     # client key -> deque of connections waiting for a worker
        self.waits = {}          # wait key -> its active body and send waits
        self.wait_line = {}      # wait key -> deque of (connection, Wait) waiting to start one

    def use_settings(self, settings):
        """The caps of [server] ``settings`` from now on (at start and on a reload)."""
        self.max_workers_per_client = settings.max_workers_per_client
        self.max_waiting_per_client = settings.max_waiting_per_client

    # -- connections --------------------------------------------------------------------------
    def opened(self, conn):
        conns = self.connections.get(conn.client)
        if conns is None:
            conns = self.connections[conn.client] = {}
        conns[conn] = None

    def closed(self, conn):
        conns = self.connections[conn.client]
        del conns[conn]
        if not conns:
            del self.connections[conn.client]

    def holds(self, key):
        """How many connections client ``key`` has open."""
        return len(self.connections.get(key, ()))

    # -- workers ------------------------------------------------------------------------------
    def may_work(self, conn):
        """True (counted) if ``conn``'s request may go to a worker now; False: its client has
        max_workers_per_client there, and it is put at the end of the client's ready line."""
        key = conn.client
        if key is None:   # a trusted proxy, and the admin listener: never counted
            return True
        count = self.in_workers.get(key, 0)
        if count >= self.max_workers_per_client:
            self.ready_line.setdefault(key, collections.deque()).append(conn)
            return False
        self.in_workers[key] = count + 1
        return True

    def left_worker(self, conn):
        """``conn`` is back from a worker: the next of its client's ready line (taken out of
        it), whose turn it is now, or None."""
        key = conn.client
        if key not in self.in_workers:   # a trusted proxy (None) is never counted
            return None
        count = self.in_workers[key] - 1
        if count:
            self.in_workers[key] = count
        else:
            del self.in_workers[key]
        return self._next_in(self.ready_line, key)

    def lined_connections(self):
        """The connections in either line (ready, then wait), each once."""
        lined = [conn for queued in self.ready_line.values() for conn in queued]
        return lined + [conn for queued in self.wait_line.values() for conn, _ in queued]

    def leave_ready_line(self, conn):
        queued = self.ready_line.get(conn.client)
        if queued and conn in queued:
            queued.remove(conn)
            if not queued:
                del self.ready_line[conn.client]

    # -- body and send waits -----------------------------------------------------------------
    def may_wait(self, conn, wait):
        """True (counted) if ``conn`` may start its ``wait`` (body or send) now; False: its
        client has max_waiting_per_client, and it is put at the end of the client's line."""
        key = conn.wait_key
        if key is None:
            return True
        count = self.waits.get(key, 0)
        if count >= self.max_waiting_per_client:
            self.wait_line.setdefault(key, collections.deque()).append((conn, wait))
            return False
        self.waits[key] = count + 1
        return True

    def wait_over(self, conn):
        """``conn``'s body or send wait is over: (the next of its client's line, the wait it
        is for), taken out of the line, or None."""
        key = conn.wait_key
        if key is None:
            return None
        count = self.waits.get(key, 1) - 1
        if count:
            self.waits[key] = count
        else:
            self.waits.pop(key, None)
        return self._next_in(self.wait_line, key)

    def leave_wait_line(self, conn):
        queued = self.wait_line.get(conn.wait_key)
        if queued:
            for index, (waiting, _) in enumerate(queued):
                if waiting is conn:
                    del queued[index]
                    break
            if not queued:
                del self.wait_line[conn.wait_key]

    @staticmethod
    def _next_in(lines, key):
        queued = lines.get(key)
        if not queued:
            return None
        following = queued.popleft()
        if not queued:
            del lines[key]
        return following

    # -- room at max_connections --------------------------------------------------------------
    def room(self, newcomer, lingering, idle, held):
        """Whom to close, in the order to try, to make room for a connection of client
        ``newcomer`` (None: a trusted proxy's): pairs (connection, counted: the guard counts it
        as closed_for_room). ``lingering``, ``idle``: the connection that has lingered, and
        that has been idle, longest (or None); ``held``: the kept connections workers hold
        (a dict they change: a worker may take one back, so the reactor tries the next)."""
        if lingering is not None:   # (1) answered already
            yield lingering, False
            return
        victim = self.cheapest_of_largest(newcomer, held)   # (2)
        if victim is not None:
            yield victim, True
        if idle is not None:   # (3) the longest idle, parked in the reactor, else held
            yield idle, False
            return
        for conn in sorted(list(held), key=lambda kept: kept.idle_since):
            yield conn, True

    def cheapest_of_largest(self, newcomer, held):
        """The cheapest to lose (SHED_RANK; of equals, the oldest) of the connections of the
        client holding the most, if it holds more than ``newcomer``'s would with one more;
        else None."""
        largest, most = None, 0
        for key, conns in self.connections.items():   # a trusted proxy (None) speaks for many
            if key is not None and len(conns) > most:
                largest, most = key, len(conns)
        has = self.holds(newcomer) if newcomer is not None else 0
        if largest is None or has + 1 >= most:
            return None
        candidates = [conn for conn in self.connections[largest]
                      if conn.waiting is not None or conn in held]
        # min keeps the first of equals: the oldest
        return min(candidates, key=lambda conn: SHED_RANK[conn.waiting]) if candidates else None


class MemoryBudget:
    """Bytes the reactor holds for connections, against ``limit_bytes`` (max_buffered_bytes):
    ``charge``, ``uncharge``; past the limit, ``victims()`` says whom to shed."""

    def __init__(self, limit_bytes):
        self.limit_bytes = limit_bytes
        self.held = 0         # bytes charged, all connections
        self.by_key = {}      # client key -> [bytes charged, its charged connections]

    def charge(self, conn, size, key):
        """Count ``size`` bytes ``conn`` holds against the budget, and against ``key``'s
        share (the client as the guard counts it; for a body, the one a trusted proxy names).
        A connection is counted against the key of its first charge until uncharged."""
        if not size:
            return
        if not conn.charged:
            conn.charge_key = key
            entry = self.by_key.get(key)
            if entry is None:
                entry = self.by_key[key] = [0, set()]
            entry[1].add(conn)
        else:
            entry = self.by_key[conn.charge_key]
        entry[0] += size
        conn.charged += size
        self.held += size

    def uncharge(self, conn):
        """Give back all ``conn`` holds (a worker is done with its request, or it closed)."""
        key = conn.charge_key
        entry = self.by_key[key]
        entry[0] -= conn.charged
        entry[1].discard(conn)
        if not entry[1]:
            del self.by_key[key]
        self.held -= conn.charged
        conn.charged = 0
        conn.charge_key = None

    def victims(self):
        """Past the limit: the connections to shed, one at a time, the largest charged wait
        (CHARGED_WAITS) of whichever client holds the most at that moment, until 7/8 of the
        limit is held (so that a flood sheds in batches, not at every read). The caller sheds
        (uncharges) each one before asking for the next."""
        target = self.limit_bytes - self.limit_bytes // 8
        heap = [(-entry[0], id(key), key) for key, entry in self.by_key.items()]
        heapq.heapify(heap)
        while heap and self.held > target:
            _, _, key = heapq.heappop(heap)
            entry = self.by_key.get(key)
            if entry is None:
                continue
            sheddable = [conn for conn in entry[1] if conn.waiting in CHARGED_WAITS]
            if not sheddable:
                continue
            yield max(sheddable, key=lambda conn: conn.charged)
            entry = self.by_key.get(key)
            if entry is not None:
                heapq.heappush(heap, (-entry[0], id(key), key))
