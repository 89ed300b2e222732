"""UID collisions: the node never merges two patients, and never loses or silently overwrites a file.

A study, a series and an instance are known by their UIDs alone, so a sender that reuses one (a
misconfigured modality, a study merged by hand in a PACS) would otherwise attach one patient's images
to another's series, or move an instance out of the study it came in. The policy:

- the same SOP Instance UID in the same study and series, the same data set bytes: a duplicate,
  Success, nothing rewritten;
- the same SOP Instance UID in the same study and series, other bytes: a correction. The new file is
  stored, the old one kept in ``superseded/`` (same path beneath, numbered), ``instance.replaced`` is
  audited with both digests, and the series runs again like one with a late instance;
- a SOP Instance UID already stored in another study or series, a Series Instance UID already in
  another study, or a Study Instance UID already held for another patient (ID and name, as the index
  compares them): refused with :data:`UID_CONFLICT` before anything is written, audited as
  ``instance.conflict``.

The check runs at accept time against the database and against what this process accepted but may
not have indexed yet (:class:`Conflicts`); the index applies the same rules (:func:`conflict_with`),
for an instance accepted while the database could not be asked, and the indexer sets such an
instance aside (node.ingest.index.set_aside).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import bindparam, select
from sqlalchemy import exc as sa_exc

from node import audit
from node.db import Database, Instance, Patient, Series, Study
from node.spool import Spool, link_aside, move_durably

if TYPE_CHECKING:
    from node.ingest.index import Arrival

# A "cannot understand" failure status (PS3.4 B.2.3, 0xCxxx) of the node's own: the sender must not
# send this instance again as it is, and an administrator can tell it from an unreadable data set.
UID_CONFLICT = 0xC0C1
SUPERSEDED = "superseded"  # beside the spool's incoming/: earlier versions of corrected instances
SETTLING_LOCK = "settling.lock"  # beside the spool's incoming/: see Conflicts.settling
_STRIPES = 64

PatientKey = tuple[str, str]  # (PatientID, PatientName) as the index stores them
_T = TypeVar("_T")

# The acknowledgement path's look-ups, built once: constructing them costs more than running them.
_STUDY_PATIENT = (
    select(Patient.patient_id, Patient.patient_name)
    .join(Study, Study.patient_fk == Patient.id)
    .where(Study.study_uid == bindparam("uid"))
)
_SERIES_STUDY = (
    select(Study.study_uid)
    .join(Series, Series.study_fk == Study.id)
    .where(Series.series_uid == bindparam("uid"))
)
_INSTANCE_PLACE = (
    select(Study.study_uid, Series.series_uid)
    .join(Series, Series.study_fk == Study.id)
    .join(Instance, Instance.series_fk == Series.id)
    .where(Instance.sop_uid == bindparam("uid"))
)


class UIDConflict(ValueError):
    """An instance whose UIDs are already taken elsewhere. The message names the kind and the UIDs,
    never the patient, so it may go into logs and audit reasons."""

    def __init__(self, kind: str, message: str, **existing: str) -> None:
        super().__init__(f"UID conflict ({kind}): {message}")
        self.kind = kind
        self.existing = existing  # where the UID is taken: existing_study_uid, existing_series_uid


@dataclass(frozen=True)
class Superseded:
    """The earlier version of a corrected instance: where it is kept, and both versions' data sets
    (the bytes after the meta information, which names the sending AE and may differ alone)."""

    kept_at: str
    old_size: int
    old_sha256: str
    new_size: int
    new_sha256: str


def conflict_with(
    arrival: Arrival,
    study_patient: PatientKey | None,
    series_study: str | None,
    instance_place: tuple[str, str] | None,
) -> UIDConflict | None:
    """The conflict of ``arrival`` with what is known: the patient of its study, the study of its
    series and the (study, series) of its SOP Instance UID, each None where not known."""
    if study_patient is not None and study_patient != arrival.patient:
        return UIDConflict("other_patient", f"study {arrival.study_uid} belongs to another patient")
    if series_study is not None and series_study != arrival.study_uid:
        return UIDConflict(
            "series_elsewhere",
            f"series {arrival.series_uid} belongs to study {series_study}",
            existing_study_uid=series_study,
        )
    if instance_place is not None and instance_place != (arrival.study_uid, arrival.series_uid):
        return UIDConflict(
            "sop_elsewhere",
            f"instance {arrival.sop_uid} belongs to study {instance_place[0]}, series {instance_place[1]}",
            existing_study_uid=instance_place[0],
            existing_series_uid=instance_place[1],
        )
    return None


def _data_set_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a DICOM file's data set, read in chunks: what the sender sent, without the
    meta information the node wrote in front of it (Part 10: preamble, "DICM", group 0002 headed by
    its explicit-VR group length)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        head = handle.read(144)
        if head[128:138] == b"DICM\x02\x00\x00\x00UL":
            handle.seek(144 + int.from_bytes(head[140:144], "little"))
        else:
            handle.seek(0)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _remember(kept: OrderedDict[str, _T], key: str, value: _T, limit: int) -> None:
    """Keep ``value`` as the newest; forget the oldest beyond ``limit``, so memory stays bounded."""
    kept[key] = value
    kept.move_to_end(key)
    if len(kept) > limit:
        kept.popitem(last=False)


class Conflicts:
    """The accept-time check. The database knows what was indexed; the node also remembers which
    study and patient each series it recently accepted belongs to, because the indexer runs behind
    the acknowledgement — and because that spares the study and series look-ups for every instance
    of a 300-slice series: one indexed look-up per instance remains, for its SOP Instance UID."""

    KEPT = 20_000  # recently accepted studies, series and instances remembered (a few MB at most)

    def __init__(self, db: Database, spool: Spool) -> None:
        self.db = db
        self.spool = spool
        self._lock = threading.Lock()
        self._studies: OrderedDict[str, PatientKey] = OrderedDict()
        self._series: OrderedDict[str, str] = OrderedDict()  # series → study
        self._instances: OrderedDict[str, tuple[str, str]] = OrderedDict()  # SOP → study, series
        self._unchecked: OrderedDict[str, bool] = OrderedDict()  # SOPs checked without the database
        self._settling = [threading.Lock() for _ in range(_STRIPES)]  # by SOP Instance UID, striped
        # the same stripes across processes (node.ingest.receivers): a byte each of one lock file, held
        # with POSIX record locks, which the kernel drops with a process that dies holding one
        self._settling_file = os.open(
            spool.root / SETTLING_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )

    @contextlib.contextmanager
    def settling(self, arrival: Arrival) -> Iterator[None]:
        """What to hold from :meth:`settle` until what it returns is committed: two associations that
        store the same instance at once — in this process or another receiver process — must not both
        compare with the same file (one version would be replaced without being kept), nor may one
        acknowledge a duplicate of a file whose rename the other has not made durable yet."""
        stripe = zlib.crc32(arrival.sop_uid.encode()) % _STRIPES  # the same in every process
        with self._settling[stripe]:  # record locks are the process's: threads take turns first
            fcntl.lockf(self._settling_file, fcntl.LOCK_EX, 1, stripe)
            try:
                yield
            finally:
                fcntl.lockf(self._settling_file, fcntl.LOCK_UN, 1, stripe)

    def check(self, arrival: Arrival) -> str | None:
        """Why ``arrival`` must be refused (audited as ``instance.conflict``), or None. Where the
        database cannot be asked, only what this process accepted is checked; the index applies the
        same rules later and sets a conflicting instance aside. A conflict that cannot be audited
        raises: the sender is told to try again later."""
        with self._lock:
            study_patient = self._studies.get(arrival.study_uid)
            series_study = self._series.get(arrival.series_uid)
            instance_place = self._instances.get(arrival.sop_uid)
        if study_patient is None or series_study is None or instance_place is None:
            known = self._known(
                arrival, study_patient is None or series_study is None, instance_place is None
            )
            study_patient, series_study, instance_place = (
                study_patient or known[0],
                series_study or known[1],
                instance_place or known[2],
            )
        conflict = conflict_with(arrival, study_patient, series_study, instance_place)
        if conflict is not None and not self._spooled(arrival, conflict):
            # Deleted since this process remembered it (from the dashboard, by retention): the study
            # may come again, for its right patient. The database alone decides.
            with self._lock:
                self._studies.pop(arrival.study_uid, None)
                self._series.pop(arrival.series_uid, None)
                self._instances.pop(arrival.sop_uid, None)
            conflict = conflict_with(arrival, *self._known(arrival, True, True))
        if conflict is None:
            return None
        audit.append(
            self.db,
            "instance.conflict",
            outcome="failure",
            actor=arrival.actor,
            study_uid=arrival.study_uid,
            kind=conflict.kind,
            series_uid=arrival.series_uid,
            sop_uid=arrival.sop_uid,
            handled="refused",
            **conflict.existing,
        )
        return str(conflict)

    def _spooled(self, arrival: Arrival, conflict: UIDConflict) -> bool:
        """Whether what ``arrival`` conflicts with still has its files in the spool."""
        study = conflict.existing.get("existing_study_uid", arrival.study_uid)
        series = conflict.existing.get("existing_series_uid", arrival.series_uid)
        if conflict.kind == "sop_elsewhere":
            return self.spool.instance_path(study, series, arrival.sop_uid).is_file()
        folder = self.spool.incoming / study
        return (folder / series).is_dir() if conflict.kind == "series_elsewhere" else folder.is_dir()

    def _known(
        self, arrival: Arrival, need_study: bool, need_instance: bool
    ) -> tuple[PatientKey | None, str | None, tuple[str, str] | None]:
        """What the database knows: the patient of the arrival's study and the study of its series
        (once per series), the study and series of its SOP Instance UID (unique-key look-ups).
        Nothing where the database cannot be asked: the arrival is accepted all the same, and not
        remembered, since the index may yet set it aside."""
        study_patient, series_study, instance_place = None, None, None
        try:  # a connection, not an ORM session: read-only look-ups on the acknowledgement's path
            with self.db.engine.connect() as connection:
                if need_study:
                    patient = connection.execute(_STUDY_PATIENT, {"uid": arrival.study_uid}).first()
                    study_patient = (patient[0], patient[1]) if patient else None
                    series_study = connection.scalar(_SERIES_STUDY, {"uid": arrival.series_uid})
                if need_instance:
                    place = connection.execute(_INSTANCE_PLACE, {"uid": arrival.sop_uid}).first()
                    instance_place = (place[0], place[1]) if place else None
        except sa_exc.SQLAlchemyError:
            with self._lock:
                _remember(self._unchecked, arrival.sop_uid, True, self.KEPT)
        return study_patient, series_study, instance_place

    def settle(self, arrival: Arrival, written: Path) -> Arrival | None:
        """Settle ``written``, the complete file of ``arrival`` not yet renamed into place, with a file
        of the same name the spool may already hold. Returns None when that file has the same data
        set: nothing is to be rewritten; else the arrival to rename into place, with ``supersedes``
        set when an earlier version was kept aside. Remembers the arrival, so the next check sees it
        before the index does."""
        with self._lock:
            if self._unchecked.pop(arrival.sop_uid, None) is None:  # the index may yet set it aside
                _remember(self._studies, arrival.study_uid, arrival.patient, self.KEPT)
                _remember(self._series, arrival.series_uid, arrival.study_uid, self.KEPT)
                _remember(
                    self._instances, arrival.sop_uid, (arrival.study_uid, arrival.series_uid), self.KEPT
                )
        final = self.spool.instance_path(arrival.study_uid, arrival.series_uid, arrival.sop_uid)
        if not final.is_file():
            return arrival
        old_size, old_sha256 = _data_set_digest(final)
        new_size, new_sha256 = _data_set_digest(written)
        if old_sha256 == new_sha256:
            return None
        kept = link_aside(final, self.spool.root / SUPERSEDED / final.parent.relative_to(self.spool.incoming))
        return replace(arrival, supersedes=Superseded(str(kept), old_size, old_sha256, new_size, new_sha256))

    def unsettle(self, arrival: Arrival) -> None:
        """Put back the earlier version that the committed correction ``arrival`` superseded, because
        the correction was refused after all. Only the index tells a correction from its original:
        left in place unindexed, reconciliation would find a file whose place it knows, and the
        sender's next try would be an identical duplicate — never audited, never run again."""
        if arrival.supersedes is None:
            return
        with self.settling(arrival):
            if _data_set_digest(arrival.path)[1] != arrival.supersedes.new_sha256:
                return  # corrected again meanwhile: that correction stands
            move_durably(Path(arrival.supersedes.kept_at), arrival.path)
