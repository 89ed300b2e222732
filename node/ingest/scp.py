"""The DICOM listener: Storage SCP and Verification SCP (pynetdicom).

Access control (called AE, calling-AE allow-list) and association limits are pynetdicom's, set in
node.dicom.network; each C-STORE's bytes go to :meth:`~node.ingest.accept.Ingest.accept` as they came.
A C-STORE is answered Success only once accept returns; everything else gets the Storage Service
status it raised, and an audit entry. No exception escapes into pynetdicom.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Settings
from node.db import Database
from node.dicom.network import SOCKET_HANDLERS, listening_ae
from node.ingest.accept import OUT_OF_RESOURCES, Ingest, Origin, Refused

log = logging.getLogger(__name__)

SUCCESS = 0x0000


def _origin(event: Any) -> Origin:
    requestor = event.assoc.requestor
    return Origin(
        calling_ae=requestor.ae_title.strip(),
        called_ae=event.assoc.acceptor.ae_title.strip(),
        address=f"{requestor.address}:{requestor.port}",
    )


class Receiver:
    """Runs the SCP in background threads."""

    def __init__(self, settings: Settings, db: Database, ingest: Ingest) -> None:
        self.settings = settings
        self.db = db
        self.ingest = ingest
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        node = self.settings.node
        self._server = listening_ae(node).start_server(
            (node.dicom_host, node.dicom_port),
            block=False,
            evt_handlers=[
                *SOCKET_HANDLERS,
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

    def _on_accepted(self, event: Any) -> None:
        _origin(event).audit(self.db, "association.accepted")

    def _on_rejected(self, event: Any) -> None:
        origin = _origin(event)
        origin.audit(self.db, "association.rejected", "failure", called_ae=origin.called_ae)
        log.warning(
            "association from %s rejected (calling %s, called %s)",
            origin.address,
            origin.calling_ae,
            origin.called_ae,
        )

    def _on_store(self, event: Any) -> int:
        try:
            self.ingest.accept(event.file_meta, event.encoded_dataset(include_meta=False), _origin(event))
        except Refused as refusal:  # accept audits its refusals and raises nothing else
            return refusal.status
        except Exception:  # pynetdicom could not hand the request over: the sender tries again later
            log.exception("C-STORE request unreadable")
            return OUT_OF_RESOURCES
        return SUCCESS
