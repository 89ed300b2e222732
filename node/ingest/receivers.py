"""Several receiver processes on the node's DICOM ports: one Python process's GIL caps the listener
(pynetdicom is pure Python), so with ``[node] receivers = N`` (N > 1) the CPU-heavy part runs in N
spawned processes.

The node's process binds the listening sockets and every receiver process accepts from the same ones:
one backlog, so whichever process is free takes the next connection, and a connection waiting there
is not lost when a process dies (``SO_REUSEPORT`` would give each process a backlog of its own and
pick the process by a hash of the addresses, two senders landing on one process half the time). Each
process runs the listener of node.ingest.scp: its checks, the UID-conflict check and the durable
write. Before a C-STORE is answered Success its arrival goes over a pipe to the node's one
:class:`~node.ingest.index.Indexer` (:class:`IndexerLink`), so what is unindexed, the watermark, the
ready callbacks and "arrivals, then complete()" stay in one place, and a full indexer still has the
sender retry later (0xA700). The connection limits count every process's connections
(:class:`SharedConnections`). A process that dies is started again and audited; the node's stop
stops them.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from node import audit, logs
from node.config import Settings
from node.db import Database
from node.dicom.limits import ConnectionsElsewhere, ListenerGuard, ListenerLoad
from node.ingest.accept import Ingest
from node.ingest.index import Arrival, Indexer
from node.ingest.scp import Address, Receiver, addresses
from node.privacy import failure
from node.spool import Spool

log = logging.getLogger(__name__)

FULL = "full"  # the indexer's answer to an arrival it has no room for
GONE = "gone"  # a receiver process's answer to itself once the node's process is gone
TICK = 0.25  # seconds between a receiver process's looks at its connections (the shared table)
START_SECONDS = 60.0  # a receiver process not listening within this is a failed start
STOP_SECONDS = 15.0  # a receiver process not ended within this of its stop is killed
RESTART_SECONDS = 1.0  # at least this between the starts of one receiver process


class SharedConnections(ConnectionsElsewhere):
    """Every receiver process's connections, in memory the processes share: each writes its own row
    (a stable digest of each remote host it holds a connection from) and reads the others' under a
    file lock, which the kernel releases when its holder dies. The node's own process only reads."""

    def __init__(self, rows: int, width: int, lock_path: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._hosts = context.RawArray(ctypes.c_int64, rows * width)
        self._counts = context.RawArray(ctypes.c_int32, rows)
        self._listening = context.RawArray(ctypes.c_int8, rows)
        self._rows, self._width = rows, width
        self._lock_path = lock_path
        self.row: int | None = None  # this process's row; None: it holds no connections
        self._file: int | None = None
        self._depth = 0  # locked() is re-entrant within the process
        self._thread_lock = threading.RLock()  # flock does not exclude threads of one process

    def __getstate__(self) -> dict[str, Any]:
        """What a spawned process gets: the shared memory, not this process's lock file or lock."""
        state = dict(self.__dict__)
        state.update(_file=None, _depth=0, _thread_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _thread_lock=threading.RLock())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                if self._file is None:
                    self._file = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._file, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._file is not None:
                    fcntl.flock(self._file, fcntl.LOCK_UN)

    def count(self, host: str) -> tuple[int, int]:
        key, total, same = _host_key(host), 0, 0
        for row in range(self._rows):
            if row == self.row:
                continue
            held = self._counts[row]
            start = row * self._width
            total += held
            same += sum(1 for i in range(start, start + held) if self._hosts[i] == key)
        return total, same

    def publish(self, hosts: Collection[str]) -> None:
        if self.row is None:
            return
        start = self.row * self._width
        keys = [_host_key(host) for host in hosts][: self._width]
        for i, key in enumerate(keys):
            self._hosts[start + i] = key
        self._counts[self.row] = len(keys)

    def fewer_than(self, held: int) -> bool:
        return any(
            self._listening[row] and self._counts[row] < held for row in range(self._rows) if row != self.row
        )

    def listen(self) -> None:
        """This process takes connections from now on."""
        if self.row is not None:
            self._listening[self.row] = 1

    def clear(self, row: int) -> None:
        """Forget the connections of a receiver process that ends or has ended."""
        with self.locked():
            self._listening[row] = 0
            self._counts[row] = 0


def _host_key(host: str) -> int:
    """The same 64 bits for the same host in every process (``hash`` differs from process to process)."""
    return int.from_bytes(hashlib.blake2b(host.encode(), digest_size=8).digest(), "big", signed=True)


class IndexerLink:
    """The node's Indexer as a receiver process sees it: each call goes over the pipe to the node's
    process and waits for its answer, so an arrival is with the Indexer before its C-STORE is answered
    and a completion reaches it after the arrivals it follows. A thread of its own reads the answers,
    and sets ``stopping`` when the node says stop or its process is gone."""

    def __init__(self, pipe: Connection, stopping: threading.Event) -> None:
        self._pipe = pipe
        self._stopping = stopping
        self._send_lock = threading.Lock()
        self._waiting: dict[int, tuple[threading.Event, list[str | None]]] = {}
        self._ids = itertools.count()
        self._gone = False
        threading.Thread(target=self._read, name="indexer-link", daemon=True).start()

    def submit(self, arrival: Arrival) -> None:
        """As Indexer.submit: raises queue.Full when the indexer has no room (the sender retries)."""
        if self._call("submit", arrival) == FULL:
            raise queue.Full

    def complete(self, series: Collection[tuple[str, str]], reason: str) -> None:
        self._call("complete", list(series), reason)

    def tell(self, *message: Any) -> None:
        with self._send_lock:
            self._pipe.send(message)

    def _call(self, kind: str, *args: Any) -> str | None:
        done, answer = threading.Event(), list[str | None]([GONE])
        with self._send_lock:
            if self._gone:
                raise ConnectionError("the node's process is gone")
            number = next(self._ids)
            self._waiting[number] = (done, answer)
            self._pipe.send((kind, number, *args))
        done.wait()
        if answer[0] not in (None, FULL):
            raise RuntimeError(f"{kind} failed in the node's process ({answer[0]})")
        return answer[0]

    def _read(self) -> None:
        try:
            while True:
                message = self._pipe.recv()
                if message[0] == "stop":
                    self._stopping.set()  # answers are still read while the listener stops
                    continue
                done, answer = self._waiting.pop(message[1])
                answer[0] = message[2]
                done.set()
        except (EOFError, OSError):
            if not self._stopping.is_set():
                log.warning("the node's process is gone: this receiver process stops")
        except Exception as exc:  # an answer it cannot read: no call may wait for ever; the node restarts it
            log.error("the link to the node's process failed; this receiver process stops: %s", failure(exc))
        with self._send_lock:
            self._gone = True
            waiting, self._waiting = self._waiting, {}
        for done, _ in waiting.values():
            done.set()
        self._stopping.set()


@dataclass(frozen=True)
class _Start:
    """What a receiver process is started with."""

    settings: Settings
    number: int
    pipe: Connection
    sockets: Mapping[Address, socket.socket]
    connections: SharedConnections
    log_level: int


def _receive(start: _Start) -> None:
    """A receiver process: node.ingest.scp's listener on the node's sockets, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node's process, which stops this
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    logs.configure(start.log_level)
    settings = start.settings
    start.connections.row = start.number
    db = Database(settings.node.resolved_database_url)  # migrated by the node's process
    audit.configure(db, settings)
    spool = Spool(settings.node.data_dir)
    link = IndexerLink(start.pipe, stopping)
    receiver = Receiver(
        settings,
        db,
        Ingest(settings, db, spool, link),
        link.complete,
        sockets=start.sockets,
        elsewhere=start.connections,
        receiving=spool.receiving / f"receiver-{start.number}",
    )
    try:
        receiver.start()
        start.connections.listen()
        link.tell("ready", os.getpid())
        while not stopping.wait(TICK):
            receiver.load()  # its connections that ended come off the shared table
    finally:
        start.connections.clear(start.number)  # no longer left connections by the others
        receiver.stop()
        audit.close(db)
        db.dispose()


@dataclass
class _Child:
    number: int
    process: BaseProcess
    pipe: Connection  # the node's end
    started: float  # time.monotonic()
    ready: threading.Event
    send_lock: threading.Lock
    reader: threading.Thread | None = None  # reads what the process says, until its end of the pipe closes


class Receivers:
    """The node's side of ``receivers`` receiver processes: their sockets, their arrivals handed to
    ``indexer``, their restarts. Started and stopped like node.ingest.scp.Receiver, in its place."""

    def __init__(self, settings: Settings, db: Database, spool: Spool, indexer: Indexer) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.indexer = indexer
        count = settings.node.receivers
        self.connections = SharedConnections(
            count, settings.node.max_associations, spool.root / "receivers.lock"
        )
        self.guard = ListenerGuard(settings.node, lambda host, reason: None, elsewhere=self.connections)
        self._context = multiprocessing.get_context("spawn")
        self._sockets: dict[Address, socket.socket] = {}
        self._children: list[_Child] = []
        self._pool = ThreadPoolExecutor(settings.node.max_associations, thread_name_prefix="receivers")
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="receivers", daemon=True)

    def start(self) -> None:
        """Bind the listener's addresses, start the processes and wait until each listens."""
        for folder in self.spool.receiving.glob("receiver-*"):  # left by the last run: never acknowledged
            for leftover in folder.iterdir():
                leftover.unlink(missing_ok=True)
        for address in addresses(self.settings):
            self._sockets[address] = _bind(address.host, address.port)
        self._children = [self._spawn(number) for number in range(self.settings.node.receivers)]
        for child in self._children:
            self._wait_ready(child)
        self._watcher.start()
        log.info("%d receiver processes listening", len(self._children))

    def stop(self) -> None:
        """Tell each process to stop, and wait for it (killed after :data:`STOP_SECONDS`)."""
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()
        for child in self._children:
            with contextlib.suppress(OSError):
                self._send(child, ("stop",))
        for child in self._children:
            child.process.join(STOP_SECONDS)
            if child.process.is_alive():
                log.warning(
                    "receiver process %d did not stop in %.0f s: killed", child.process.pid, STOP_SECONDS
                )
                child.process.kill()
                child.process.join()
            child.pipe.close()
        self._children = []
        self._pool.shutdown(wait=True)
        for sock in self._sockets.values():
            sock.close()
        self._sockets = {}

    def load(self) -> ListenerLoad:
        """Connections open now in every receiver process, against ``max_associations`` (/healthz)."""
        return self.guard.load()

    def _spawn(self, number: int) -> _Child:
        ours, theirs = self._context.Pipe()
        start = _Start(
            self.settings,
            number,
            theirs,
            self._sockets,
            self.connections,
            logging.getLogger().getEffectiveLevel(),
        )
        process = self._context.Process(
            target=_receive, args=(start,), name=f"receiver-{number}", daemon=True
        )
        process.start()
        theirs.close()
        child = _Child(number, process, ours, time.monotonic(), threading.Event(), threading.Lock())
        child.reader = threading.Thread(
            target=self._read, args=(child,), name=f"receiver-{number}-link", daemon=True
        )
        child.reader.start()
        return child

    def _wait_ready(self, child: _Child) -> None:
        deadline = time.monotonic() + START_SECONDS
        while not child.ready.wait(0.1):
            if not child.process.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"receiver process {child.number} did not start (see its log above)")

    def _read(self, child: _Child) -> None:
        """Everything a receiver process says, until it ends: each call answered from the pool, so an
        indexer that is full holds that one association, not the process's others."""
        while True:
            try:
                message = child.pipe.recv()
                if message[0] == "ready":
                    child.ready.set()
                else:
                    self._pool.submit(self._answer, child, message)
            except (EOFError, OSError):
                return
            except Exception as exc:  # unanswered, its associations would wait for ever: start it afresh
                if not self._stopping.is_set():
                    log.error("receiver process %d: its link failed, killed: %s", child.number, failure(exc))
                child.process.kill()
                return

    def _answer(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind, number, *args = message
        answer = None
        try:
            if kind == "submit":
                self.indexer.submit(args[0])
            else:
                self.indexer.complete(args[0], args[1])
        except queue.Full:
            answer = FULL
        except Exception as exc:  # the receiver process turns any other answer into 0xA700 as in-process
            log.error("%s from receiver process %d failed: %s", kind, child.number, failure(exc))
            answer = "failed"
        with contextlib.suppress(OSError):
            self._send(child, ("done", number, answer))

    @staticmethod
    def _send(child: _Child, message: tuple[Any, ...]) -> None:
        with child.send_lock:
            child.pipe.send(message)

    def _watch(self) -> None:
        """Start again a receiver process that ended while the node runs."""
        while not self._stopping.is_set():
            ended = wait([c.process.sentinel for c in self._children], timeout=TICK)
            if self._stopping.is_set():
                return
            for i, child in enumerate(self._children):
                if child.process.sentinel in ended:
                    self._children[i] = self._restart(child)
                    self._started_again(i)

    def _started_again(self, i: int) -> None:
        """Start the process in slot ``i`` until it starts (out of memory or file handles a start
        fails): a dead watcher would leave the port accepting connections nobody answers."""
        number = self._children[i].number
        while not self._stopping.is_set():
            try:
                self._children[i] = self._spawn(number)
                return
            except Exception as exc:
                log.error("receiver process %d could not start; trying again: %s", number, failure(exc))
                self._stopping.wait(TICK)

    def _restart(self, child: _Child) -> _Child:
        """The slot of a process that ended, cleaned up and audited; its successor is started by
        :meth:`_started_again`."""
        child.process.join()
        if child.reader is not None:  # what the process sent before it ended reaches the indexer first
            child.reader.join(STOP_SECONDS)
        child.pipe.close()
        self.connections.clear(child.number)
        code = child.process.exitcode
        log.error("receiver process %d ended with %s: started again", child.number, code)
        try:
            audit.append(
                self.db,
                "receiver.restarted",
                outcome="failure",
                actor="node",
                receiver=child.number,
                pid=child.process.pid,
                exit_code=code,
            )
        except Exception:  # the database away: the log line above says it
            log.exception("could not audit the restart of receiver process %d", child.number)
        self._stopping.wait(max(0.0, child.started + RESTART_SECONDS - time.monotonic()))
        return child


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket every receiver process accepts from; non-blocking, so the processes that
    lose the race for a connection go back to waiting instead of blocking in accept."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server(
        (host, port),
        family=family,
        backlog=128,
        dualstack_ipv6=family == socket.AF_INET6 and socket.has_dualstack_ipv6(),
    )
    sock.setblocking(False)
    return sock
