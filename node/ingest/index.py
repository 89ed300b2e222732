"""The index of what arrived: patient, study, series and instance rows for each stored instance.

The spool file is what makes an instance safe; the index rows only describe it, so indexing follows
the acknowledgement, in batches, on its own thread (:class:`Indexer`). An arrival the node did not get
to index before dying is found again by reconciliation (:mod:`node.ingest.reconcile`). One that cannot
be indexed because of what it holds is set aside (:func:`set_aside`), never fatal; while the database
is unavailable the indexer holds what it has and tries again until it is back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
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
from node.ingest.conflicts import PatientKey, Superseded, UIDConflict, conflict_with
from node.privacy import failure
from node.spool import move_durably

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"  # beside the spool's incoming/: instances that cannot be indexed
# The database itself failing, not the instance: the file stays in the spool for a later try.
DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError)


@dataclass(frozen=True)
class Arrival:
    """One stored instance: what it is (its parsed header; every UID validated), where it lies and
    who sent it (the calling and called AE titles, also kept in the file's meta information; the user
    who uploaded it, kept only here)."""

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
    user: str = ""  # node.accounts.Principal.actor of an upload: the audit log's actor
    supersedes: Superseded | None = None  # a correction: the earlier version, kept aside

    @property
    def actor(self) -> str:
        """Who the audit log names: the user of an upload, else the calling AE title."""
        return self.user or self.calling_ae

    @property
    def patient(self) -> PatientKey:
        """PatientID and PatientName as the index stores and compares them."""
        return _text(self.header, "PatientID", 64), _text(self.header, "PatientName", 324)


@dataclass(frozen=True)
class Indexed:
    duplicate: bool  # the same SOP Instance UID had been stored before
    identical: bool  # a duplicate with the same data set: nothing changed
    late: bool  # arrived after its series had been routed (a correction counts as late)
    series_ready: bool  # the series is complete now (see node.ingest.completion)


def storable(value: str) -> str:
    """``value`` as every supported database can store it. NUL characters are removed, not escaped:
    PostgreSQL text cannot hold them, and in a DICOM text value they carry no meaning (at most
    padding), while an escape would make up characters the sender never sent. A character UTF-8
    cannot encode (a lone surrogate) becomes "?". The spool file keeps every value as received."""
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """A text element as the index stores it; one the sender encoded so that pydicom cannot read it
    (a name sent with VR FD, an unknown VR) counts as absent rather than keep the instance out."""
    try:
        value = ds.get(keyword, "")
    except Exception as exc:
        log.warning("%s unreadable, indexed as empty: %s", keyword, type(exc).__name__)
        return ""
    return storable(str(value or ""))[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    """An IS value as a database integer; out of the 32-bit range (legal in IS) counts as absent."""
    try:
        value = int(ds.get(keyword))
    except Exception:  # not a number, "1e999" read as infinity, an element pydicom cannot read
        return None
    return value if -(2**31) <= value < 2**31 else None


@dataclass
class _Known:
    """The study, series and instance rows of a batch's arrivals, by UID, looked up together and added
    to as the batch makes new ones: one query per kind per batch, not three queries and a flush per
    arrival (the indexer's cost, and the GIL it holds, while an association streams in)."""

    studies: dict[str, Study]
    series: dict[str, Series]
    instances: dict[str, Instance]

    @classmethod
    def of(cls, session: Session, arrivals: Sequence[Arrival]) -> _Known:
        return cls(
            {
                row.study_uid: row
                for row in session.scalars(
                    select(Study).where(Study.study_uid.in_({a.study_uid for a in arrivals}))
                )
            },
            {
                row.series_uid: row
                for row in session.scalars(
                    select(Series).where(Series.series_uid.in_({a.series_uid for a in arrivals}))
                )
            },
            {
                row.sop_uid: row
                for row in session.scalars(
                    select(Instance).where(Instance.sop_uid.in_({a.sop_uid for a in arrivals}))
                )
            },
        )


def index_arrival(
    session: Session, arrival: Arrival, study_settings: StudySettings, known: _Known | None = None
) -> Indexed:
    """Insert or update the rows for one stored instance; its series' readiness follows. ``known``:
    the rows of its batch (default: looked up for it alone). Raises UIDConflict, having changed
    nothing, for an instance whose UIDs are taken elsewhere (node.ingest.conflicts): one accepted
    while the database could not be asked."""
    now = utcnow()
    ds = arrival.header
    known = known or _Known.of(session, [arrival])
    study = known.studies.get(arrival.study_uid)
    series = known.series.get(arrival.series_uid)
    instance = known.instances.get(arrival.sop_uid)
    conflict = conflict_with(
        arrival,
        (study.patient.patient_id, study.patient.patient_name) if study else None,
        series.study.study_uid if series else None,
        (instance.series.study.study_uid, instance.series.series_uid) if instance else None,
    )
    if conflict is not None:
        raise conflict
    if study is None:
        patient_id, patient_name = arrival.patient
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
        known.studies[arrival.study_uid] = study
    study.last_received_at = now

    announced = completion.announcement(ds)
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
            announced=announced,
            status=SeriesStatus.RECEIVING,  # read below, before a flush would set the default
            first_received_at=now,
        )
        session.add(series)
        known.series[arrival.series_uid] = series

    duplicate = instance is not None
    if instance is None:
        instance = Instance(sop_uid=arrival.sop_uid, series=series, times_received=1)
        session.add(instance)
        known.instances[arrival.sop_uid] = instance
        series.instance_count = (series.instance_count or 0) + 1
    else:
        instance.times_received += 1
    instance.received_at = now
    if not duplicate or arrival.supersedes is not None:  # describe what the file now holds
        instance.sop_class_uid = storable(arrival.sop_class_uid)
        instance.transfer_syntax = storable(arrival.transfer_syntax)
        instance.instance_number = _int(ds, "InstanceNumber")
        instance.path = str(arrival.path)
        instance.size = arrival.size
    if arrival.supersedes is not None:
        audit.record(
            session,
            "instance.replaced",
            **_about(arrival),
            kept_at=arrival.supersedes.kept_at,
            old_bytes=arrival.supersedes.old_size,
            old_sha256=arrival.supersedes.old_sha256,
            new_bytes=arrival.supersedes.new_size,
            new_sha256=arrival.supersedes.new_sha256,
        )
    identical = duplicate and arrival.supersedes is None
    late = completion.arrived(session, series, study_settings, now, identical, announced)
    return Indexed(
        duplicate=duplicate, identical=identical, late=late, series_ready=series.status == SeriesStatus.READY
    )


