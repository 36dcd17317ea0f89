"""The reactor's deadlines, without a server or a clock (onebox/timers.py): fixed waits expire
in their tables' order, moving deadlines lazily from a heap (pushed again when progress moved
them, dropped once their wait is over), a drain caps deadlines, and the sizes any thread may
read. Times are plain numbers. The end-to-end timeouts are tested in test_slow_clients.py."""
import pytest

from onebox.handoff import Connection, Wait
from onebox.timers import Timers


def conn_waiting(wait=None, deadline=0.0):
    conn = Connection(None, "192.0.2.1")
    conn.waiting, conn.deadline = wait, deadline
    return conn


def names(over, conns):
    return [(next(name for name, conn in conns.items() if conn is each), wait.name)
            for each, wait in over]


# (id, [(name, fixed wait, deadline)] parked in this order, now, what is over, next deadline)
FIXED = [
    ("nothing over: the soonest deadline", [("a", Wait.HEAD, 5.0), ("b", Wait.IDLE, 3.0)],
     2.5, [], 3.0),
    ("nothing anywhere: a second from now at most", [], 1.0, [], 2.0),
    ("a deadline past the horizon: the horizon", [("a", Wait.IDLE, 9.0)], 1.0, [], 2.0),
    ("over, in table order (handshake, new, head, idle, linger), oldest first",
     [("l", Wait.LINGER, 1.0), ("h1", Wait.HEAD, 0.5), ("h2", Wait.HEAD, 1.0),
      ("h3", Wait.HEAD, 1.5), ("n", Wait.NEW, 0.2), ("t", Wait.HANDSHAKE, 0.9)],
     1.0, [("t", "handshake"), ("n", "new"), ("h1", "head"), ("h2", "head"),
           ("l", "linger")], 1.5),
    ("a table stops at its first entry not over (insertion order is deadline order)",
     [("i1", Wait.IDLE, 0.5), ("i2", Wait.IDLE, 1.8), ("i3", Wait.IDLE, 0.7)],
     1.0, [("i1", "idle")], 1.8),
]


@pytest.mark.parametrize("parks, now, over, soonest", [row[1:] for row in FIXED],
                         ids=[row[0] for row in FIXED])
def test_fixed_waits_expire_in_table_order(parks, now, over, soonest):
    timers, conns = Timers(), {}
    for name, wait, deadline in parks:
        conns[name] = conn_waiting(wait)
        timers.park(conns[name], wait, deadline)
    expired, next_at = timers.expire(now)
    assert (names(expired, conns), next_at) == (over, soonest)
    # entries stay until the reactor ends their waits: asked again, the same answer
    again, again_at = timers.expire(now)
    assert (list(again), again_at) == (list(expired), next_at)


def test_a_parked_connection_moves_between_fixed_tables():
    timers, conn = Timers(), conn_waiting(Wait.NEW)
    timers.park(conn, Wait.NEW, 5.0)
    timers.park(conn, Wait.HEAD, 7.0, was=Wait.NEW)   # its first byte came
    assert timers.sizes() == {"handshake": 0, "new": 0, "head": 1, "idle": 0, "linger": 0,
                              "timed": 0}
    assert timers.first(Wait.HEAD) is conn and timers.first(Wait.NEW) is None
    timers.unpark(conn, Wait.HEAD)
    assert timers.first(Wait.HEAD) is None and list(timers.expire(10.0)[0]) == []


def test_a_drain_caps_deadlines_and_keeps_the_order():
    timers = Timers()
    early, late, new = conn_waiting(Wait.IDLE), conn_waiting(Wait.IDLE), conn_waiting(Wait.NEW)
    timers.park(early, Wait.IDLE, 1.0)
    timers.park(late, Wait.IDLE, 9.0)
    timers.park(new, Wait.NEW, 8.0)
    timers.cap((Wait.IDLE, Wait.NEW), 2.0)
    assert list(timers.parked[Wait.IDLE].items()) == [(early, 1.0), (late, 2.0)]
    assert timers.parked[Wait.NEW][new] == 2.0
    assert [conn for conn, _ in timers.expire(2.0)[0]] == [new, early, late]


