"""The DICOM listener: Storage SCP and Verification SCP (pynetdicom).

A C-STORE is answered Success only after the received bytes — written as they came, no decode or
re-encode — are durably in the spool; the indexer then records them in the database. Everything else
gets a DICOM failure status the sender understands, and an audit entry; no exception escapes into
pynetdicom.
"""

from __future__ import annotations

import logging
import queue
import socket
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node import audit
from node.config import Settings
from node.db import Database
from node.index import Arrival, Indexer
from node.spool import Spool, check_uid

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the sender should retry later
DATASET_MISMATCH = 0xA900  # data set does not match the SOP class in the request
CANNOT_UNDERSTAND = 0xC000


def set_nodelay(event: Any) -> None:
    """Small PDU writes stall ~40 ms each on Nagle + delayed ACK; turn Nagle off on every socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(event: Any) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return requestor.ae_title.strip(), f"{requestor.address}:{requestor.port}"


class Receiver:
    """Runs the SCP in background threads and hands each stored instance to the indexer."""

    def __init__(self, settings: Settings, db: Database, spool: Spool, indexer: Indexer) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.indexer = indexer
        self._server: ThreadedAssociationServer | None = None

    def _application_entity(self) -> AE:
        node = self.settings.node
        _config.UNRESTRICTED_STORAGE_SERVICE = True  # private and future storage SOP classes too
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=node.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.maximum_associations = node.max_associations
        ae.network_timeout = node.network_timeout
        ae.maximum_pdu_size = 0
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        node = self.settings.node
        self._server = self._application_entity().start_server(
            (node.dicom_host, node.dicom_port),
            block=False,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, set_nodelay),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_REJECTED, self._on_rejected),
                (evt.EVT_C_STORE, self._on_store),
            ],
        )
        log.info("DICOM listener %s on %s:%d", node.ae_title, node.dicom_host, node.dicom_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def _on_accepted(self, event: Any) -> None:
        calling, address = _peer(event)
        audit.append(self.db, "association.accepted", actor=calling, address=address)

    def _on_rejected(self, event: Any) -> None:
        calling, address = _peer(event)
        called = event.assoc.acceptor.ae_title.strip()
        audit.append(
            self.db,
            "association.rejected",
            actor=calling,
            outcome="failure",
            address=address,
            called_ae=called,
        )
        log.warning("association from %s rejected (calling %s, called %s)", address, calling, called)

    def _refuse(self, event: Any, status: int, reason: str) -> int:
        calling, address = _peer(event)
        try:
            audit.append(
                self.db,
                "instance.refused",
                actor=calling,
                outcome="failure",
                address=address,
                status=f"0x{status:04X}",
                reason=reason,
                sop_uid=str(event.request.AffectedSOPInstanceUID or "")[:64],
            )
        except Exception:  # the audit database itself may be what failed
            log.exception("could not audit a refused instance")
        log.warning("C-STORE from %s refused with 0x%04X: %s", calling, status, reason)
        return status

    def _on_store(self, event: Any) -> int:
        try:
            return self._store(event)
        except Exception as exc:  # never let one bad instance take the listener down
            log.exception("C-STORE failed")
            return self._refuse(event, OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")

    def _store(self, event: Any) -> int:
        if self.spool.free_bytes() < self.settings.node.min_free_disk_mb * 1024 * 1024:
            return self._refuse(event, OUT_OF_RESOURCES, "free disk space below the configured floor")
        try:
            sop_uid = check_uid(event.request.AffectedSOPInstanceUID, "Affected SOP Instance UID")
            data = event.encoded_dataset(include_meta=True)
            header = dcmread(BytesIO(data), stop_before_pixels=True)
            study_uid = check_uid(header.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = check_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID")
        except Exception as exc:  # whatever the parser trips on, the sender must not retry it as is
            return self._refuse(event, CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}: {exc}")
        if str(header.get("SOPInstanceUID", "")) != sop_uid:
            return self._refuse(event, CANNOT_UNDERSTAND, "SOPInstanceUID differs from the request's")
        sop_class = str(event.request.AffectedSOPClassUID)
        if str(header.get("SOPClassUID", sop_class)) != sop_class:
            return self._refuse(event, DATASET_MISMATCH, "SOPClassUID differs from the request's")

        path = self.spool.store_instance(study_uid, series_uid, sop_uid, data)
        calling, address = _peer(event)
        arrival = Arrival(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            sop_class_uid=sop_class,
            transfer_syntax=str(event.context.transfer_syntax),
            path=path,
            size=len(data),
            header=header,
            calling_ae=calling,
            called_ae=event.assoc.acceptor.ae_title.strip(),
        )
        try:
            self.indexer.submit(arrival)
        except queue.Full:  # stored, but the index is far behind: slow the sender down
            return self._refuse(event, OUT_OF_RESOURCES, "the database is not keeping up")
        return SUCCESS
