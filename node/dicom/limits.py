"""What keeps the DICOM listener answering whatever a remote peer does (issue 11, fault 5).

pynetdicom gives every accepted TCP connection two threads and reads each PDU with a blocking read of
the length the PDU announces, so idle sockets, a 4 GB announcement or one byte every few seconds held
every association slot. Here:

- a connection over ``max_associations`` (all listeners together) or over
  ``max_associations_per_address`` from one address is answered A-ASSOCIATE-RJ (transient, local limit)
  and closed in the accepting thread, before it costs a thread;
- each PDU must arrive whole within ``pdu_seconds`` and announce no more than ``max_pdu_bytes``
  (:class:`GuardedSocket`), else the connection is aborted;
- the A-ASSOCIATE-RQ must come within ``association_setup_seconds`` (pynetdicom's ARTIM timer).

Every refusal goes to one callback, ``refused(host, reason)``, which rate-limits what is written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from socketserver import BaseRequestHandler
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import ThreadedAssociationServer

from node.config import NodeSettings

# A refused connection is kept open this long after its A-ASSOCIATE-RJ, so the peer reads the
# rejection instead of a reset; at most this many at once (more are closed at once).
LINGER_SECONDS = 1.0
MAX_LINGERING = 64
DEFER_SECONDS = 0.002  # a receiver process leaving a connection to another looks again after this
DEFER_LIMIT_SECONDS = 0.05  # then takes it itself: the process holding fewer may be unable to accept
PDU_HEADER = struct.Struct(">BBL")  # type, reserved, length of what follows
# A connection: remote host and port, and the listener's port (one remote port may reach both listeners).
Peer = tuple[str, int, int]

Refused = Callable[[str, str], None]
_aborted = threading.local()  # set in a DUL thread whose connection this module ended
# Handed, as if it were the request, to an association still waiting for one when its connection is
# aborted here: pynetdicom would otherwise keep its threads until association_setup_seconds ran out.
_ABANDONED = A_ASSOCIATE()


def _not_after_abort(record: logging.LogRecord) -> bool:
    """pynetdicom logs an error for the short read an abort here ends with: already reported, and
    once per abort it would be the flood the refusal log prevents."""
    return not getattr(_aborted, "connection", False)


logging.getLogger("pynetdicom.dul").addFilter(_not_after_abort)


@dataclass(frozen=True)
class ListenerLoad:
    """What /healthz says about the listener: connections open now against the limit."""

    connections: int
    max_connections: int

    @property
    def saturated(self) -> bool:
        return self.connections >= self.max_connections


@dataclass
class _Connection:
    request: socket.socket
    association: Association | None = None
    opener: threading.Thread | None = None  # runs EVT_CONN_OPEN (a TLS handshake), starts the association
    reported: bool = False  # a refusal was already reported for it

    def alive(self) -> bool:
        """Until its opening thread and both its association's threads have ended: the limits bound
        threads, not only sockets. An association whose thread could not start (threads exhausted) never
        runs: its slot is free once the opening thread gives up."""
        assoc = self.association
        if assoc is None or self.opener is None:
            return self.request.fileno() != -1
        if self.opener.is_alive():  # first: once it has ended, ident says whether the association started
            return True
        return assoc.ident is not None and (assoc.is_alive() or assoc.dul.is_alive())


class ConnectionsElsewhere:
    """The connections the node's other receiver processes hold (node.ingest.receivers), so that the
    limits are the node's, not each process's. This one, for a node of one process, knows of none."""

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Held while counting and publishing: no other process admits meanwhile."""
        return contextlib.nullcontext()

    def count(self, host: str) -> tuple[int, int]:
        """Connections elsewhere: all of them, and those from ``host``."""
        return 0, 0

    def publish(self, hosts: list[str]) -> None:
        """This process's connections now, by remote host (called while :meth:`locked` is held)."""

    def fewer_than(self, held: int) -> bool:
        """Whether another listening process holds fewer than ``held`` connections: it takes the next."""
        return False


