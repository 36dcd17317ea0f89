"""The reactor's per-client rules, table-driven and without a server (onebox/fairness.py): the
worker and wait caps with their lines, whom to close for room at max_connections, and whom the
memory budget sheds; and the table of the waits' moves (onebox/handoff.py) that the reactor
checks. Each row is a list of events with what each one must answer; the end-to-end tests of the
same rules, over sockets, are in test_engine.py, test_slow_clients.py and test_floods.py."""
import types

import pytest

from onebox.fairness import SHED_RANK, Fairness, MemoryBudget
from onebox.handoff import WAIT_MOVES, WAITS, Connection, Wait
from onebox.reactor import IllegalMove, Reactor
from onebox.settings import load_config

SETTINGS = load_config(None).server


class Clients:
    """Connections by name: the letter is the client ("a1", "a2": client "a"); "p" names a
    trusted proxy's connection (client key None), whose requests' waits count for the client
    it names ("p1>a": waits counted as client "a"'s)."""

    def __init__(self):
        self.conns = {}

    def __getitem__(self, name):
        conn = self.conns.get(name)
        if conn is None:
            conn = self.conns[name] = Connection(None, "192.0.2.1")
            own, _, named = name.partition(">")
            conn.client = None if own[0] == "p" else own[0]
            conn.wait_key = named or conn.client
        return conn

    def name(self, conn):
        return next(name for name, known in self.conns.items() if known is conn)


def play(fair, clients, events):
    """Each event's answer: a bool, a count, a connection's name, (name, wait name) or None."""
    answers = []
    for op, name, *arg in events:
        conn = clients[name] if op != "holds" else None
        if op == "open":
            answer = fair.opened(conn)
        elif op == "close":
            answer = fair.closed(conn)
        elif op == "holds":
            answer = fair.holds(None if name == "p" else name)
        elif op == "work":
            answer = fair.may_work(conn)
        elif op == "left":
            following = fair.left_worker(conn)
            answer = following and clients.name(following)
        elif op == "unready":
            answer = fair.leave_ready_line(conn)
        elif op == "wait":
            answer = fair.may_wait(conn, arg[0])
        elif op == "over":
            following = fair.wait_over(conn)
            answer = following and (clients.name(following[0]), following[1].name)
        elif op == "unline":
            answer = fair.leave_wait_line(conn)
        answers.append(answer)
    return answers


# (id, max_workers_per_client, max_waiting_per_client, [(event..., answer)])
RULES = [
    ("connections are counted per client, oldest first", 2, 2, [
        ("open", "a1", None), ("open", "a2", None), ("open", "b1", None), ("open", "p1", None),
        ("holds", "a", 2), ("holds", "b", 1), ("holds", "p", 1), ("holds", "c", 0),
        ("close", "a1", None), ("holds", "a", 1), ("close", "a2", None), ("holds", "a", 0)]),
    ("workers: past the cap a request waits in its client's line, first come first served",
     2, 8, [
         ("work", "a1", True), ("work", "a2", True), ("work", "a3", False),
         ("work", "a4", False), ("work", "b1", True),   # another client is not held up
         ("left", "a1", "a3"), ("work", "a3", True),     # the reactor queues the one named
         ("left", "a2", "a4"), ("work", "a4", True),
         ("left", "a3", None), ("left", "a4", None), ("left", "b1", None),
         ("work", "a5", True), ("work", "a6", True), ("left", "a5", None),
         ("left", "a6", None)]),
    ("workers: a trusted proxy's requests are never counted", 1, 8, [
        ("work", "p1", True), ("work", "p2", True), ("work", "p3", True), ("left", "p1", None)]),
    ("workers: a request that leaves the line (closed) is not given a turn", 1, 8, [
        ("work", "a1", True), ("work", "a2", False), ("work", "a3", False),
        ("unready", "a2", None), ("left", "a1", "a3"), ("work", "a3", True),
        ("left", "a3", None)]),
    ("workers: a cap lowered by a reload sends a turn to the back of the line", 2, 8, [
        ("work", "a1", True), ("work", "a2", True), ("work", "a3", False),
        ("cap", "1", None),
        ("left", "a1", "a3"), ("work", "a3", False),   # still one in workers: 1 >= 1
        ("left", "a2", "a3"), ("work", "a3", True), ("left", "a3", None)]),
    ("waits: past the cap a body or send waits in line, with the wait it is for", 8, 2, [
        ("wait", "a1", Wait.BODY, True), ("wait", "a2", Wait.SEND, True),
        ("wait", "a3", Wait.SEND, False), ("wait", "a4", Wait.BODY, False),
        ("wait", "b1", Wait.BODY, True),
        ("over", "a2", ("a3", "send")), ("wait", "a3", Wait.SEND, True),
        ("over", "a1", ("a4", "body")), ("wait", "a4", Wait.BODY, True),
        ("over", "a3", None), ("over", "a4", None), ("over", "b1", None)]),
    ("waits: a trusted proxy's are counted by the client each names", 8, 1, [
        ("wait", "p1>a", Wait.BODY, True), ("wait", "p2>a", Wait.BODY, False),
        ("wait", "p3>b", Wait.BODY, True), ("wait", "a1", Wait.BODY, False),
        ("over", "p1>a", ("p2>a", "body")), ("wait", "p2>a", Wait.BODY, True),
        ("over", "p2>a", ("a1", "body")), ("wait", "a1", Wait.BODY, True),
        ("over", "a1", None), ("over", "p3>b", None)]),
    ("waits: one that leaves the line (closed) is not given a turn", 8, 1, [
        ("wait", "a1", Wait.BODY, True), ("wait", "a2", Wait.BODY, False),
        ("wait", "a3", Wait.SEND, False), ("unline", "a2", None),
        ("over", "a1", ("a3", "send")), ("wait", "a3", Wait.SEND, True), ("over", "a3", None)]),
]


