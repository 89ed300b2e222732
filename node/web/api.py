"""JSON API: health, studies with their status and stage timings, Prometheus metrics, the
study-complete notification a PACS sends once it has forwarded a whole study, and uploads.

The API only reads the database, but for that notification, which it hands to the node's indexer,
and uploads, which go through the node's ingest like any C-STORE (node.ingest.upload). All
but /healthz need a session or an API token (node.web.auth); reading a study's patient identity is PHI
access and is audited with who read it.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydicom.uid import UID
from sqlalchemy import func, select, text
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from node import audit
from node.db import Database, Instance, Job, JobStatus, Result, Send, SendStatus, Series, SeriesStatus, Study
from node.dicom.limits import ListenerLoad
from node.ingest.accept import Ingest, Origin
from node.ingest.identity import InvalidDetails, check_details
from node.ingest.photo import KINDS
from node.ingest.upload import PhotoDetails, Upload, is_photo
from node.spool import Spool
from node.web.auth import Principal, require
from node.web.render import error_line


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def _latest(values: Iterable[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _earliest(values: Iterable[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def study_status(study: Study) -> str:
    series = study.series
    jobs = [job for s in series for job in s.jobs]
    sends = [send for job in jobs for result in job.results for send in result.sends]
    if any(s.status in (SeriesStatus.RECEIVING, SeriesStatus.READY) for s in series):
        return "receiving"
    if any(j.status in (JobStatus.QUEUED, JobStatus.RUNNING) for j in jobs):
        return "processing"
    if any(s.status == SendStatus.PENDING for s in sends):
        return "sending"
    if any(j.status == JobStatus.FAILED for j in jobs) or any(s.status == SendStatus.FAILED for s in sends):
        return "failed"
    if all(s.status == SeriesStatus.NO_ROUTE for s in series):
        return "no_route"
    return "done"


def stage_timings(study: Study) -> dict[str, float | None]:
    """Seconds spent in each stage, from the first instance received to the last result sent."""
    jobs = [job for s in study.series for job in s.jobs]
    sends = [send for job in jobs for result in job.results for send in result.sends]
    last_instance = _latest(s.last_received_at for s in study.series)
    # Ready: the series complete and, for a study-level route, the whole study: when its job was made.
    ready = _latest([*(s.ready_at for s in study.series), *(j.created_at for j in jobs)])
    started = _earliest(j.started_at for j in jobs)
    finished = _latest(j.finished_at for j in jobs)
    sent = _latest(s.sent_at for s in sends)
    return {
        "receive": _seconds(study.first_received_at, last_instance),
        "wait_stable": _seconds(last_instance, ready),
        "queue": _seconds(ready, started),
        "process": _seconds(started, finished),
        "send": _seconds(finished, sent),
        "last_instance_to_sent": _seconds(last_instance, sent),
        "total": _seconds(study.first_received_at, sent),
    }


def _study_row(study: Study) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "study_date": study.study_date,
        "description": study.description,
        "status": study_status(study),
        "first_received_at": study.first_received_at,
        "last_received_at": study.last_received_at,
        "stable_at": study.stable_at,
        "series": len(study.series),
        "instances": sum(s.instance_count for s in study.series),
        "timings": stage_timings(study),
    }


def _study_detail(study: Study) -> dict[str, Any]:
    detail = _study_row(study)
    detail["patient"] = {"id": study.patient.patient_id, "name": study.patient.patient_name}
    detail["accession_number"] = study.accession_number
    detail["series"] = [
        {
            "series_uid": s.series_uid,
            "modality": s.modality,
            "body_part": s.body_part,
            "description": s.description,
            "status": s.status.value,
            "instances": s.instance_count,
            "late_instances": s.late_instances,
            "route": s.route_note,
            "ready_at": s.ready_at,
            "jobs": [
                {
                    "id": j.id,
                    "route": j.route,
                    "series": [covered.series_uid for covered in j.inputs],  # a study-level route: several
                    "handler": j.handler,
                    "model": j.model,
                    "model_version": j.model_version,
                    "model_sha256": j.model_sha256,
                    "status": j.status.value,
                    "attempts": j.attempts,
                    "worker": j.worker,  # the distributed worker that ran it; "" for the local pool
                    "error": error_line(j.error),
                    "summary": j.summary,
                    "outcome": j.outcome,
                    "timings": j.timings,
                    "started_at": j.started_at,
                    "finished_at": j.finished_at,
                    "results": [
                        {
                            "kind": r.kind,
                            "sop_uid": r.sop_uid,
                            "sends": [
                                {
                                    "destination": d.destination,
                                    "status": d.status.value,
                                    "attempts": d.attempts,
                                    "last_error": error_line(d.last_error),
                                    "sent_at": d.sent_at,
                                }
                                for d in r.sends
                            ],
                        }
                        for r in j.results
                    ],
                }
                for j in s.jobs
            ],
        }
        for s in study.series
    ]
    return detail


_STUDY_TREE = (
    selectinload(Study.series).selectinload(Series.jobs).selectinload(Job.results).selectinload(Result.sends),
    selectinload(Study.series).selectinload(Series.jobs).selectinload(Job.inputs),
    selectinload(Study.patient),
)


class _DatabaseCollector(Collector):
    """Metrics read from the database at scrape time, so they survive restarts and count every process."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterable[Any]:
        with self.db.session() as session:
            received = session.scalar(select(func.coalesce(func.sum(Instance.times_received), 0)))
            counts: dict[str, int] = {}
            for column in (Job.status, Send.status, Series.status):
                for state, count in session.execute(select(column, func.count()).group_by(column)).all():
                    counts[f"{column.class_.__tablename__}.{state.value}"] = count
        yield CounterMetricFamily(
            "ainode_instances_received", "Instances received (duplicates too)", value=float(received or 0)
        )
        states: tuple[tuple[str, type[enum.StrEnum]], ...] = (
            ("jobs", JobStatus),
            ("sends", SendStatus),
            ("series", SeriesStatus),
        )
        for table, enum_type in states:
            family = GaugeMetricFamily(
                f"ainode_{table}", f"{table.capitalize()} by status", labels=["status"]
            )
            for state in enum_type:
                family.add_metric([state.value], float(counts.get(f"{table}.{state.value}", 0)))
            yield family


