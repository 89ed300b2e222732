"""The node's Application Entities: one listening (Storage SCP, Verification SCP), one per send or echo.

Both are built here so that what every association needs — Nagle off on its socket, the timeouts, and
later a TLS context — is set in one place.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any

from pydicom import uid
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import NodeSettings
from node.dicom.limits import GuardedAE, ListenerGuard

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
    ae = GuardedAE(node.ae_title, guard)
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
    # The file starts with meta information built from the request's command set; pynetdicom writes it
    # enforcing the standard, so a request with an empty Affected SOP Instance UID raised in its reader
    # thread and the connection dropped, unanswered. Written as it is, the request reaches the C-STORE
    # handler, where accept refuses it (0xC000) and audits it like any other.
    dimse_messages.write_file_meta_info = partial(write_file_meta_info, enforce_standard=False)


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


def discard_partial_data_set(assoc: Any) -> None:
    """Delete the file of a C-STORE data set the connection ended in the middle of (aborted, dropped,
    cut by a deadline). Never acknowledged; pynetdicom deletes only the files of whole requests, so a
    sender that streams and aborts again and again would fill the disk."""
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
        try:
            primitive = event.message.message_to_primitive()
        except Exception:  # pynetdicom aborts these itself
            return
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
