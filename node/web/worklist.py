"""``GET /api/worklist``: the scheduled patients the upload and capture pages let an operator pick.

Reading the worklist is PHI access: every query is audited with who asked, what was asked (the keys;
a name or ID asked for is not written down: no event names a patient), how many entries came back and
their study UIDs, or why none could. The answer's keys are the upload form's field names, so a page
fills its form from an entry as it is.
"""

from __future__ import annotations

import logging
from datetime import date as Date
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from node import audit
from node.config import Settings
from node.dicom.worklist import WorklistEntry, WorklistError, WorklistQuery, query
from node.web.api import Operator

log = logging.getLogger(__name__)
router = APIRouter()

# No backslash (it would split a key into several values) and no control characters; in the ID no
# wildcards either (nor in the station: only the name is searched by them): the ID looks up one
# patient, and DICOM cannot escape a literal "*" or "?".
_TEXT = r"^[^\\\x00-\x1f\x7f]*$"
_EXACT = r"^[^\\*?\x00-\x1f\x7f]*$"


def _json(entry: WorklistEntry) -> dict[str, Any]:
    return {
        "patient_name": entry.patient_name,
        "patient_id": entry.patient_id,
        "patient_birth_date": entry.patient_birth_date.isoformat() if entry.patient_birth_date else "",
        "patient_sex": entry.patient_sex,
        "accession_number": entry.accession_number,
        "study_uid": entry.study_uid,
        "study_description": entry.study_description,
        "scheduled": entry.scheduled.isoformat() if entry.scheduled else None,
        "modality": entry.modality,
        "station_ae": entry.station_ae,
    }


@router.get("/api/worklist")
def worklist(
    request: Request,
    principal: Operator,
    name: Annotated[str, Query(max_length=324, pattern=_TEXT)] = "",
    patient_id: Annotated[str, Query(max_length=64, pattern=_EXACT)] = "",
    date: Date | None = None,
    modality: Annotated[str, Query(max_length=16, pattern=r"^[A-Za-z0-9_ ]*$")] = "",
    station_ae: Annotated[str, Query(max_length=16, pattern=_EXACT)] = "",
) -> list[dict[str, Any]]:
    """The entries matching the query (``name`` with DICOM wildcards ``*`` and ``?``, ``patient_id``
    exact), at most ``[worklist] max_entries``. 503 without a configured worklist, 502 when it cannot
    be read, 422 for a key DICOM cannot carry."""
    settings: Settings = request.app.state.settings
    if not settings.worklist.host:
        raise HTTPException(503, "no worklist is configured ([worklist] host): type the patient's details")
    wanted = WorklistQuery(
        patient_name=name.strip(),
        patient_id=patient_id.strip(),
        scheduled_date=date,
        modality=modality.strip().upper(),  # a code string: DICOM's are upper case
        station_ae=station_ae.strip(),
    )
    db = request.app.state.db
    try:
        answer = query(settings, wanted)
    except WorklistError as exc:
        log.warning("worklist query by %s failed: %s", principal.actor, exc)
        audit.append(
            db,
            "worklist.queried",
            actor=principal.actor,
            outcome="failure",
            query=wanted.audited(),
            error=str(exc),
        )
        raise HTTPException(502, str(exc)) from exc
    audit.append(
        db,
        "worklist.queried",
        actor=principal.actor,
        query=wanted.audited(),
        answers=len(answer.entries),
        study_uids=[entry.study_uid for entry in answer.entries],
        truncated=answer.truncated,
    )
    return [_json(entry) for entry in answer.entries]
