"""The one way in: checks → durable spool write → arrival → index.

Whoever hands the node an instance — the DICOM listener today, an upload tomorrow — calls
:meth:`Ingest.accept`; an instance is safe once ``accept`` returns, because its file is durably in
the spool (node.spool). Reconciliation (:meth:`Ingest.reconcile`) takes a spool file the index missed
down the same path from the arrival on. What cannot be accepted raises :class:`Refused` with the
Storage Service status a DICOM sender understands, and is audited.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pynetdicom.dsutils import encode_file_meta
from sqlalchemy import select

from node import audit
from node.config import Settings
from node.db import Database, Instance
from node.ingest.index import Arrival, Indexer, index_or_set_aside
from node.spool import Spool, check_uid

log = logging.getLogger(__name__)

# Storage Service statuses (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700  # the sender should retry later
DATASET_MISMATCH = 0xA900  # data set does not match the SOP class in the request
CANNOT_UNDERSTAND = 0xC000


class Refused(Exception):
    """An instance the node did not store; ``status`` says why in the Storage Service's terms."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Origin:
    """Who handed the node an instance, and where to: what the audit log and the routes see."""

    calling_ae: str
    called_ae: str
    address: str

    def audit(self, db: Database, action: str, outcome: str = "success", **detail: Any) -> None:
        """Record, in its own transaction, something this origin did."""
        audit.append(db, action, actor=self.calling_ae, outcome=outcome, address=self.address, **detail)


def arrival_of(path: Path, size: int, header: Dataset, called_ae: str = "") -> Arrival:
    """What a spool file is, read from its header and meta information alone (where the node keeps
    the AE titles it came with): so an instance reconciled after a crash routes as it would have.
    ``called_ae`` stands in for a file written before the node kept them there."""
    meta = header.file_meta
    return Arrival(
        study_uid=check_uid(header.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_uid=check_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_uid=check_uid(header.get("SOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=str(header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID", "")),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
        path=path,
        size=size,
        header=header,
        calling_ae=str(meta.get("SendingApplicationEntityTitle", "")).strip(),
        called_ae=str(meta.get("ReceivingApplicationEntityTitle", called_ae)).strip(),
    )


class Ingest:
    def __init__(self, settings: Settings, db: Database, spool: Spool, indexer: Indexer) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.indexer = indexer

    def accept(self, meta: FileMetaDataset, dataset: bytes, origin: Origin) -> Arrival:
        """Store one instance, its data set as it came (never decoded and re-encoded) behind the meta
        information given (Media Storage SOP Class and Instance UID as announced, Transfer Syntax),
        to which the AE titles are added; then index it. Raises Refused, and nothing else: a failure
        of the node's own is refused as out of resources, so the sender tries again later."""
        try:
            return self._accept(meta, dataset, origin)
        except Refused as refusal:
            self._audit_refusal(meta, origin, refusal)
            raise
        except Exception as exc:
            log.exception("accepting an instance failed")
            internal = Refused(OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
            self._audit_refusal(meta, origin, internal)
            raise internal from exc

    def _accept(self, meta: FileMetaDataset, dataset: bytes, origin: Origin) -> Arrival:
        if self.spool.free_bytes() < self.settings.node.min_free_disk_mb * 1024 * 1024:
            raise Refused(OUT_OF_RESOURCES, "free disk space below the configured floor")
        meta.SourceApplicationEntityTitle = self.settings.node.ae_title  # who wrote this file
        meta.SendingApplicationEntityTitle = origin.calling_ae
        meta.ReceivingApplicationEntityTitle = origin.called_ae
        data = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), dataset))
        try:
            announced = check_uid(meta.MediaStorageSOPInstanceUID, "Affected SOP Instance UID")
            header = dcmread(BytesIO(data), stop_before_pixels=True)
            arrival = arrival_of(Path(), len(data), header)
        except Exception as exc:  # whatever the parser trips on, the sender must not retry it as is
            raise Refused(CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}: {exc}") from exc
        if arrival.sop_uid != announced:
            raise Refused(CANNOT_UNDERSTAND, "SOPInstanceUID differs from the request's")
        if str(header.get("SOPClassUID", meta.MediaStorageSOPClassUID)) != meta.MediaStorageSOPClassUID:
            raise Refused(DATASET_MISMATCH, "SOPClassUID differs from the request's")

        path = self.spool.store_instance(arrival.study_uid, arrival.series_uid, arrival.sop_uid, data)
        arrival = replace(arrival, path=path)
        try:
            self.indexer.submit(arrival)
        except queue.Full:  # stored, but the index is far behind: slow the sender down
            raise Refused(OUT_OF_RESOURCES, "the database is not keeping up") from None
        return arrival

    def _audit_refusal(self, meta: FileMetaDataset, origin: Origin, refusal: Refused) -> None:
        try:
            origin.audit(
                self.db,
                "instance.refused",
                "failure",
                status=f"0x{refusal.status:04X}",
                reason=refusal.reason,
                sop_uid=str(meta.get("MediaStorageSOPInstanceUID") or "")[:64],
            )
        except Exception:  # the audit database itself may be what failed
            log.exception("could not audit a refused instance")
        log.warning(
            "instance from %s refused with 0x%04X: %s", origin.calling_ae, refusal.status, refusal.reason
        )

    def reconcile(self) -> int:
        """Index spool files the database does not know (stored, then the node died before indexing
        them), and delete partial writes, which were never acknowledged. A file that cannot be indexed
        is set aside (node.ingest.index.set_aside), so it cannot keep the node from starting. Returns
        how many were indexed."""
        for leftover in self.spool.leftover_temp_files():
            leftover.unlink(missing_ok=True)
        with self.db.session() as session:
            known = set(session.scalars(select(Instance.sop_uid)))
        found = 0
        for path in sorted(self.spool.incoming.glob("*/*/*.dcm")):
            if path.stem in known:
                continue
            try:
                header = dcmread(path, stop_before_pixels=True)
                arrival = arrival_of(path, path.stat().st_size, header, self.settings.node.ae_title)
            except Exception as exc:  # one damaged file must not keep the node from starting
                log.warning("spool file %s unreadable: %s", path.name, type(exc).__name__)
                audit.append(
                    self.db,
                    "instance.unreadable",
                    outcome="failure",
                    path=str(path),
                    error=type(exc).__name__,
                )
                continue
            if index_or_set_aside(self.db, arrival, self.settings.study, "instance.reindexed") is not None:
                found += 1
        return found
