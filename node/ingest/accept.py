"""The one way in: checks → durable spool write → arrival → index.

Whoever hands the node an instance — the DICOM listener today, an upload tomorrow — calls
:meth:`Ingest.accept`; an instance is safe once ``accept`` returns, because its file is durably in
the spool (node.spool). Reconciliation (node.ingest.reconcile) takes a spool file the index missed
down the same path from the arrival on. What cannot be accepted raises :class:`Refused` with the
Storage Service status a DICOM sender understands, and is audited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from collections.abc import Iterator
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset

from node import audit
from node.config import Settings
from node.db import Database
from node.dicom import filemeta
from node.ingest import checks
from node.ingest.conflicts import UID_CONFLICT, Conflicts
from node.ingest.index import Arrival
from node.privacy import failure
from node.spool import InvalidUID, Spool, check_uid

log = logging.getLogger(__name__)

# Storage Service statuses (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700  # the sender should retry later
DATASET_MISMATCH = 0xA900  # data set does not match the SOP class in the request
CANNOT_UNDERSTAND = 0xC000
INCOMPLETE = 0xC001  # cut short: an element, the pixel data or the deflate stream ends early
TOO_LARGE = 0xC002  # over [node] max_instance_mb, or inflating beyond max_inflated_mb
_REFUSED_AS = {
    checks.Unreadable: CANNOT_UNDERSTAND,
    checks.Incomplete: INCOMPLETE,
    checks.TooLarge: TOO_LARGE,
}


class Refused(Exception):
    """An instance the node did not store; ``status`` says why in the Storage Service's terms."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Origin:
    """Who handed the node an instance, and where to: what the audit log and the routes see. An
    upload has a ``user`` (the audit log's actor, node.accounts.Principal.actor) and no calling AE."""

    calling_ae: str
    called_ae: str
    address: str
    user: str = ""

    @property
    def actor(self) -> str:
        """Who the audit log names: the user, else the calling AE title."""
        return self.user or self.calling_ae

    def audit(self, db: Database, action: str, outcome: str = "success", **detail: Any) -> None:
        """Record, in its own transaction, something this origin did."""
        audit.append(db, action, actor=self.actor, outcome=outcome, address=self.address, **detail)


def arrival_of(path: Path, size: int, header: Dataset, called_ae: str = "", user: str = "") -> Arrival:
    """What a spool file is, read from its header and meta information alone (where the node keeps
    the AE titles it came with): so an instance reconciled after a crash routes as it would have.
    ``called_ae`` stands in for a file written before the node kept them there; ``user`` is who
    uploaded it (not kept in the file: one reconciled after a crash names no one)."""
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
        user=user,
    )


@contextlib.contextmanager
def _opened(dataset: bytes | Path, own: bool) -> Iterator[BinaryIO]:
    """``dataset`` to read from its first byte: the bytes themselves, or a Part 10 file after its meta
    information — skipped by its group length where the node wrote the file itself (``own``: the
    listener's), read and checked otherwise."""
    if isinstance(dataset, bytes):
        yield BytesIO(dataset)
        return
    with dataset.open("rb") as file:
        try:
            if not (own and checks.skip_own_meta(file)):
                checks.read_meta(file)
        except checks.Unreadable as exc:
            raise Refused(CANNOT_UNDERSTAND, str(exc)) from exc
        yield file


class Indexing(Protocol):
    """Where an accepted instance is handed: the node's Indexer, or, in a receiver process, its link
    to the node's (node.ingest.receivers). Raises queue.Full when the index is far behind."""

    def submit(self, arrival: Arrival) -> None: ...


def _begins_with(body: BinaryIO, start: int, head: bytes) -> bool:
    """Whether ``body``'s file is ``head`` (preamble and meta information), then the data set (from
    ``start``)."""
    body.seek(0)
    return start == len(head) and body.read(len(head)) == head