@pytest.mark.parametrize("workers, waiting, events", [row[1:] for row in RULES],
                         ids=[row[0] for row in RULES])
def test_fairness_rules(workers, waiting, events):
    fair, clients = Fairness(workers, waiting), Clients()
    answers = []
    for event in events:
        if event[0] == "cap":
            fair.max_workers_per_client = int(event[1])
            answers.append(None)
        else:
            answers += play(fair, clients, [event[:-1]])
    assert answers == [event[-1] for event in events]
    if all(event[0] != "open" for event in events):
        # every count and line is given back once all is over: nothing leaks
        assert (fair.in_workers, fair.ready_line, fair.waits, fair.wait_line) == ({}, {}, {}, {})


# Room at max_connections. (id, {connection: its wait, or "held" (a worker holds it, kept),
# or "busy" (in a worker's handler)} opened in this order, lingering, idle, newcomer,
# the connections to try in order with whether they count as closed_for_room)
ROOM = [
    ("an answered connection lingering goes first, uncounted",
     {"a1": Wait.BODY, "a2": Wait.BODY, "a3": Wait.BODY, "b1": Wait.LINGER},
     "b1", None, "c", [("b1", False)]),
    ("else the largest client's cheapest: kept idle before a body",
     {"a1": Wait.BODY, "a2": Wait.IDLE, "a3": Wait.SEND, "b1": Wait.IDLE},
     None, "b1", "c", [("a2", True), ("b1", False)]),
    ("of equals, the oldest; a handler's request never",
     {"a1": "busy", "a2": Wait.BODY, "a3": Wait.BODY, "a4": Wait.READY},
     None, None, "c", [("a2", True)]),
    ("the cheapest by SHED_RANK: a head before a body, a body before a ready request",
     {"a1": Wait.READY, "a2": Wait.BODY, "a3": Wait.HEAD},
     None, None, "c", [("a3", True)]),
    ("a kept connection a worker holds ranks with the idle ones (tried once: its worker took "
     "it back)",
     {"a1": Wait.SEND, "a2": "held", "a3": Wait.BODY},
     None, None, "c", [("a2", True)]),
    ("not from a client that would hold no more than the newcomer: the idle one instead",
     {"a1": Wait.BODY, "a2": Wait.BODY, "b1": Wait.BODY, "c1": Wait.IDLE},
     None, "c1", "b", [("c1", False)]),
    ("a trusted proxy speaks for many: never the largest",
     {"p1": Wait.BODY, "p2": Wait.BODY, "p3": Wait.BODY, "a1": Wait.BODY},
     None, None, "c", []),
    ("no idle one parked: the kept ones workers hold, longest idle first",
     {"a1": "held", "b1": "held", "c1": Wait.BODY},
     None, None, "d", [("b1", True), ("a1", True)]),
    ("a newcomer holding as many as the largest less one is refused",
     {"a1": Wait.BODY, "a2": Wait.BODY, "b1": Wait.BODY},
     None, None, "b", []),
]


@pytest.mark.parametrize("conns, lingering, idle, newcomer, expected",
                         [row[1:] for row in ROOM], ids=[row[0] for row in ROOM])
def test_room_at_the_connection_cap(conns, lingering, idle, newcomer, expected):
    fair, clients, held = Fairness(2, 2), Clients(), {}
    for order, (name, wait) in enumerate(conns.items()):
        conn = clients[name]
        fair.opened(conn)
        conn.waiting = wait if isinstance(wait, Wait) else None
        if wait == "held":
            held[conn] = True
            conn.idle_since = -order   # the later opened, the longer idle
    tried = []
    for conn, counted in fair.room(newcomer, lingering and clients[lingering],
                                   idle and clients[idle], held):
        tried.append((clients.name(conn), counted))
        held.pop(conn, None)   # each try fails (a held one: its worker took it back first)
    assert tried == expected


def test_every_wait_has_a_shed_rank():
    assert set(SHED_RANK) == set(WAITS) | {None}


