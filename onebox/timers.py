"""The reactor's deadlines: when each connection's wait ends, and which have ended.

Two kinds of wait, two structures (see ``Wait`` in onebox/handoff.py for the waits):

- A fixed wait (``Wait.fixed``: handshake, new, head, idle, linger) has one timeout, so its
  table, an insertion-ordered dict of connection -> deadline, is in deadline order: expiring
  looks at the first entries only, and costs nothing per waiting connection. (An OrderedDict:
  a plain dict whose first entries are deleted again and again makes ``next(iter(...))`` scan
  the dead slots.) A connection parked with an earlier deadline than now + timeout (a kept
  connection a worker held, whose idle time began at its last response) keeps the order only
  roughly: it may outstay its time by as long as it was held.
- A body or send wait's deadline moves with progress (``Connection.deadline``), so it lives in
  a heap checked lazily: an entry whose connection has moved its deadline is pushed again when
  it comes up, and one whose connection waits for something else by then is dropped.

``Timers`` knows deadlines, not what ending a wait does: ``expire(now)`` returns what ended,
the reactor acts. It keeps a lower bound of every deadline it holds (``_next_at``: lowered by
each park and push, raised only by a full look), so a reactor turn before it costs one
comparison: deadlines only move later (``onebox.transfer.Pace.advance``), and a wait that ended
early leaves the bound early, which costs one full look, never a missed deadline. Nothing here reads a clock, so it is tested without one (tests/test_timers.py).
Owned by the reactor thread; ``sizes()`` is for any thread. Imports the standard library and
onebox/handoff.py.
"""
import collections
import heapq

from onebox.handoff import WAITS

_NONE_OVER = ()   # what expire() returns when nothing can be over


class Timers:
    """For the reactor: ``park``, ``unpark`` and ``first`` (fixed waits); ``push`` (moving
    deadlines); ``expire(now)``; ``cap`` (a drain shortens waits); ``clear`` (shutdown)."""

    def __init__(self):
        # Wait -> OrderedDict of connection -> deadline, one per fixed wait
        self.parked = {wait: collections.OrderedDict() for wait in WAITS if wait.fixed}
        self.timed = []          # heap of (deadline, sequence, conn, wait): body and send waits
        self._sequence = 0       # ties broken in push order; connections are never compared
        self._next_at = float("-inf")   # no deadline here is earlier (see the module docstring)

    # -- fixed waits ----------------------------------------------------------------------
    def park(self, conn, wait, deadline, was=None):
        """Put ``conn`` at the end of ``wait``'s table (out of ``was``'s, a fixed wait it is
        leaving)."""
        if was is not None:
            del self.parked[was][conn]
        self.parked[wait][conn] = deadline
        if deadline < self._next_at:
            self._next_at = deadline

    def unpark(self, conn, wait):
        del self.parked[wait][conn]

    def first(self, wait):
        """The connection that has waited longest in ``wait``'s table, or None."""
        table = self.parked[wait]
        return next(iter(table)) if table else None

    def cap(self, waits, until):
        """No deadline of these fixed waits past ``until`` (a drain gives idle and new
        connections little time); the order stays: an earlier deadline stays first."""
        for wait in waits:
            table = self.parked[wait]
            for conn, deadline in table.items():   # values change, the size does not
                if deadline > until:
                    table[conn] = until
        self._next_at = min(self._next_at, until)

    # -- moving deadlines -----------------------------------------------------------------
    def push(self, conn, wait):
        """Time ``conn``'s ``wait`` (body or send) by ``conn.deadline``, which may move later."""
        self._sequence += 1
        heapq.heappush(self.timed, (conn.deadline, self._sequence, conn, wait))
        if conn.deadline < self._next_at:
            self._next_at = conn.deadline

    # -- both ---------------------------------------------------------------------------------
    def expire(self, now, horizon_s=1.0):
        """The waits over at ``now``, as [(conn, wait)] in the order to end them (fixed waits
        first, each table oldest first; then moving ones, soonest first), and when the next one
        is over (at most ``horizon_s`` away). The reactor must end each one it is given: a
        fixed wait's entry stays in its table until it does."""
        if now < self._next_at:   # nothing can be over yet: most turns
            return _NONE_OVER, min(self._next_at, now + horizon_s)
        soonest = now + horizon_s
        over = []
        for wait, table in self.parked.items():
            for conn, deadline in table.items():
                if deadline > now:
                    soonest = min(soonest, deadline)
                    break
                over.append((conn, wait))
        timed, seen = self.timed, set()
        while timed:
            deadline, _, conn, wait = timed[0]
            if conn.waiting is not wait or conn in seen:
                heapq.heappop(timed)                 # ended (or here twice): a stale entry
            elif conn.deadline > deadline:           # progress moved it: look again later
                self._sequence += 1
                heapq.heapreplace(timed, (conn.deadline, self._sequence, conn, wait))
            elif deadline > now:
                soonest = min(soonest, deadline)
                break
            else:
                heapq.heappop(timed)
                seen.add(conn)
                over.append((conn, wait))
        # every first entry not over is at or after soonest; what is over ends now, and
        # what its ending starts is parked or pushed with a later deadline (or lowers this)
        self._next_at = now if over else soonest
        return over, soonest

    def parked_connections(self):
        """The connections in the fixed waits."""
        return [conn for table in self.parked.values() for conn in table]

    def timed_connections(self):
        """The connections in body and send waits (stale heap entries left out), each once."""
        return list({conn: None for _, _, conn, wait in self.timed if conn.waiting is wait})

    def clear(self):
        """Forget every wait (shutdown, once each connection is closed)."""
        for table in self.parked.values():
            table.clear()
        self.timed = []
        self._next_at = float("-inf")

    def sizes(self):
        """{wait name: connections in its table} for the fixed waits, and "timed": the heap's
        entries (stale ones too); safe from any thread: len() of a dict or list is atomic."""
        sizes = {wait.name: len(table) for wait, table in self.parked.items()}
        sizes["timed"] = len(self.timed)
        return sizes