class Ingest:
    def __init__(self, settings: Settings, db: Database, spool: Spool, indexer: Indexing) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.indexer = indexer
        self.conflicts = Conflicts(db, spool)  # UIDs already taken elsewhere are refused
        self._receiving = Path(os.path.abspath(spool.receiving))

    def accept(self, meta: FileMetaDataset, dataset: bytes | Path, origin: Origin) -> Arrival:
        """Store one instance, its data set as it came (never decoded and re-encoded) behind the meta
        information given (Media Storage SOP Class and Instance UID as announced, Transfer Syntax),
        to which the AE titles are added; then index it. ``dataset`` is the data set itself, or a
        Part 10 file holding it (the listener's, received to disk; an upload), whose own meta
        information is skipped. Raises Refused, and nothing else: a failure of the node's own is
        refused as out of resources, so the sender tries again later."""
        try:
            received = self._received(dataset)
            with _opened(dataset, received is not None) as body:
                return self._accept(meta, body, origin, received)
        except Refused as refusal:
            self._audit_refusal(meta, origin, refusal)
            raise
        except Exception as exc:
            log.error("accepting an instance failed: %s", failure(exc))
            internal = Refused(OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
            self._audit_refusal(meta, origin, internal)
            raise internal from exc

    def _received(self, dataset: bytes | Path) -> Path | None:
        """``dataset`` where it is a listener's file under the spool's ``receiving/`` folder (a receiver
        process has a folder of its own there): the node's own, never acknowledged, removed once the
        C-STORE is answered — so it may become the spool file."""
        if isinstance(dataset, Path) and Path(os.path.abspath(dataset)).is_relative_to(self._receiving):
            return dataset
        return None

    def _accept(
        self, meta: FileMetaDataset, body: BinaryIO, origin: Origin, received: Path | None
    ) -> Arrival:
        start = body.tell()
        size = body.seek(0, os.SEEK_END) - start
        body.seek(start)
        if self.spool.free_bytes() - size < self.settings.node.min_free_disk_mb * 1024 * 1024:
            raise Refused(OUT_OF_RESOURCES, "free disk space below the configured floor")
        meta.SourceApplicationEntityTitle = self.settings.node.ae_title  # who wrote this file
        meta.SendingApplicationEntityTitle = origin.calling_ae
        meta.ReceivingApplicationEntityTitle = origin.called_ae
        try:
            announced = check_uid(meta.MediaStorageSOPInstanceUID, "Affected SOP Instance UID")
            check_uid(meta.MediaStorageSOPClassUID, "Affected SOP Class UID")
            head = filemeta.PREAMBLE + filemeta.encode(meta)
            header = checks.inspect(body, meta, self.settings.node)
            arrival = arrival_of(Path(), len(head) + size, header, user=origin.user)
        except checks.Unreadable as exc:
            raise Refused(_REFUSED_AS[type(exc)], str(exc)) from exc
        except InvalidUID as exc:  # names the UID, which carries no patient data
            raise Refused(CANNOT_UNDERSTAND, str(exc)) from exc
        except Exception as exc:  # whatever the parser trips on, the sender must not retry it as is; what
            # pydicom says may quote the values it could not read, so the reason is the exception's type
            raise Refused(CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}") from exc
        if arrival.sop_uid != announced:
            raise Refused(CANNOT_UNDERSTAND, "SOPInstanceUID differs from the request's")
        if str(header.get("SOPClassUID", meta.MediaStorageSOPClassUID)) != meta.MediaStorageSOPClassUID:
            raise Refused(DATASET_MISMATCH, "SOPClassUID differs from the request's")
        if (conflict := self.conflicts.check(arrival)) is not None:
            raise Refused(UID_CONFLICT, conflict)

        ids = (arrival.study_uid, arrival.series_uid, arrival.sop_uid)
        if received is not None and _begins_with(body, start, head):  # written as the node writes it (see
            staging = self.spool.adopted_instance(*ids, received)  # node.dicom.network.receive_to_disk)
        else:
            body.seek(start)
            staging = self.spool.staged_instance(*ids, head, body)
        with staging as staged, self.conflicts.settling(arrival):  # the complete file beside its place
            settled = self.conflicts.settle(arrival, staged.temp)  # None: the spool has this data set
            arrival = replace(settled or arrival, path=staged.path if settled is None else staged.commit())
        try:
            self.indexer.submit(arrival)
        except queue.Full:  # stored, but the index is far behind: slow the sender down
            self.conflicts.unsettle(arrival)  # a correction is taken whole when sent again, or not at all
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
        log.warning("instance from %s refused with 0x%04X: %s", origin.actor, refusal.status, refusal.reason)
