"""The DICOM listener: Storage SCP and Verification SCP (pynetdicom).

Access control (called AE, calling-AE allow-list, tied to addresses where configured) and the limits
that keep the listener answering (node.dicom.limits) are set in node.dicom.network; every refusal is
audited and logged once per source per interval (node.ingest.refusals). Each C-STORE's bytes go to
:meth:`~node.ingest.accept.Ingest.accept` as they came. A C-STORE is answered Success only once accept
returns; everything else gets the Storage Service status it raised, and an audit entry. No exception
escapes into pynetdicom.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from node import audit
from node.config import Settings
from node.db import Database
from node.dicom.limits import ConnectionsElsewhere, ListenerGuard, ListenerLoad
from node.dicom.network import (
    SOCKET_HANDLERS,
    calling_ae_allowed,
    contain_failures,
    discard_partial_data_set,
    listening_ae,
    receive_to_disk,
    take_stores_directly,
)
from node.dicom.tls import listener_handlers, server_context
from node.ingest.accept import OUT_OF_RESOURCES, Ingest, Origin, Refused
from node.ingest.refusals import Refusal, RefusalLog
from node.privacy import failure

log = logging.getLogger(__name__)

BROKEN = "association.aborted"  # the audit action of an association aborted for a malformed request

SUCCESS = 0x0000

Complete = Callable[[Collection[tuple[str, str]], str], None]  # node.ingest.index.Indexer.complete


class Address(NamedTuple):
    """Where the listener listens."""

    host: str
    port: int
    tls: bool


def addresses(settings: Settings) -> list[Address]:
    """The plain listener, and beside it the DICOM TLS one where ``[tls] dicom_port`` is set: many
    modalities cannot do TLS, so TLS is a port of its own (DICOM's 2762), not a switch of the one."""
    node, tls = settings.node, settings.tls
    plain = Address(node.dicom_host, node.dicom_port, False)
    return (
        [plain, Address(tls.dicom_host or node.dicom_host, tls.dicom_port, True)]
        if tls.dicom_port
        else [plain]
    )


def _origin(event: Any) -> Origin:
    requestor = event.assoc.requestor
    return Origin(
        calling_ae=requestor.ae_title.strip(),
        called_ae=event.assoc.acceptor.ae_title.strip(),
        address=f"{requestor.address}:{requestor.port}",
    )


class Receiver:
    """Runs the SCP in background threads: in the node's process, or in each receiver process
    (node.ingest.receivers), which passes the sockets the node bound, the connections the other
    processes hold and a folder of its own for data sets being received."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        ingest: Ingest,
        complete: Complete,
        sockets: Mapping[Address, socket.socket] | None = None,
        elsewhere: ConnectionsElsewhere | None = None,
        receiving: Path | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.ingest = ingest
        self.complete = complete
        self.sockets = sockets or {}
        self.receiving = receiving or ingest.spool.receiving
        self._servers: list[ThreadedAssociationServer] = []
        self.refusals = RefusalLog(self._write_refusal, settings.node.refusal_audit_seconds)
        self.guard = ListenerGuard(settings.node, self.refusals.note, elsewhere or ConnectionsElsewhere())
        self._forwarders = set(settings.study.forwarders)
        self._delivered: dict[Any, set[tuple[str, str]]] = {}  # by association: series a forwarder sent
        self._delivered_lock = threading.Lock()

    def start(self) -> None:
        self.receiving.mkdir(parents=True, exist_ok=True)
        receive_to_disk(self.receiving)  # C-STORE data sets to disk, not to memory
        self.refusals.start()
        for address in addresses(self.settings):
            handshake: list[EventHandlerType] = []
            if address.tls:
                context = server_context(self.settings.tls, client_certificates=True)
                setup = self.settings.node.association_setup_seconds
                handshake = listener_handlers(context, setup, self._on_tls_refused)
            self._listen(address, handshake)

    def _listen(self, address: Address, first_handlers: list[EventHandlerType]) -> None:
        ae = listening_ae(self.settings.node, self.guard)
        ae.listening_socket = self.sockets.get(address)
        host, port = address.host, address.port
        server = ae.start_server(
            (host, port),
            block=False,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, self.guard.adopt),  # first: counts the connection's threads
                (evt.EVT_CONN_OPEN, lambda event: contain_failures(event.assoc, self._on_broken)),
                (evt.EVT_CONN_OPEN, lambda event: take_stores_directly(event.assoc, self._on_broken)),
                (evt.EVT_REQUESTED, self.guard.requested),  # first: ends a connection aborted in set-up
                *first_handlers,
                *SOCKET_HANDLERS,
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_REJECTED, self._on_rejected),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_RELEASED, self._on_released),
                (evt.EVT_CONN_CLOSE, lambda event: discard_partial_data_set(event.assoc)),
                (evt.EVT_CONN_CLOSE, self._forget),
            ],
        )
        assert server is not None  # non-blocking: pynetdicom returns the running server
        self._servers.append(server)
        tls = " (TLS)" if first_handlers else ""
        log.info("DICOM listener %s on %s:%d%s", self.settings.node.ae_title, host, port, tls)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self._servers = []
        self.refusals.stop()

    def load(self) -> ListenerLoad:
        """Connections open now, all listeners together, against ``max_associations`` (/healthz)."""
        return self.guard.load()

    def _write_refusal(self, refusal: Refusal) -> None:
        """One audit entry and one log line for a source's refusals (see node.ingest.refusals)."""
        audit.append(
            self.db,
            refusal.action,
            actor=refusal.calling_ae,
            outcome="failure",
            address=refusal.address,
            reason=refusal.reason,
            count=refusal.count,
        )
        log.warning(
            "%s from %s (calling %s): %s (%d time(s))",
            refusal.action,
            refusal.address,
            refusal.calling_ae or "-",
            refusal.reason,
            refusal.count,
        )

    def _on_broken(self, assoc: Any, exc: Exception) -> None:
        """An association aborted because pynetdicom could not act on what the peer sent."""
        self.refusals.note(assoc.requestor.address, f"malformed request: {type(exc).__name__}", action=BROKEN)

    def _on_tls_refused(self, event: Any, reason: str) -> None:
        self.refusals.note(event.assoc.requestor.address, reason, action="association.tls_refused")

    def _on_requested(self, event: Any) -> None:
        """A calling AE tied to addresses, from another: rejected as one not recognised (PS3.8)."""
        assoc = event.assoc
        if assoc.is_aborted:  # by the guard
            return
        calling_ae = assoc.requestor.primitive.calling_ae_title.strip()
        if not calling_ae_allowed(self.settings.node, calling_ae, assoc.requestor.address):
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
            self.refusals.note(
                assoc.requestor.address, "calling AE not allowed from this address", calling_ae
            )
            assoc.kill()

    def _on_accepted(self, event: Any) -> None:
        """Audited with the SOP classes whose contexts were rejected (``unknown_sop_classes = "refuse"``)."""
        refused = sorted(str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts)
        detail: dict[str, Any] = {"refused_sop_classes": refused} if refused else {}
        _origin(event).audit(self.db, "association.accepted", process=os.getpid(), **detail)

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        if request.called_ae_title.strip() != assoc.acceptor.ae_title.strip():
            reason = f"called AE {request.called_ae_title.strip()!r} is not this node's"
        elif (
            assoc.ae.require_calling_aet
            and request.calling_ae_title.strip() not in assoc.ae.require_calling_aet
        ):
            reason = "calling AE not allowed"
        else:
            reason = f"over max_associations ({assoc.ae.maximum_associations})"
        self.refusals.note(assoc.requestor.address, reason, request.calling_ae_title.strip())

    def _on_store(self, event: Any) -> int | Dataset:
        """The data set was received to a file (see node.dicom.network.receive_to_disk), which
        pynetdicom deletes once this returns. A refusal's reason goes back as the Error Comment, so
        the sender's log says why."""
        origin = _origin(event)
        try:
            arrival = self.ingest.accept(event.file_meta, event.dataset_path, origin)
        except Refused as refusal:  # accept audits its refusals and raises nothing else
            status = Dataset()
            status.Status = refusal.status
            status.ErrorComment = refusal.reason[:64]
            return status
        except Exception as exc:  # pynetdicom could not hand the request over: the sender tries again later
            log.error("C-STORE request unreadable: %s", failure(exc))
            return OUT_OF_RESOURCES
        if origin.calling_ae in self._forwarders:
            with self._delivered_lock:
                self._delivered.setdefault(event.assoc, set()).add((arrival.study_uid, arrival.series_uid))
        return SUCCESS

    def _on_released(self, event: Any) -> None:
        """A forwarder sends a series whole in one association: once it releases the association,
        the series it delivered are complete (after their arrivals: accept handed them over first)."""
        delivered = self._forget(event)
        if delivered:
            calling_ae = event.assoc.requestor.ae_title.strip()
            try:
                self.complete(sorted(delivered), f"association released by forwarder {calling_ae}")
            except Exception as exc:  # the quiet period completes them all the same
                log.error("completing what forwarder %s delivered failed: %s", calling_ae, failure(exc))

    def _forget(self, event: Any) -> set[tuple[str, str]]:
        """What the association delivered, no longer kept (an aborted one's series stay incomplete)."""
        with self._delivered_lock:
            return self._delivered.pop(event.assoc, set())
