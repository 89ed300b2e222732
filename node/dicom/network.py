"""The node's Application Entities: one listening (Storage SCP, Verification SCP), one per send or echo.

Both are built here so that what every association needs — Nagle off on its socket, the timeouts, and
later a TLS context — is set in one place.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any, cast

from pydicom import uid
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.config import Destination, NodeSettings, Settings
from node.dicom import filemeta
from node.dicom.limits import GuardedAE, ListenerGuard
from node.dicom.store_fast_path import StoreFastPath, received_titles
from node.dicom.tls import tls_args

# What the listener accepts: uncompressed in every byte order, deflated, and the compressed syntaxes
# pydicom can decode with the pylibjpeg plugins, so a sender never has to transcode and the analysis
# can read what was stored.
RECEIVED_TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
]
# What the node's own results are written in (see node.outputs).
SENT_TRANSFER_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]


def set_nodelay(event: Any) -> None:
    """Small PDU writes stall ~40 ms each on Nagle + delayed ACK; turn Nagle off on every socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# Every association the node opens or accepts takes these handlers.
SOCKET_HANDLERS: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, set_nodelay)]


def listening_ae(node: NodeSettings, guard: ListenerGuard) -> GuardedAE:
    """The Storage and Verification SCP: every storage SOP class in :data:`RECEIVED_TRANSFER_SYNTAXES`
    (private and future ones too unless ``unknown_sop_classes = "refuse"``: then only those pynetdicom
    knows, and a context for another is rejected at negotiation), the node's AE title required, the
    calling-AE allow-list (addresses: :func:`calling_ae_allowed`), and the limits of ``guard``."""
    _config.UNRESTRICTED_STORAGE_SERVICE = node.unknown_sop_classes == "accept"
    _config.LOG_HANDLER_LEVEL = "none"
    ae = GuardedAE(node.ae_title, guard, PromptRequestHandler)
    ae.require_called_aet = True
    ae.require_calling_aet = [e if isinstance(e, str) else e.ae_title for e in node.allowed_calling_aets]
    ae.maximum_associations = node.max_associations
    ae.network_timeout = node.network_timeout
    ae.acse_timeout = node.association_setup_seconds
    ae.maximum_pdu_size = node.max_pdu_bytes
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, RECEIVED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def calling_ae_allowed(node: NodeSettings, calling_ae: str, address: str) -> bool:
    """Whether ``calling_ae`` may come from ``address``: a plain entry allows any address, entries with
    addresses only theirs; a title not listed at all is pynetdicom's to reject."""
    networks = []
    for entry in node.allowed_calling_aets:
        if isinstance(entry, str):
            if entry == calling_ae:
                return True
        elif entry.ae_title == calling_ae:
            networks.extend(entry.addresses)
    if not networks:
        return True
    try:
        host = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:  # dual-stack listener
        host = host.ipv4_mapped
    return any(host in network for network in networks)


def receive_to_disk(folder: Path) -> None:
    """Have the listener write each C-STORE data set to a file in ``folder`` as its PDUs arrive, not
    into memory (pynetdicom's chunked receive), so that memory stays flat in instance size; ``folder``
    is on the spool's file system, where the system's temporary folder may be memory. What is in it
    now was never acknowledged (a transfer cut short when the node last stopped) and is deleted."""
    for leftover in folder.iterdir():
        if leftover.is_file():
            leftover.unlink()
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = partial(NamedTemporaryFile, dir=folder)  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = _write_received_meta


def _write_received_meta(fp: DicomIO, file_meta: FileMetaDataset, enforce_standard: bool = True) -> None:
    """pynetdicom's writer of a received data set's meta information (built from the request's command
    set), replaced: on the listener's associations it also names the AE titles, as the node's spool
    files do (node.ingest.accept), so that the file received can become the spool file as it is — one
    write, no copy. pynetdicom wrote it enforcing the standard, so a request with an empty Affected SOP
    Instance UID raised in its reader thread and the connection dropped, unanswered; such a request's
    meta is written as it is, and accept refuses it (0xC000) and audits it like any other."""
    assoc = getattr(_receiving, "assoc", None)
    if assoc is not None:
        source, sending, receiving = received_titles(assoc)
        file_meta.SourceApplicationEntityTitle = source
        file_meta.SendingApplicationEntityTitle = sending
        file_meta.ReceivingApplicationEntityTitle = receiving
    try:
        encoded = filemeta.encode(file_meta)
    except Exception:  # what the standard requires is missing or invalid: written as it is
        buffer = DicomBytesIO()
        write_file_meta_info(buffer, file_meta, enforce_standard=False)
        encoded = buffer.getvalue()
    fp.write(encoded)


