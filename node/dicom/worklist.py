"""The DICOM Modality Worklist: the patients scheduled for a procedure, asked for by C-FIND.

The upload and capture pages let an operator pick the scheduled patient instead of typing the patient's
identity, so what is sent on to a PACS carries the identity the hospital's RIS gave it. One query is
one association, bounded as a whole by ``timeout_seconds`` (connection to last answer) and by
``max_entries`` answers: beyond those the query is cancelled (C-CANCEL). Answers are decoded by the
character set each declares (ISO_IR 192, ISO 2022 IR 87 and the rest pydicom knows).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, TM
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from node.config import ConfigError, Destination, Settings
from node.dicom.network import associate

log = logging.getLogger(__name__)

_PENDING = {0xFF00, 0xFF01}
_CANCELLED = 0xFE00
_FIND_MESSAGE_ID = 1


class WorklistError(Exception):
    """The worklist could not be read; the message says why, in words an operator can act on, and
    names no patient."""


@dataclass(frozen=True)
class WorklistQuery:
    """What to match, empty for any: a name with DICOM wildcards (``*`` any characters, ``?`` one; DICOM
    has no way to escape them), the exact patient ID, the scheduled day, the modality and the station's
    AE title. A backslash would split a key into several values: the API refuses it, and wildcards in
    the ID and the station, which would turn a look-up of one patient into a list of many."""

    patient_name: str = ""
    patient_id: str = ""
    scheduled_date: date | None = None
    modality: str = ""
    station_ae: str = ""

    def audited(self) -> dict[str, Any]:
        """The query as the audit log records it, which names no patient: the keys given, and the
        values of those that identify nobody (date, modality, station)."""
        given = {
            "patient_name": self.patient_name,
            "patient_id": self.patient_id,
            "scheduled_date": self.scheduled_date.isoformat() if self.scheduled_date else "",
            "modality": self.modality,
            "station_ae": self.station_ae,
        }
        shown = {key: value for key, value in given.items() if value and not key.startswith("patient_")}
        return {"keys": [key for key, value in given.items() if value], **shown}


@dataclass(frozen=True)
class WorklistEntry:
    """One scheduled procedure step, in the upload form's terms (names as DICOM PN, any script)."""

    patient_name: str
    patient_id: str
    patient_birth_date: date | None
    patient_sex: str  # M, F, O or empty
    accession_number: str
    study_uid: str
    study_description: str
    scheduled: datetime | None
    modality: str
    station_ae: str


@dataclass(frozen=True)
class WorklistAnswer:
    """What one query found."""

    entries: list[WorklistEntry]
    truncated: bool  # more matched than max_entries; the rest were cancelled


def _identifier(query: WorklistQuery) -> Dataset:
    """The C-FIND identifier: the query's keys matched, the entry's other attributes asked for empty."""
    step = Dataset()
    step.Modality = query.modality
    step.ScheduledStationAETitle = query.station_ae
    step.ScheduledProcedureStepStartDate = (
        query.scheduled_date.strftime("%Y%m%d") if query.scheduled_date else ""
    )
    step.ScheduledProcedureStepStartTime = ""
    step.ScheduledProcedureStepDescription = ""
    identifier = Dataset()
    if not (query.patient_name + query.patient_id).isascii():
        identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.PatientName = query.patient_name
    identifier.PatientID = query.patient_id
    identifier.PatientBirthDate = ""
    identifier.PatientSex = ""
    identifier.AccessionNumber = ""
    identifier.StudyInstanceUID = ""
    identifier.RequestedProcedureDescription = ""
    identifier.ScheduledProcedureStepSequence = [step]
    return identifier


def _text(dataset: Dataset, keyword: str) -> str:
    """An attribute as text: empty when absent, several values joined as DICOM writes them."""
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(part).strip() for part in value)
    return str(value).strip()


def _date(value: str) -> date | None:
    try:
        return DA(value) if value else None
    except ValueError:  # a server's malformed date: the entry is still useful without it
        return None


def _scheduled(step: Dataset) -> datetime | None:
    day = _date(_text(step, "ScheduledProcedureStepStartDate"))
    if day is None:
        return None
    try:
        at = TM(_text(step, "ScheduledProcedureStepStartTime") or "000000")
    except ValueError:
        at = TM("000000")
    return datetime.combine(day, at)


def entry(answer: Dataset) -> WorklistEntry:
    """One C-FIND answer as an entry; what the server left out is empty."""
    steps = answer.get("ScheduledProcedureStepSequence") or [Dataset()]
    step = steps[0]
    sex = _text(answer, "PatientSex").upper()
    return WorklistEntry(
        patient_name=_text(answer, "PatientName"),
        patient_id=_text(answer, "PatientID"),
        patient_birth_date=_date(_text(answer, "PatientBirthDate")),
        patient_sex=sex if sex in ("M", "F", "O") else "",
        accession_number=_text(answer, "AccessionNumber"),
        study_uid=_text(answer, "StudyInstanceUID"),
        study_description=_text(answer, "RequestedProcedureDescription")
        or _text(step, "ScheduledProcedureStepDescription"),
        scheduled=_scheduled(step),
        modality=_text(step, "Modality"),
        station_ae=_text(step, "ScheduledStationAETitle"),
    )