# Moving deadlines: (id, [(name, wait, deadline when pushed, deadline now, waiting now)],
# now, what is over, next deadline)
MOVING = [
    ("over, soonest first", [("a", Wait.BODY, 3.0, 3.0, Wait.BODY),
                             ("b", Wait.SEND, 2.0, 2.0, Wait.SEND),
                             ("c", Wait.BODY, 9.0, 9.0, Wait.BODY)],
     5.0, [("b", "send"), ("a", "body")], 6.0),
    ("progress moved a deadline: pushed again, not over",
     [("a", Wait.BODY, 3.0, 5.5, Wait.BODY)], 5.0, [], 5.5),
    ("a wait over (or changed) by then: a stale entry, dropped",
     [("a", Wait.BODY, 3.0, 3.0, None), ("b", Wait.BODY, 3.0, 3.0, Wait.SEND),
      ("c", Wait.SEND, 4.0, 4.0, Wait.SEND)], 5.0, [("c", "send")], 6.0),
    ("a connection pushed twice (two waits of the same kind) is over once",
     [("a", Wait.BODY, 3.0, 3.0, Wait.BODY), ("a", Wait.BODY, 4.0, 4.0, Wait.BODY)],
     5.0, [("a", "body")], 6.0),
]


@pytest.mark.parametrize("pushes, now, over, soonest", [row[1:] for row in MOVING],
                         ids=[row[0] for row in MOVING])
def test_moving_deadlines_expire_lazily(pushes, now, over, soonest):
    timers, conns = Timers(), {}
    for name, wait, deadline, _, _ in pushes:
        conn = conns.setdefault(name, conn_waiting())
        conn.waiting, conn.deadline = wait, deadline
        timers.push(conn, wait)
    for name, _, _, deadline, waiting in pushes:   # what happened since
        conns[name].deadline, conns[name].waiting = deadline, waiting
    expired, next_at = timers.expire(now)
    assert (names(expired, conns), next_at) == (over, soonest)
    # what is over is out of the heap; what moved is still in it, at its new deadline
    expired, _ = timers.expire(now)
    assert list(expired) == []


def test_fixed_waits_are_over_before_moving_ones():
    timers, head, body = Timers(), conn_waiting(Wait.HEAD), conn_waiting(Wait.BODY, 1.0)
    timers.push(body, Wait.BODY)
    timers.park(head, Wait.HEAD, 2.0)
    assert list(timers.expire(3.0)[0]) == [(head, Wait.HEAD), (body, Wait.BODY)]


def test_sizes_timed_connections_and_clear():
    timers = Timers()
    body, stale = conn_waiting(Wait.BODY, 4.0), conn_waiting(Wait.SEND, 4.0)
    timers.push(body, Wait.BODY)
    timers.push(body, Wait.BODY)   # (pushed again: listed once)
    timers.push(stale, Wait.SEND)
    stale.waiting = None
    timers.park(conn_waiting(Wait.LINGER), Wait.LINGER, 1.0)
    assert timers.sizes() == {"handshake": 0, "new": 0, "head": 0, "idle": 0, "linger": 1,
                              "timed": 3}   # stale entries counted until they come up
    assert timers.timed_connections() == [body]
    timers.clear()
    assert timers.sizes() == dict.fromkeys(("handshake", "new", "head", "idle", "linger",
                                            "timed"), 0)


def test_a_turn_before_the_soonest_deadline_looks_at_nothing():
    """Most reactor turns come before any deadline: expire() answers from its lower bound of
    every deadline held, without walking the tables; a park or push with an earlier deadline
    lowers the bound, so nothing is missed."""
    timers, idle = Timers(), conn_waiting(Wait.IDLE)
    timers.park(idle, Wait.IDLE, 30.0)
    assert list(timers.expire(1.0)[0]) == []          # a full look: the bound is now 2.0
    timers.parked[Wait.IDLE][idle] = 1.5               # (a table changed behind its back)
    assert list(timers.expire(1.6)[0]) == []          # before the bound: not looked at
    head = conn_waiting(Wait.HEAD)
    timers.park(head, Wait.HEAD, 1.7)                 # an earlier deadline lowers the bound
    assert names(timers.expire(1.8)[0], {"idle": idle, "head": head}) == [
        ("head", "head"), ("idle", "idle")]
    body = conn_waiting(Wait.BODY, 1.9)
    timers.expire(1.85)
    timers.push(body, Wait.BODY)
    assert names(timers.expire(1.95)[0], {"body": body, "idle": idle, "head": head}) == [
        ("head", "head"), ("idle", "idle"), ("body", "body")]