def _about(arrival: Arrival) -> dict[str, str]:
    """Who sent an arrival and what it is, as every audit event about it names them."""
    return {
        "actor": storable(arrival.actor),
        "study_uid": arrival.study_uid,
        "series_uid": arrival.series_uid,
        "sop_uid": arrival.sop_uid,
    }


def index_arrivals(
    db: Database, arrivals: Sequence[Arrival], study_settings: StudySettings, action: str = "instance.stored"
) -> bool:
    """Index ``arrivals`` in one transaction, each audited as ``action``. Returns whether a series
    became ready."""
    ready = False
    with db.session() as session:
        known = _Known.of(session, arrivals)
        for arrival in arrivals:
            if not arrival.path.is_file():
                # Deleted between its acknowledgement and now (its study deleted by an admin or by
                # retention while a sender re-sent it): a row would point at nothing.
                audit.record(
                    session,
                    "instance.gone",
                    outcome="failure",
                    **_about(arrival),
                    reason="its file was deleted before it was indexed",
                )
                continue
            indexed = index_arrival(session, arrival, study_settings, known)
            ready = ready or indexed.series_ready
            audit.record(
                session,
                action,
                **_about(arrival),
                bytes=arrival.size,
                duplicate=indexed.duplicate,
                identical=indexed.identical,
                late=indexed.late,
            )
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
        **_about(arrival),
        path=str(path),
        moved_to=str(target or ""),
        reason=reason,
    )
    if target is not None:
        try:
            move_durably(path, target)
        except FileNotFoundError:
            if path.exists():  # the quarantine folder went: the node's own failure, tried again
                raise
            # Gone meanwhile (its study deleted): nothing left to set aside. Raising would have the
            # indexer retry this arrival, and everything queued behind it, for ever.
            log.warning("instance %s was gone before it could be set aside", path.name)


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
    except Exception as exc:  # what the exception says may quote patient data: its type is the reason,
        # except for a UID conflict, whose message names only its kind and the UIDs
        log.error("instance %s cannot be indexed; it is set aside: %s", arrival.path.name, failure(exc))
        reason = str(exc) if isinstance(exc, UIDConflict) else f"cannot be indexed: {type(exc).__name__}"
        set_aside(db, arrival, reason)
        return None