def server(settings: Settings) -> Destination:
    """The worklist server as a destination: the TLS contexts are built for it as for any peer."""
    worklist = settings.worklist
    return Destination(
        name="worklist", ae_title=worklist.ae_title, host=worklist.host, port=worklist.port, tls=worklist.tls
    )


def query(settings: Settings, wanted: WorklistQuery) -> WorklistAnswer:
    """Ask the configured worklist server. Raises WorklistError on no server, a rejected or failed
    association, a failure status, or no final answer within ``timeout_seconds``."""
    worklist = settings.worklist
    if not worklist.host:
        raise WorklistError("no worklist server is configured ([worklist] host)")
    where = f"{worklist.ae_title}@{worklist.host}:{worklist.port}"
    late = WorklistError(f"worklist {where}: no answer within {worklist.timeout_seconds:g} s")
    deadline = time.monotonic() + worklist.timeout_seconds
    opened: list[Association] = []
    timed_out = threading.Event()

    def cut_off() -> None:
        """At the deadline, whatever the association is doing (negotiating, answering): abort it."""
        timed_out.set()
        for assoc in opened:
            assoc.abort()

    # One clock for the whole query, release included: the watchdog aborts whatever association is
    # open at the deadline (the ACSE and DIMSE timeouts restart with every step); a connection not made
    # by then gives up by itself, the AE's connection timeout being the same.
    watchdog = threading.Timer(worklist.timeout_seconds, cut_off)
    watchdog.daemon = True
    watchdog.start()
    try:
        try:
            assoc = associate(
                settings,
                server(settings),
                [ModalityWorklistInformationFind],
                worklist.timeout_seconds,
                [(evt.EVT_CONN_OPEN, lambda event: opened.append(event.assoc))],
            )
        except ConfigError as exc:
            raise WorklistError(f"worklist {where}: TLS not usable: {exc}") from exc
        if not assoc.is_established:
            if assoc.is_rejected:  # the server's A-ASSOCIATE-RJ, kept by pynetdicom
                answer = assoc.acceptor.primitive
                why = (
                    f"{answer.result_str}: {answer.reason_str} ({answer.source_str})"
                    if answer
                    else "no reason"
                )
                raise WorklistError(f"worklist {where} rejected the association: {why}")
            if assoc.rejected_contexts:  # negotiated, but not the one service asked for: pynetdicom aborts
                raise WorklistError(f"worklist {where} does not offer the Modality Worklist service")
            if timed_out.is_set() or time.monotonic() >= deadline:
                raise late
            raise WorklistError(f"worklist {where}: no association (server down or unreachable?)")
        try:
            return _find(assoc, _identifier(wanted), worklist.max_entries, where)
        except (WorklistError, RuntimeError) as exc:  # RuntimeError: pynetdicom's, the association gone
            if timed_out.is_set():
                raise late from None
            if isinstance(exc, WorklistError):
                raise
            raise WorklistError(f"worklist {where}: the association ended before the last answer") from exc
        except ValueError:  # pydicom could not encode the identifier; its message may quote the name
            raise WorklistError(f"worklist {where}: the query could not be encoded as DICOM") from None
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        watchdog.cancel()


def _find(assoc: Association, identifier: Dataset, max_entries: int, where: str) -> WorklistAnswer:
    """Read the answers on ``assoc``; cancel the query at ``max_entries`` and read on to its end."""
    entries: list[WorklistEntry] = []
    truncated = False
    for status, answer in assoc.send_c_find(
        identifier, ModalityWorklistInformationFind, msg_id=_FIND_MESSAGE_ID
    ):
        code = status.get("Status") if status is not None else None
        if code is None:  # pynetdicom's empty status: aborted, timed out or the connection lost
            raise WorklistError(f"worklist {where}: the association ended before the last answer")
        if code in _PENDING:
            if truncated or answer is None:
                continue
            if len(entries) == max_entries:
                truncated = True
                assoc.send_c_cancel(_FIND_MESSAGE_ID, query_model=ModalityWorklistInformationFind)
                continue
            try:
                entries.append(entry(answer))
            except (ValueError, TypeError, LookupError) as exc:  # one answer pydicom cannot read
                log.warning("worklist %s: an unreadable answer skipped (%s)", where, type(exc).__name__)
        elif code not in (0x0000, _CANCELLED):
            raise WorklistError(f"worklist {where} answered with failure status 0x{code:04X}")
    if truncated:
        log.info("worklist %s: more than %d entries matched; the rest were cancelled", where, max_entries)
    return WorklistAnswer(entries=entries, truncated=truncated)
