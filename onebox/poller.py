"""Readiness: which of the reactor's waiting sockets have input. Imports only the standard
library; the engine (``onebox/engine.py``) is its one user. An owner is what a report hands
back: a connection object, or a name ("listener", "wakeup") for a socket watched for good."""
import select
import selectors


class Poller:
    """Which waiting sockets are readable. A connection is *armed* while the reactor waits on it
    and disarmed while a worker owns it.

    On Linux, epoll with EPOLLONESHOT: the kernel disarms a connection the moment it reports it,
    so handing it to a worker costs nothing and taking it back costs one epoll_ctl, which a
    worker may make itself (``rearm``). Elsewhere, a selectors.DefaultSelector with register /
    unregister, twice the system calls and more bookkeeping, used by the reactor thread only.
    ``[server] poller = select`` forces the portable path (the tests use it).
    """

    def __init__(self, kind="epoll"):
        use_epoll = hasattr(select, "epoll") and kind != "select"
        self._epoll = select.epoll() if use_epoll else None
        self._selector = None if self._epoll else selectors.DefaultSelector()
        self.can_rearm = self._epoll is not None
        self._owners = {}   # fd -> owner: the Connection, or "listener" / "wakeup"

    def watch(self, sock, owner):
        """Watch ``sock`` for good (the listener, the wake-up socket): never disarmed."""
        if self._epoll:
            self._epoll.register(sock.fileno(), select.EPOLLIN)
        else:
            self._selector.register(sock, selectors.EVENT_READ, owner)
        self._owners[sock.fileno()] = owner

    def arm(self, conn, write=False):
        """Report ``conn`` once when it has input (or, with ``write``, room for output)."""
        fd = conn.sock.fileno()
        if self._epoll is None:
            events = selectors.EVENT_WRITE if write else selectors.EVENT_READ
            if fd not in self._owners:
                self._selector.register(conn.sock, events, conn)
                self._owners[fd] = conn
            elif self._selector.get_key(conn.sock).events != events:
                self._selector.modify(conn.sock, events, conn)
            return
        events = (select.EPOLLOUT if write else select.EPOLLIN) | select.EPOLLONESHOT
        if fd in self._owners:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
            self._owners[fd] = conn

    def rearm(self, conn):
        """From a worker: report ``conn`` again (it is registered already). Only where
        ``can_rearm``: epoll_ctl is safe from any thread, a selector is not."""
        self._epoll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)

    def disarm(self, conn):
        """Stop reporting ``conn`` (it goes to a worker). With EPOLLONESHOT it already is."""
        if self._epoll is None:
            self._selector.unregister(conn.sock)
            del self._owners[conn.sock.fileno()]

    def forget(self, sock):
        """Before ``sock`` is closed (closing removes it from an epoll set by itself)."""
        owner = self._owners.pop(sock.fileno(), None)
        if owner is not None and self._selector is not None:
            self._selector.unregister(sock)
        elif isinstance(owner, str):   # watched for good (a connection is one-shot: closing
            self._epoll.unregister(sock.fileno())   # it is enough)

    def poll(self, timeout):
        if self._epoll is None:
            return [key.data for key, _ in self._selector.select(timeout)]
        owners = self._owners
        return [owners[fd] for fd, _ in self._epoll.poll(timeout) if fd in owners]

    def close(self):
        (self._epoll or self._selector).close()