@dataclass(frozen=True)
class Unindexed:
    """What was acknowledged and is not indexed yet (queued, or waiting for the database): none of its
    series may be declared complete, nor its study stable, and reconciliation leaves its files to the
    indexer."""

    study_uids: frozenset[str]
    series_uids: frozenset[str]
    paths: frozenset[Path]
    since: float | None  # the earliest of their times handed over, or written (time.time()); None: nothing


@dataclass(frozen=True)
class _Queued:
    ticket: int  # the key of its entry among the pending
    arrival: Arrival
    action: str  # its audit action: stored, or reindexed (found by reconciliation)


@dataclass(frozen=True)
class _Complete:
    """A declaration that these series, and every series of these studies, are complete as of
    everything queued before it (node.ingest.completion.declare_complete)."""

    series_uids: frozenset[str]
    study_uids: frozenset[str]
    reason: str


@dataclass
class _Outage:
    started: float  # time.monotonic()
    error: str  # the exception's type: its text may quote patient data
    waiting: int = 0  # the most arrivals held unindexed at once


class Indexer:
    """Indexes arrivals in batches on its own thread, after they were acknowledged: one database
    transaction per burst instead of one per instance. While the database is unavailable it keeps what
    it holds and tries again, backing off, until the database is back, then audits the outage once:
    nothing acknowledged is dropped. What it keeps is the Arrival (a header; its file is safe on disk),
    at most ``QUEUED`` of them: then ``submit`` refuses, and the sender is told to try later."""

    BATCH = 200
    QUEUED = 10_000
    RETRY_FIRST, RETRY_MAX = 0.5, 4.0  # seconds between tries while the database is unavailable
    STOP_WAIT = 60.0  # seconds stop() waits for the thread: what is left is indexed at the next start
    DECLARE_WAIT = 5.0  # seconds a completion declaration waits for room in a full queue
    # Seconds a batch waits for more arrivals after its first: while an association streams in, one
    # transaction (and its commit and audit chaining) per burst rather than per instance or two.
    LINGER = 0.1

    def __init__(self, db: Database, study_settings: StudySettings, on_ready: Callable[[], None]) -> None:
        self.db = db
        self.study_settings = study_settings
        self.on_ready = on_ready
        self._queue: queue.Queue[_Queued | _Complete | None] = queue.Queue(maxsize=self.QUEUED)
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Arrival, float]] = {}  # by ticket: the arrival, since when
        self._tickets = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(
        self,
        arrival: Arrival,
        timeout: float = 30.0,
        action: str = "instance.stored",
        since: float | None = None,
    ) -> None:
        """Queue one arrival; raises queue.Full when the database has fallen far behind (the file stays
        in the spool, where reconciliation finds it). ``since``: when its file was written, where that
        is long before now (one reconciliation found), so that the watermark stays behind the file."""
        with self._lock:
            ticket = next(self._tickets)
            self._pending[ticket] = (arrival, time.time() if since is None else since)
        try:
            self._queue.put(_Queued(ticket, arrival, action), timeout=timeout)
        except queue.Full:
            self._done([ticket])
            raise

    def complete(self, series: Collection[tuple[str, str]], reason: str) -> None:
        """Declare these (study UID, series UID) series complete as of everything submitted before this
        call: once that is indexed, those still receiving become ready at once, audited with
        ``reason`` (what declared them complete). Called when a forwarder's association is released."""
        self._declare(_Complete(frozenset(uid for _, uid in series), frozenset(), reason))

    def complete_study(self, study_uid: str, reason: str) -> None:
        """Declare every series of a study complete as of everything submitted before this call, as
        :meth:`complete` does (a study-complete notification)."""
        self._declare(_Complete(frozenset(), frozenset({study_uid}), reason))

    def _declare(self, declaration: _Complete) -> None:
        try:
            self._queue.put(declaration, timeout=self.DECLARE_WAIT)
        except queue.Full:  # the database has fallen far behind: the quiet period will do
            log.warning("indexer full: a completion declaration (%s) is dropped", declaration.reason)

    def unindexed(self) -> Unindexed:
        """A snapshot of what was handed over and is not indexed (or set aside) yet."""
        with self._lock:
            held = list(self._pending.values())
        return Unindexed(
            study_uids=frozenset(arrival.study_uid for arrival, _ in held),
            series_uids=frozenset(arrival.series_uid for arrival, _ in held),
            paths=frozenset(arrival.path for arrival, _ in held),
            since=min((since for _, since in held), default=None),
        )

    def stop(self) -> None:
        """Index what is queued, then stop; while the database is unavailable, stop at once: what is
        left is in the spool, and reconciliation at the next start indexes it."""
        self._stopping.set()
        deadline = time.monotonic() + self.STOP_WAIT
        # Full: the thread is draining, has given up, or hangs in the database; never wait for ever.
        while self._thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1)
                break
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning(
                "the indexer did not stop in %.0f s: what it holds is indexed at the next start",
                self.STOP_WAIT,
            )

    def _done(self, tickets: Iterable[int]) -> None:
        with self._lock:
            for ticket in tickets:
                self._pending.pop(ticket, None)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Queued | _Complete] = []
            deadline = 0.0
            while len(batch) < self.BATCH:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()) if batch else None)
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                deadline = deadline or time.monotonic() + self.LINGER
                if isinstance(item, _Complete):  # a declaration is waited for: index what it follows now
                    break
            if batch and not self._index_until_done(batch):
                return

    def _index_until_done(self, batch: list[_Queued | _Complete]) -> bool:
        """Index ``batch``, trying again, backing off, while that fails for a reason of the node's own
        (the database, or the quarantine folder), never the arrival's. Returns False when the node
        stops first."""
        delay, outage = self.RETRY_FIRST, None
        while True:
            try:
                ready = self._index(batch)
                break
            except Exception as exc:  # never let the indexer thread die
                with self._lock:
                    waiting = len(self._pending)
                if outage is None:
                    outage = _Outage(time.monotonic(), type(exc).__name__)
                    log.error(
                        "indexing failed; %d instance(s) wait in the spool, tried again: %s",
                        waiting,
                        failure(exc),
                    )
                else:
                    log.warning("indexing still fails (%s); %d instance(s) wait", type(exc).__name__, waiting)
                outage.waiting = max(outage.waiting, waiting)
                if self._stopping.wait(delay):
                    log.warning("stopping with %d instance(s) unindexed: indexed at the next start", waiting)
                    return False
                delay = min(2 * delay, self.RETRY_MAX)
        if outage is not None:
            self._audit_outage(outage)
        if ready:
            try:
                self.on_ready()
            except Exception:  # waking the next step early is an optimisation: it runs on its tick too
                log.exception("waking routing failed")
        return True

    def _audit_outage(self, outage: _Outage) -> None:
        seconds = round(time.monotonic() - outage.started, 1)
        log.warning("indexing resumed after %.1f s; %d instance(s) had waited", seconds, outage.waiting)
        try:
            audit.append(
                self.db,
                "index.outage",
                outcome="failure",
                seconds=seconds,
                instances_waiting=outage.waiting,
                error=outage.error,
            )
        except Exception:  # the database failing again: the log line above keeps the figures
            log.exception("could not audit the indexing outage")

    def _index(self, batch: list[_Queued | _Complete]) -> bool:
        """Index ``batch`` in order, removing each item from it once done: arrivals with the same action
        in one transaction; when that fails for a reason other than the database, one at a time,
        setting aside (and auditing) any that cannot be indexed; a completion declaration once the
        arrivals before it are. Raises when the node failed, what is left in ``batch`` to be tried
        again. Returns whether a series may have become ready."""
        ready = False
        while batch:
            first = batch[0]
            if isinstance(first, _Complete):
                try:
                    completion.declare_complete(
                        self.db, first.series_uids, first.study_uids, first.reason, self.unindexed()
                    )
                except DATABASE_UNAVAILABLE:
                    raise
                except Exception as exc:  # never hold up indexing for it: the quiet period will do
                    log.error("a completion declaration (%s) failed: %s", first.reason, failure(exc))
                ready = True  # a study may have become stable even where no series became ready
                batch.pop(0)
                continue
            arrivals: list[_Queued] = []  # the arrivals up to the next declaration or other action
            for item in batch:
                if not isinstance(item, _Queued) or item.action != first.action:
                    break
                arrivals.append(item)
            try:
                made_ready = index_arrivals(
                    self.db, [q.arrival for q in arrivals], self.study_settings, first.action
                )
            except DATABASE_UNAVAILABLE:
                raise
            except Exception as exc:
                log.error(
                    "indexing %d arrival(s) together failed, each tried alone: %s",
                    len(arrivals),
                    failure(exc),
                )
                for queued in arrivals:
                    alone = index_or_set_aside(self.db, queued.arrival, self.study_settings, first.action)
                    ready = ready or bool(alone)
                    batch.pop(0)
                    self._done([queued.ticket])
                continue
            ready = ready or made_ready
            del batch[: len(arrivals)]
            self._done(q.ticket for q in arrivals)
        return ready