# pynetdicom 3.0.4 (read from its dul.py and association.py) hands every PDU and every response
# between a connection's two threads by polling: the DUL thread sleeps 1 ms (``_run_loop_delay``)
# whenever a pass finds nothing to do, the association thread sleeps 1 ms (a hard-coded
# ``time.sleep(0.001)`` in ``Association._run_reactor``) on every pass. One C-STORE waits on several
# such sleeps: its last PDU, the handler, the response, the next request. The listener's associations
# (PromptRequestHandler, pynetdicom's request-handler seam) instead wait for what they wait for: the
# DUL thread in select() on its socket and a doorbell rung when a primitive is queued for it, the
# association thread on an event set when the DUL has acted. The loops are pynetdicom's otherwise,
# line for line; an upgrade of pynetdicom must be checked against them.
_IDLE_WAKE = 0.05  # seconds: how often a waiting reactor still looks at its timers (ARTIM, idle, kill)
_receiving = threading.local()  # in a listener's DUL thread: the association it reads for
_dul_log = logging.getLogger("pynetdicom.dul")  # as pynetdicom's own (node.dicom.limits filters it)


class _Doorbell:
    """A wake-up select() can wait on beside a socket (an eventfd); rings after close are ignored, so a
    descriptor number reused meanwhile is never written to."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> None:
        with self._lock:
            if self._fd != -1:
                os.eventfd_write(self._fd, 1)

    def quiet(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):
            if self._fd != -1:
                os.eventfd_read(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd != -1:
                os.close(self._fd)
                self._fd = -1


class _RingingQueue(queue.Queue[Any]):
    """A queue that calls ``ring`` after each put: whoever waits for it wakes at once."""

    def __init__(self, ring: Callable[[], None]) -> None:
        super().__init__()
        self._ring = ring

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._ring()


class PromptDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting in select() instead of sleeping (see above); each PDU read
    goes to the association's C-STORE fast path where it has one (:func:`take_stores_directly`)."""

    def __init__(self, assoc: Association, stir: Callable[[], None]) -> None:
        super().__init__(assoc)
        self.fast: StoreFastPath | None = None
        self._bell = _Doorbell()
        self._stir = stir  # wakes the association thread
        self.event_queue = _RingingQueue(self._bell.ring)
        self.to_provider_queue = _RingingQueue(self._bell.ring)
        self.to_user_queue = _RingingQueue(stir)

    def run_reactor(self) -> None:
        _receiving.assoc = self.assoc
        try:
            self._react()
        finally:
            self._bell.close()
            self._stir()  # the association thread sees the DUL has ended

    def _react(self) -> None:
        self._idle_timer.start()
        socket_ = cast(Any, self.socket)
        while not self._kill_thread:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            read = False
            try:  # encode and send a primitive, or receive and decode a PDU
                if self._process_recv_primitive():
                    pass
                elif read := self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # as pynetdicom: an A-ABORT bypassing the state machine
                _dul_log.error("Exception in DUL.run(), aborting association: %s", type(exc).__name__)
                abort = A_ABORT_RQ()
                abort.source, abort.reason_diagnostic = 0x02, 0x00
                socket_.send(abort.encode())
                self.assoc.is_aborted, self.assoc.is_established = True, False
                self.assoc._kill = self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:  # a PDU the fast path took queues nothing: the next may be buffered (TLS)
                if not read:
                    self._wait()
                continue
            self.state_machine.do_action(event)  # what it gives the association thread stirs it

    def _read_pdu_data(self) -> None:
        """pynetdicom's read of one PDU, whole, with its outcomes (Evt17 for a connection that ended,
        Evt19 for an unknown PDU type); the PDU then goes to the fast path, if any, else to
        :meth:`deliver` as in pynetdicom."""
        socket_ = cast(Any, self.socket)
        try:
            header = socket_.recv(6)
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        except (OSError, TimeoutError, struct.error) as exc:
            if not isinstance(exc, struct.error):
                _dul_log.error("Connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            _dul_log.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        try:
            body = socket_.recv(pdu_length)
        except (OSError, TimeoutError):
            _dul_log.error("Connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            _dul_log.error(
                f"The received PDU is shorter than expected ({6 + len(body)} of {6 + pdu_length} bytes)"
            )
            self.event_queue.put("Evt17")
            return
        if self.fast is None:
            self.deliver(header + body)
        else:
            self.fast.take(header, body)

    def deliver(self, pdu: bytes | bytearray) -> None:
        """A whole PDU to pynetdicom: decoded, its event queued for the state machine (or Evt19)."""
        try:
            decoded, event = self._decode_pdu(bytearray(pdu))
            self.event_queue.put(event)
        except Exception:
            _dul_log.error("Unable to decode the received PDU data")
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(decoded)

    def _wait(self) -> None:
        """Until the socket has data, a primitive or event is queued, or :data:`_IDLE_WAKE` passes. A
        TLS socket's buffered bytes select() cannot see were looked at just before (``ready``)."""
        waiting: list[Any] = [self._bell]
        sock = self.socket
        if sock is not None and sock._is_connected and sock.socket is not None and sock.socket.fileno() != -1:
            waiting.append(sock.socket)
        with contextlib.suppress(OSError, ValueError):
            select.select(waiting, [], [], _IDLE_WAKE)
        self._bell.quiet()

    def kill_dul(self) -> None:
        self._kill_thread = True
        self._bell.ring()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self.kill_dul()
        while self.is_alive() and threading.current_thread() is not self:
            self.join(_IDLE_WAKE)
        return True


class _WholeReads(AssociationSocket):
    """pynetdicom's connection socket, reading a PDU whole: its ``recv`` reads 4 KiB at a time, 128
    reads (each through node.dicom.limits' guard) for a 512 KB PDU; this asks for all that is left, into
    one buffer."""

    def recv(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        count = 0
        with memoryview(buffer) as view:
            while count < nr_bytes:
                got = cast(socket.socket, self.socket).recv_into(view[count:], nr_bytes - count)
                if not got:  # the connection ended (or was aborted): what was read, as pynetdicom
                    break
                count += got
        del buffer[count:]
        return buffer


class PromptAssociation(Association):
    """pynetdicom's acceptor association, its reactor waiting to be stirred instead of sleeping."""

    _stirred: threading.Event

    def make_prompt(self) -> None:
        """Take a :class:`PromptDUL` in place of the one pynetdicom made (its socket and timers
        included); before the connection's handlers run and its threads start."""
        self._stirred = threading.Event()
        stock = self.dul
        dul = PromptDUL(self, self._stirred.set)
        dul.socket, dul.artim_timer, dul._idle_timer = stock.socket, stock.artim_timer, stock._idle_timer
        while not stock.event_queue.empty():  # the connection's own event (Evt5), queued by the socket
            dul.event_queue.put(stock.event_queue.get())
        self.dul = dul
        if type(dul.socket) is AssociationSocket:  # built by pynetdicom's handler, which names the class
            dul.socket.__class__ = _WholeReads
        self.dimse.msg_queue = _RingingQueue(self._stirred.set)

    def kill(self) -> None:
        self._kill = True
        self._stirred.set()
        super().kill()

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._stirred.wait(_IDLE_WAKE)
            self._stirred.clear()  # before looking: a stir from now on wakes the next wait
            # pynetdicom's pause for an acceptor that sends requests itself
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._stirred.set()  # another may be queued
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released, self.is_established = True, False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted, self.is_established = True, False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                _dul_log.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class PromptRequestHandler(RequestHandler):
    """Each accepted connection's association made a :class:`PromptAssociation`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.__class__ = PromptAssociation  # pynetdicom builds the Association class itself
        cast(PromptAssociation, assoc).make_prompt()
        return assoc


def sending_ae(node: NodeSettings, sop_classes: Sequence[str] = (), timeout: float | None = None) -> AE:
    """An SCU for one association: the storage SOP classes to propose (none: Verification only)."""
    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = (
        timeout or node.network_timeout
    )
    for sop_class in sorted(set(sop_classes)):
        ae.add_requested_context(sop_class, SENT_TRANSFER_SYNTAXES)
    if not sop_classes:
        ae.add_requested_context(Verification)
    return ae


def associate(
    settings: Settings,
    peer: Destination,
    sop_classes: Sequence[str] = (),
    timeout: float | None = None,
    handlers: Sequence[EventHandlerType] = (),
) -> Association:
    """An association as the node's AE with ``peer`` (a destination, the worklist server), over DICOM
    TLS where the peer says so, with the handlers every outgoing connection gets and ``handlers``.
    Raises ConfigError where the TLS files are not usable (changed since start)."""
    tls = tls_args(settings, peer)
    ae = sending_ae(settings.node, sop_classes, timeout)
    return ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=[*SOCKET_HANDLERS, *handlers], tls_args=tls
    )


def take_stores_directly(assoc: Any, on_broken: Callable[[Any, Exception], None]) -> None:
    """EVT_CONN_OPEN of a listener's association: its C-STOREs are taken by the fast path
    (node.dicom.store_fast_path) in its DUL thread; one it cannot go on with ends as in
    :func:`contain_failures`."""
    dul = assoc.dul
    if isinstance(dul, PromptDUL):
        dul.fast = StoreFastPath(dul, lambda exc: _abort_broken(assoc, exc, on_broken))


def discard_partial_data_set(assoc: Any) -> None:
    """Delete the file of a C-STORE data set the connection ended in the middle of (aborted, dropped,
    cut by a deadline). Never acknowledged; pynetdicom deletes only the files of whole requests, so a
    sender that streams and aborts again and again would fill the disk."""
    fast = getattr(getattr(assoc, "dul", None), "fast", None)
    if fast is not None:
        fast.discard()
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        partial.close()
        Path(partial.name).unlink(missing_ok=True)


def contain_failures(assoc: Any, on_broken: Callable[[Any, Exception], None]) -> None:
    """EVT_CONN_OPEN: pynetdicom aborts an association when reading a PDU fails, but not when acting on
    one — a P-DATA on a presentation context the association does not have, a command set its DIMSE
    decoder cannot read — : that ended its reader thread with a traceback, the peer unanswered, the
    partial data set left on disk and the socket open. And a request missing a required command
    element (an empty Affected SOP Instance UID) it drops unanswered, the sender waiting for a status
    until its timeout. Both now end as a failed read does: an A-ABORT, the association ended, its
    partial data set deleted, ``on_broken`` told."""
    dul = assoc.dul
    act = dul.state_machine.do_action

    def guarded(event: str) -> None:
        try:
            act(event)
        except Exception as exc:
            _abort_broken(assoc, exc, on_broken)

    def unanswerable(event: Any) -> None:
        message = event.message
        try:
            primitive = message.message_to_primitive()
        except Exception:  # pynetdicom aborts these itself
            return
        # pynetdicom's provider converts the message again right after this event: it gets this one
        message.message_to_primitive = lambda: primitive
        valid = (getattr(primitive, name, True) for name in ("is_valid_request", "is_valid_response"))
        if not any(valid):  # C-CANCEL has neither: pynetdicom keeps it apart
            _abort_broken(assoc, InvalidRequest(type(primitive).__name__), on_broken)

    dul.state_machine.do_action = guarded
    assoc.bind(evt.EVT_DIMSE_RECV, unanswerable)


class InvalidRequest(ValueError):
    """A DIMSE message without an element its service requires."""


def _abort_broken(assoc: Any, exc: Exception, on_broken: Callable[[Any, Exception], None]) -> None:
    dul = assoc.dul
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = 0x02, 0x00  # service provider, no reason given
    with contextlib.suppress(Exception):
        dul.socket.send(abort.encode())
    assoc.is_aborted, assoc.is_established = True, False
    assoc._kill = dul._kill_thread = True  # as pynetdicom ends an association whose read failed
    discard_partial_data_set(assoc)
    with contextlib.suppress(Exception):
        dul.socket.close()
    on_broken(assoc, exc)