# The memory budget: (id, limit, [(connection, its wait, bytes charged)], the victims in order)
BUDGET = [
    ("under the limit: nobody", 100, [("a1", Wait.BODY, 60), ("b1", Wait.BODY, 40)], []),
    ("over: the largest wait of the client holding the most, until 7/8 of the limit",
     800, [("a1", Wait.BODY, 300), ("a2", Wait.BODY, 200), ("b1", Wait.BODY, 250),
           ("c1", Wait.HEAD, 100)], ["a1"]),
    ("the client holding the most at each moment, not at the start",
     800, [("a1", Wait.BODY, 300), ("a2", Wait.BODY, 280), ("b1", Wait.BODY, 500)],
     ["a1", "b1"]),
    ("a request in a worker cannot be shed: the next client's is",
     400, [("a1", None, 300), ("b1", Wait.LINE, 150)], ["b1"]),
    ("handshakes and requests ready for a worker are shed as well",
     160, [("a1", Wait.HANDSHAKE, 250), ("b1", Wait.READY, 200), ("c1", Wait.HEAD, 100)],
     ["a1", "b1"]),
    ("a trusted proxy's bodies are charged to the client each names",
     800, [("p1>a", Wait.BODY, 320), ("p2>a", Wait.BODY, 300), ("p3>b", Wait.BODY, 350)],
     ["p1>a"]),
]


@pytest.mark.parametrize("limit, charges, expected", [row[1:] for row in BUDGET],
                         ids=[row[0] for row in BUDGET])
def test_memory_budget_victims(limit, charges, expected):
    memory, clients = MemoryBudget(limit), Clients()
    for name, wait, size in charges:
        conn = clients[name]
        conn.waiting = wait
        memory.charge(conn, size // 2, conn.wait_key)   # in two reads: one entry each
        memory.charge(conn, size - size // 2, conn.wait_key)
    assert memory.held == sum(size for _, _, size in charges)
    shed = []
    if memory.held > memory.limit_bytes:   # (the reactor asks only then)
        for victim in memory.victims():
            shed.append(clients.name(victim))
            memory.uncharge(victim)   # the reactor sheds it
    assert shed == expected
    assert memory.held <= limit - limit // 8 or not expected
    for name, _, _ in charges:
        if clients[name].charged:
            memory.uncharge(clients[name])
    assert (memory.held, memory.by_key) == (0, {})   # nothing leaks


def test_a_connection_stays_charged_to_its_first_key():
    memory, conn = MemoryBudget(100), Connection(None, "192.0.2.1")
    memory.charge(conn, 0, "a")   # nothing held: not charged at all
    assert (conn.charged, conn.charge_key, memory.by_key) == (0, None, {})
    memory.charge(conn, 10, "a")
    memory.charge(conn, 5, "b")
    assert (conn.charged, conn.charge_key, memory.by_key["a"][0], "b" in memory.by_key) == \
        (15, "a", 15, False)


# -- the waits' moves (onebox/handoff.py WAIT_MOVES, checked by Reactor._move) ----------------
def bare_reactor():
    """A reactor with no sockets: only its waits are used."""
    books = types.SimpleNamespace(refusals=None)   # (nothing is finished or refused here)
    return Reactor(None, SETTINGS, None, None, None, books, None, None)


LEGAL = [(None, Wait.NEW), (Wait.NEW, Wait.HEAD), (Wait.HEAD, Wait.LINGER), (Wait.HEAD, None),
         (None, Wait.HANDSHAKE), (Wait.HANDSHAKE, Wait.NEW), (Wait.LINE, Wait.BODY),
         (Wait.LINE, Wait.SEND), (Wait.READY, Wait.READY), (Wait.IDLE, None)]
ILLEGAL = [(None, None), (Wait.IDLE, Wait.HEAD), (Wait.NEW, Wait.LINGER), (Wait.BODY, Wait.SEND),
           (Wait.SEND, Wait.IDLE), (Wait.LINGER, Wait.HEAD), (Wait.READY, Wait.LINE),
           (Wait.HANDSHAKE, Wait.HEAD), (Wait.LINE, Wait.READY)]


@pytest.mark.parametrize("was, wait", LEGAL, ids=repr)
def test_legal_moves_are_made_and_counted(was, wait):
    reactor, conn = bare_reactor(), Connection(None, "192.0.2.1")
    conn.waiting = was
    reactor.counts[was] += 1
    reactor._move(conn, wait)
    assert conn.waiting is wait
    waits = reactor.stats()["waits"]
    assert waits == {each.name: int(each is wait) for each in WAITS}


@pytest.mark.parametrize("was, wait", ILLEGAL, ids=repr)
def test_illegal_moves_are_refused_and_change_nothing(was, wait):
    reactor, conn = bare_reactor(), Connection(None, "192.0.2.1")
    conn.waiting = was
    with pytest.raises(IllegalMove):
        reactor._move(conn, wait)
    assert conn.waiting is was and not any(reactor.counts.values())


def test_every_wait_can_be_reached_and_closed():
    assert WAIT_MOVES[None] == set(WAITS)
    assert all(None in WAIT_MOVES[wait] for wait in WAITS)
    assert set(WAIT_MOVES) == set(WAITS) | {None}
    assert [wait.name for wait in WAITS if wait.fixed] == ["handshake", "new", "head", "idle",
                                                           "linger"]