router = APIRouter()
Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]


@router.get("/healthz")
def healthz(request: Request, response: Response) -> dict[str, Any]:
    """Open to anyone (load balancers, monitoring): states only, nothing about patients. A listener
    holding as many connections as it may (``max_associations``) is saturated: 503 until one ends."""
    db: Database = request.app.state.db
    spool: Spool = request.app.state.spool
    checks: dict[str, Any] = {
        "dicom": bool(request.app.state.dicom_listening()),
        "disk_free_mb": spool.free_bytes() // 2**20,
    }
    load: ListenerLoad | None = request.app.state.dicom_load()
    if load is not None:
        checks["dicom_connections"], checks["dicom_max_connections"] = load.connections, load.max_connections
        checks["dicom_saturated"] = load.saturated
    try:
        with db.session() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = True
    except Exception as exc:
        checks["database"] = False
        checks["database_error"] = type(exc).__name__
    healthy = checks["dicom"] and checks["database"]
    saturated = healthy and checks.get("dicom_saturated", False)
    response.status_code = 200 if healthy and not saturated else 503
    return {"status": "saturated" if saturated else "ok" if healthy else "unhealthy", **checks}


@router.get("/api/studies")
def studies(request: Request, principal: Viewer, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    db: Database = request.app.state.db
    with db.session() as session:
        rows = session.scalars(
            select(Study)
            .options(*_STUDY_TREE)
            .order_by(Study.last_received_at.desc())
            .limit(min(max(limit, 1), 1000))
            .offset(max(offset, 0))
        ).all()
        return [_study_row(study) for study in rows]


@router.get("/api/studies/{study_uid}")
def study(study_uid: str, request: Request, principal: Viewer) -> dict[str, Any]:
    db: Database = request.app.state.db
    with db.session() as session:
        found = session.scalar(select(Study).options(*_STUDY_TREE).where(Study.study_uid == study_uid))
        if found is None:
            raise HTTPException(status_code=404, detail="no such study")
        detail = _study_detail(found)
    audit.append(db, "phi.viewed", actor=principal.actor, study_uid=study_uid, what="study detail")
    return detail


@router.get("/metrics")
def metrics(request: Request, principal: Viewer) -> Response:
    registry = CollectorRegistry()  # per scrape: the collector reads the database then
    registry.register(_DatabaseCollector(request.app.state.db))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/api/studies/{study_uid}/complete", status_code=202)
def study_complete(study_uid: str, request: Request, principal: Operator) -> dict[str, str]:
    """A PACS says it has sent all of a study (Orthanc's OnStableStudy: deploy/orthanc/notify.lua):
    its series still receiving are ready, and the study stable, as soon as everything of it already
    acknowledged is indexed, instead of after the quiet period. Accepted, not done: the study may not
    be indexed yet. Audited with who said so."""
    complete: Callable[[str, str], None] | None = request.app.state.complete_study
    if complete is None:
        raise HTTPException(status_code=503, detail="no node runs in this process to tell")
    if not UID(study_uid).is_valid:
        raise HTTPException(status_code=422, detail="not a valid Study Instance UID")
    audit.append(request.app.state.db, "study.complete_notified", actor=principal.actor, study_uid=study_uid)
    complete(study_uid, f"study-complete notification from {principal.actor}")
    return {"study_uid": study_uid, "status": "accepted"}


def _upload_size(request: Request) -> None:
    """Refuse an upload over [node] max_upload_mb by its Content-Length, before its form is read."""
    limit = request.app.state.settings.node.max_upload_mb
    length = request.headers.get("content-length")
    if length is None:
        raise HTTPException(status_code=411, detail="send the upload with a Content-Length")
    if not length.isdigit() or int(length) > limit * 2**20:
        raise HTTPException(status_code=413, detail=f"an upload is at most {limit} MB")


class _UploadForm(MultiPartParser):
    """Starlette's multipart parser holding at most 64 KiB of each file in memory: its default, 1 MB,
    would keep an upload of a thousand small slices wholly in memory. The rest of a file is spooled
    to the temporary folder (TMPDIR) until the upload takes it."""

    spool_max_size = 64 * 1024


async def _upload_form(request: Request, principal: Principal) -> FormData:
    """The request's multipart form; 400 for anything else, or a malformed one."""
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "multipart/form-data":
        raise HTTPException(status_code=400, detail="send the files as multipart/form-data field 'files'")
    if principal.via == "session" and not request.headers.get("x-csrf-token"):
        return await request.form()  # node.web.auth found the CSRF token in it: Starlette parsed and keeps it
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            return await _UploadForm(request.headers, stream).parse()
    except MultiPartException as exc:
        raise HTTPException(status_code=400, detail=exc.message) from None


def _photo_details(form: FormData, operator: str) -> PhotoDetails:
    """The form's task and patient details, for photographs; 422 naming each field at fault."""
    fields = {key: value for key, value in form.items() if isinstance(value, str)}
    errors = []
    kind = KINDS.get(fields.get("task", ""))
    if kind is None:
        errors.append({"field": "task", "message": f"Task is one of {', '.join(KINDS)}"})
    try:
        details = check_details(fields, datetime.now().date())
    except InvalidDetails as invalid:
        errors += invalid.errors
    if errors or kind is None:
        raise HTTPException(status_code=422, detail=errors)
    return PhotoDetails(kind, details, operator)


@router.post("/api/studies", status_code=201, dependencies=[Depends(_upload_size)])
async def upload(request: Request, principal: Operator) -> Any:
    """DICOM files, zip archives of them and JPEG/PNG photographs (wrapped as DICOM with the form's
    patient details) into the node as a C-STORE would bring them, the user as their origin; the
    studies they fill are complete as soon as the upload ends (no quiet period). 201 when anything
    was accepted, else 422; each file's outcome in the answer. Audited as study.uploaded."""
    ingest: Ingest | None = request.app.state.ingest
    complete: Callable[[str, str], None] | None = request.app.state.complete_study
    if ingest is None or complete is None:
        raise HTTPException(status_code=503, detail="no node runs in this process to take uploads")
    form = await _upload_form(request, principal)
    try:
        files = form.getlist("files")
        if not files or not all(isinstance(file, UploadFile) for file in files):
            raise HTTPException(status_code=400, detail="send the files as multipart/form-data field 'files'")
        uploads = [file for file in files if isinstance(file, UploadFile)]
        heads = [await file.read(16) for file in uploads]
        photos = _photo_details(form, principal.name) if any(map(is_photo, heads)) else None
        address = request.client.host if request.client else ""
        origin = Origin("", ingest.settings.node.ae_title, address, user=principal.actor)

        def take() -> Upload:
            """Off the event loop: the files are copied and parsed, the database written."""
            with Upload(ingest, origin, photos, datetime.now()) as taken:
                for file in uploads:
                    taken.add(file.filename or "(unnamed)", file.file)
            for study_uid in taken.studies:
                complete(study_uid, f"uploaded by {principal.actor}")
            _audit_upload(request.app.state.db, origin, taken, uploads)
            return taken

        taken = await run_in_threadpool(take)
    finally:
        await form.close()  # the spooled files
    answer = {"studies": taken.studies, "files": [asdict(outcome) for outcome in taken.outcomes]}
    return answer if taken.accepted else JSONResponse(answer, status_code=422)


def _audit_upload(db: Database, origin: Origin, taken: Upload, files: list[UploadFile]) -> None:
    """study.uploaded: who, which studies (they name the patient through the index: no event carries a
    patient's name or ID), which files, and how many of them were taken."""
    origin.audit(
        db,
        "study.uploaded",
        "success" if taken.accepted else "failure",
        study_uid=taken.studies[0] if len(taken.studies) == 1 else "",
        studies=taken.studies,
        files=[{"name": file.filename or "(unnamed)", "bytes": file.size} for file in files],
        accepted=taken.accepted,
        refused=len(taken.outcomes) - taken.accepted,
    )