@dataclass
class ListenerGuard:
    """What every listener of the node shares: who is connected (the limits count across listeners,
    and across receiver processes through ``elsewhere``), the limits each connection gets, and where
    refusals are reported."""

    node: NodeSettings
    refused: Refused
    elsewhere: ConnectionsElsewhere = field(default_factory=ConnectionsElsewhere)
    _connections: dict[Peer, _Connection] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _deferring_since: float | None = None  # since when defers() has left a waiting connection to others

    def _prune(self) -> None:
        gone = [a for a, c in self._connections.items() if not c.alive()]
        for address in gone:
            del self._connections[address]
        if gone:
            with self.elsewhere.locked():
                self.elsewhere.publish([host for host, *_ in self._connections])

    def admit(self, request: socket.socket, peer: Peer) -> str | None:
        """Count the connection in, or say why it is refused."""
        with self._lock, self.elsewhere.locked():
            self._prune()
            total, same = self.elsewhere.count(peer[0])
            if len(self._connections) + total >= self.node.max_associations:
                return "too many connections"
            same += sum(1 for host, *_ in self._connections if host == peer[0])
            if same >= self.node.max_associations_per_address:
                return "too many connections from this address"
            self._connections[peer] = _Connection(request)
            self.elsewhere.publish([host for host, *_ in self._connections])
        return None

    def adopt(self, event: Any) -> None:
        """EVT_CONN_OPEN: the connection's association, whose threads it now counts."""
        with self._lock:
            # still the accepted GuardedSocket: this handler is bound before the TLS handshake's
            connection = self._connections.get(event.assoc.dul.socket.socket.peer)
            if connection is not None:
                connection.association, connection.opener = event.assoc, threading.current_thread()

    def requested(self, event: Any) -> None:
        """EVT_REQUESTED, bound first: the stand-in request of an aborted connection ends its threads."""
        if event.assoc.requestor.primitive is _ABANDONED:
            event.assoc.is_aborted = True
            event.assoc.kill()

    def abort(self, peer: Peer, reason: str) -> None:
        """A connection aborted mid-PDU (from its DUL thread): reported, and its association woken if
        it is still waiting for its request."""
        self.refuse(peer, reason)
        with self._lock:
            connection = self._connections.get(peer)
        assoc = connection.association if connection is not None else None
        if assoc is not None and assoc.requestor.primitive is None:
            assoc.dul.to_user_queue.put(_ABANDONED)

    def refuse(self, peer: Peer, reason: str) -> None:
        """Report a refusal of a connection, once per connection."""
        with self._lock:
            connection = self._connections.get(peer)
            if connection is not None:
                if connection.reported:
                    return
                connection.reported = True
        self.refused(peer[0], reason)

    def defers(self) -> bool:
        """Whether to leave the next connection to a process holding fewer (least connections first)."""
        with self._lock:
            self._prune()
            if not self.elsewhere.fewer_than(len(self._connections)):
                self._deferring_since = None
                return False
            now = time.monotonic()
            if self._deferring_since is None:
                self._deferring_since = now
            if now - self._deferring_since > DEFER_LIMIT_SECONDS:  # nobody took it: this process does
                self._deferring_since = None
                return False
            return True

    def load(self) -> ListenerLoad:
        with self._lock:
            self._prune()
            elsewhere, _ = self.elsewhere.count("")
            return ListenerLoad(len(self._connections) + elsewhere, self.node.max_associations)


