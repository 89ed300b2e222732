"""The index of what arrived: patient, study, series and instance rows for each stored instance.

The spool file is what makes an instance safe; the index rows only describe it, so indexing follows
the acknowledgement, in batches, on its own thread (:class:`Indexer`). An arrival the node did not get
to index before dying is found again by reconciliation (:meth:`node.ingest.accept.Ingest.reconcile`).
One that cannot be indexed because of what it holds is set aside (:func:`set_aside`), never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from node import audit
from node.config import StudySettings
from node.db import Database, Instance, Patient, Series, SeriesStatus, Study, utcnow
from node.dicom.header import encode
from node.ingest import completion

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"  # beside the spool's incoming/: instances that cannot be indexed
# The database itself failing, not the instance: the file stays in the spool for a later try.
DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError)


@dataclass(frozen=True)
class Arrival:
    """One stored instance: what it is (its parsed header; every UID validated), where it lies and
    who sent it (the calling and called AE titles, also kept in the file's meta information)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int
    header: Dataset
    calling_ae: str = ""
    called_ae: str = ""


@dataclass(frozen=True)
class Indexed:
    duplicate: bool  # the same SOP Instance UID had been stored before
    late: bool  # arrived after its series had been routed
    series_ready: bool  # the series is complete now (see node.ingest.completion)


def storable(value: str) -> str:
    """``value`` as every supported database can store it. NUL characters are removed, not escaped:
    PostgreSQL text cannot hold them, and in a DICOM text value they carry no meaning (at most
    padding), while an escape would make up characters the sender never sent. A character UTF-8
    cannot encode (a lone surrogate) becomes "?". The spool file keeps every value as received."""
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    return storable(str(ds.get(keyword, "") or ""))[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    """An IS value as a database integer; out of the 32-bit range (legal in IS) counts as absent."""
    try:
        value = int(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if -(2**31) <= value < 2**31 else None


def index_arrival(session: Session, arrival: Arrival, study_settings: StudySettings) -> Indexed:
    """Insert or update the rows for one stored instance; its series' readiness follows."""
    now = utcnow()
    ds = arrival.header
    study = session.scalar(select(Study).where(Study.study_uid == arrival.study_uid))
    if study is None:
        patient_id, patient_name = _text(ds, "PatientID", 64), _text(ds, "PatientName", 324)
        # ID and name together: an empty or reused ID must not merge two people's studies.
        patient = session.scalar(
            select(Patient).where(Patient.patient_id == patient_id, Patient.patient_name == patient_name)
        )
        if patient is None:
            patient = Patient(patient_id=patient_id, patient_name=patient_name)
            session.add(patient)
        study = Study(
            study_uid=arrival.study_uid,
            patient=patient,
            study_date=_text(ds, "StudyDate", 8),
            accession_number=_text(ds, "AccessionNumber", 16),
            description=_text(ds, "StudyDescription", 64),
            first_received_at=now,
        )
        session.add(study)
    study.last_received_at = now

    series = session.scalar(select(Series).where(Series.series_uid == arrival.series_uid))
    if series is None:
        series = Series(
            series_uid=arrival.series_uid,
            study=study,
            modality=_text(ds, "Modality", 16).upper(),
            body_part=_text(ds, "BodyPartExamined", 16).upper(),
            description=_text(ds, "SeriesDescription", 64),
            series_number=_int(ds, "SeriesNumber"),
            calling_ae=storable(arrival.calling_ae),
            called_ae=storable(arrival.called_ae),
            header=encode(ds),
            first_received_at=now,
        )
        session.add(series)

    instance = session.scalar(select(Instance).where(Instance.sop_uid == arrival.sop_uid))
    duplicate = instance is not None
    if instance is None:
        session.add(
            Instance(
                sop_uid=arrival.sop_uid,
                series=series,
                sop_class_uid=storable(arrival.sop_class_uid),
                transfer_syntax=storable(arrival.transfer_syntax),
                instance_number=_int(ds, "InstanceNumber"),
                path=str(arrival.path),
                size=arrival.size,
                received_at=now,
            )
        )
        series.instance_count = (series.instance_count or 0) + 1
    else:
        instance.times_received += 1
        instance.received_at = now
        instance.transfer_syntax = storable(arrival.transfer_syntax)
        instance.size = arrival.size
        if instance.series_fk != series.id or instance.path != str(arrival.path):
            # The same SOP Instance UID re-sent under another series: it belongs where it now is.
            instance.series.instance_count -= 1
            instance.series = series
            instance.path = str(arrival.path)
            series.instance_count = (series.instance_count or 0) + 1

    late = completion.arrived(series, study_settings, now, duplicate)
    return Indexed(duplicate=duplicate, late=late, series_ready=series.status == SeriesStatus.READY)


def index_arrivals(
    db: Database, arrivals: Sequence[Arrival], study_settings: StudySettings, action: str = "instance.stored"
) -> bool:
    """Index ``arrivals`` in one transaction, each audited as ``action``. Returns whether a series
    became ready."""
    ready = False
    with db.session() as session:
        for arrival in arrivals:
            indexed = index_arrival(session, arrival, study_settings)
            ready = ready or indexed.series_ready
            audit.record(
                session,
                action,
                actor=storable(arrival.calling_ae),
                study_uid=arrival.study_uid,
                series_uid=arrival.series_uid,
                sop_uid=arrival.sop_uid,
                bytes=arrival.size,
                duplicate=indexed.duplicate,
                late=indexed.late,
            )
            session.flush()  # the next arrival of the batch sees this one's rows
    return ready


def set_aside(db: Database, arrival: Arrival, reason: str) -> None:
    """Audit, then move from the spool's ``incoming/`` to ``quarantine/`` (same path beneath), an
    acknowledged instance that cannot be indexed: kept for someone to look at, never deleted, and no
    longer retried at every start. Audited first, so a file whose audit failed stays where
    reconciliation finds it again; a rename lost to a power cut only means it is set aside again.
    A file outside the spool's layout stays where it is, marked by its audit row alone."""
    path, target = arrival.path, None
    incoming = path.parents[2] if len(path.parents) > 2 else None
    if incoming is not None and incoming.name == "incoming":
        target = incoming.parent / QUARANTINE / path.relative_to(incoming)
    audit.append(
        db,
        "instance.set_aside",
        outcome="failure",
        actor=storable(arrival.calling_ae),
        study_uid=arrival.study_uid,
        series_uid=arrival.series_uid,
        sop_uid=arrival.sop_uid,
        path=str(path),
        moved_to=str(target or ""),
        reason=reason,
    )
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def index_or_set_aside(
    db: Database, arrival: Arrival, study_settings: StudySettings, action: str = "instance.stored"
) -> bool | None:
    """Index one arrival alone; if that fails because of the arrival (not the database), set it
    aside. Returns whether a series became ready, None when set aside; raises only when the database
    failed (DATABASE_UNAVAILABLE, or while setting aside), the file then left in the spool."""
    try:
        return index_arrivals(db, [arrival], study_settings, action)
    except DATABASE_UNAVAILABLE:
        raise
    except Exception as exc:  # what the exception says may quote patient data: its type is the reason
        log.exception("instance %s cannot be indexed; it is set aside", arrival.path.name)
        set_aside(db, arrival, f"cannot be indexed: {type(exc).__name__}")
        return None


class Indexer:
    """Indexes arrivals in batches on its own thread, after they were acknowledged: one database
    transaction per burst instead of one per instance."""

    BATCH = 200

    def __init__(self, db: Database, study_settings: StudySettings, on_ready: Callable[[], None]) -> None:
        self.db = db
        self.study_settings = study_settings
        self.on_ready = on_ready
        self._queue: queue.Queue[Arrival | None] = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, arrival: Arrival, timeout: float = 30.0) -> None:
        """Queue one arrival; raises queue.Full when the database has fallen far behind."""
        self._queue.put(arrival, timeout=timeout)

    def stop(self) -> None:
        """Index what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            stopping = item is None
            batch = [] if item is None else [item]
            while not stopping and len(batch) < self.BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            try:
                if batch and self._index(batch):
                    self.on_ready()
            except Exception:  # never let the indexer thread die
                log.exception("indexer step failed")

    def _index(self, batch: list[Arrival]) -> bool:
        """Index a batch in one transaction; after repeated failures, one arrival at a time, setting
        aside (and auditing) any that cannot be indexed. Returns whether a series became ready."""
        for attempt in range(3):
            try:
                return index_arrivals(self.db, batch, self.study_settings)
            except Exception:  # the database is down or busy: the files are safe, try again
                log.exception("indexing %d arrival(s) failed (attempt %d)", len(batch), attempt + 1)
                time.sleep(0.5 * 2**attempt)
        ready = False
        for arrival in batch:
            try:
                ready = bool(index_or_set_aside(self.db, arrival, self.study_settings)) or ready
            except Exception as exc:
                log.exception("arrival could not be indexed; it stays in the spool")
                with contextlib.suppress(Exception):
                    audit.append(
                        self.db,
                        "instance.index_failed",
                        outcome="failure",
                        study_uid=arrival.study_uid,
                        sop_uid=arrival.sop_uid,
                        path=str(arrival.path),
                        error=type(exc).__name__,
                    )
        return ready