class GuardedSocket(socket.socket):
    """An accepted connection: each PDU must arrive whole within ``pdu_seconds`` of its first byte, the
    first (the association request) also within ``association_setup_seconds`` of the connection, and
    each announce at most ``max_pdu_bytes``. pynetdicom reads a PDU as header then body with blocking reads;
    this follows the stream it reads, and ends a read past the deadline or over the cap as a closed
    connection (an empty read), after telling the peer why with an A-ABORT."""

    guard: ListenerGuard
    peer: Peer
    _deadline: float | None
    _setup_until: float | None  # None once the first PDU is in
    _header: bytearray
    _left: int

    def watch(self, guard: ListenerGuard, peer: Peer) -> None:
        self.guard, self.peer = guard, peer
        self._deadline, self._header, self._left = None, bytearray(), 0
        self._setup_until = time.monotonic() + guard.node.association_setup_seconds
        self.settimeout(guard.node.pdu_seconds)  # a peer that stops reading our answers

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not self._arrives():
            return b""
        try:
            data = super().recv(bufsize, flags)
        except TimeoutError:  # TLS: a record begun (select saw it) but not finished within the timeout
            return self._abort(f"PDU not complete within {self.guard.node.pdu_seconds:g} s", 0x00)
        return data if self._within_cap(data) else b""

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As :meth:`recv`, into ``buffer``: how a whole PDU is read (node.dicom.network)."""
        if not self._arrives():
            return 0
        try:
            count = super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            self._abort(f"PDU not complete within {self.guard.node.pdu_seconds:g} s", 0x00)
            return 0
        return count if self._within_cap(memoryview(buffer)[:count]) else 0

    def _arrives(self) -> bool:
        """Wait for data within the PDU's deadline; past it the connection is aborted (False)."""
        node = self.guard.node
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = min(now + node.pdu_seconds, self._setup_until or math.inf)
        if self._readable(max(self._deadline - now, 0)):
            return True
        if self._setup_until is not None and self._deadline == self._setup_until:
            self._abort(f"no association request within {node.association_setup_seconds:g} s", 0)
        else:
            self._abort(f"PDU not complete within {node.pdu_seconds:g} s", 0x00)
        return False

    def _within_cap(self, data: bytes | memoryview) -> bool:
        """Follow ``data``; a PDU announcing more than ``max_pdu_bytes`` aborts the connection (False)."""
        if self._follow(data) > self.guard.node.max_pdu_bytes:
            self._abort(f"PDU over {self.guard.node.max_pdu_bytes} bytes announced", 0x06)
            return False
        return True

    def _readable(self, timeout: float) -> bool:
        """Whether a read would return within ``timeout`` (a TLS subclass adds its buffered bytes)."""
        return bool(select.select([self], [], [], timeout)[0])

    def _follow(self, data: bytes | memoryview) -> int:
        """Track where the stream is in its PDU; the length the current PDU announced (0: not yet)."""
        view = memoryview(data)
        announced = 0
        while view:
            if len(self._header) < PDU_HEADER.size:
                take = PDU_HEADER.size - len(self._header)
                self._header += view[:take]
                view = view[take:]
                if len(self._header) < PDU_HEADER.size:
                    break
                announced = self._left = PDU_HEADER.unpack(self._header)[2]
            else:
                take = min(self._left, len(view))
                self._left -= take
                view = view[take:]
            if len(self._header) == PDU_HEADER.size and self._left == 0:  # the whole PDU is in
                self._header.clear()
                self._deadline = self._setup_until = None
        return announced

    def _abort(self, reason: str, diagnostic: int) -> bytes:
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, diagnostic
        try:
            self.sendall(abort.encode())
            super().shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.guard.abort(self.peer, reason)
        _aborted.connection = True
        return b""

    def shutdown(self, how: int) -> None:
        """pynetdicom closes a socket only when its shutdown succeeds; one the peer already dropped
        would keep its descriptor."""
        with contextlib.suppress(OSError):
            super().shutdown(how)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the guard at the door: connections over a limit are refused
    before a thread is started, and every accepted one is a :class:`GuardedSocket`."""

    ae: GuardedAE
    # socketserver's 5 pending connections drop a burst's SYNs, delaying a real sender by TCP's retries
    # (seconds); refusing is cheap, so let the kernel queue more for the accepting thread.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lingering: deque[tuple[float, socket.socket]] = deque()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Bind, or take the listening socket the node's process bound for its receiver processes
        (node.ingest.receivers), which all accept from it."""
        shared = self.ae.listening_socket
        if shared is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = shared
        self.server_address = shared.getsockname()

    def server_activate(self) -> None:
        if self.ae.listening_socket is None:  # a shared socket listens already
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.ae.guard.defers():  # socketserver takes an OSError as no connection; selected again soon
            time.sleep(DEFER_SECONDS)
            raise BlockingIOError("left to a receiver process holding fewer connections")
        request, address = super().get_request()
        guarded = GuardedSocket(fileno=request.detach())
        guarded.watch(self.ae.guard, (address[0], address[1], self.server_address[1]))
        return guarded, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        reason = self.ae.guard.admit(request, request.peer)
        if reason is None:
            return True
        reject = A_ASSOCIATE_RJ()
        reject.result, reject.source, reject.reason_diagnostic = 0x02, 0x03, 0x02  # transient, local limit
        try:
            request.setblocking(False)
            request.send(reject.encode())
            if len(self._lingering) >= MAX_LINGERING:
                self._lingering.popleft()[1].close()
            self._lingering.append((time.monotonic() + LINGER_SECONDS, request.dup()))
        except OSError:
            pass
        self.ae.guard.refused(client_address[0], reason)
        return False  # socketserver shuts this descriptor; the lingering duplicate keeps the connection

    def service_actions(self) -> None:
        super().service_actions()
        now = time.monotonic()
        while self._lingering and self._lingering[0][0] <= now:
            self._lingering.popleft()[1].close()

    def server_close(self) -> None:
        while self._lingering:
            self._lingering.popleft()[1].close()
        super().server_close()


class GuardedAE(AE):
    """An AE whose listeners are :class:`GuardedServer` s sharing ``guard``; ``request_handler``, where
    given, is what each accepted connection is handed to (pynetdicom's ``RequestHandler`` seam)."""

    def __init__(
        self, ae_title: str, guard: ListenerGuard, request_handler: type[BaseRequestHandler] | None = None
    ) -> None:
        super().__init__(ae_title)
        self.guard = guard
        self.listening_socket: socket.socket | None = None  # bound by the node's process, else None
        self.request_handler = request_handler

    def make_server(self, *args: Any, **kwargs: Any) -> GuardedServer:
        kwargs["server_class"] = GuardedServer
        if self.request_handler is not None:
            kwargs["request_handler"] = self.request_handler
        return super().make_server(*args, **kwargs)  # type: ignore[return-value]
