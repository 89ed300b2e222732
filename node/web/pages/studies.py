"""Studies: find a study (search and filters, paginated) and see what happened to it and why — its
series and the route each took or why none did, stage timings, every job with its model and findings,
the results as images and as the report's content, the sends — and act on it: re-run, resend, delete.

Patient names and IDs are shown, so every page view that shows them is audited as ``phi.viewed``;
every action is audited with the person who took it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import cv2
import numpy as np
from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydicom import dcmread
from sqlalchemy import ColumnElement, and_, exists, func, not_, or_, select
from sqlalchemy.orm import Session

from node import audit
from node.accounts import Principal, role_at_least
from node.config import Settings
from node.db import (
    Database,
    Job,
    JobStatus,
    Patient,
    Result,
    Send,
    SendStatus,
    Series,
    SeriesStatus,
    Study,
)
from node.deletion import StudyBusy, delete_study
from node.dicom.display import display_rgb8
from node.dicom.header import decode
from node.dicom.sr_content import Section, content_sections
from node.jobs.store import rerun_study
from node.route import Subject, mismatches
from node.send import resend_study
from node.web.api import _STUDY_TREE, stage_timings, study_status
from node.web.auth import require
from node.web.render import page

router = APIRouter()

PAGE_SIZE = 50
STATUSES = ("receiving", "processing", "sending", "failed", "no_route", "done")
Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def brief_error(text: str) -> str:
    """What a person needs of an error: the exception and its message, never a stack trace."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line[:300]


def person_name(value: str) -> str:
    """A DICOM person name as people write it: components by spaces, its alphabetic, ideographic and
    phonetic forms side by side (``Hong^Gildong=洪^吉洞=홍^길동`` → ``Hong Gildong = 洪 吉洞 = 홍 길동``)."""
    groups = (" ".join(part for part in group.split("^") if part) for group in value.split("="))
    return " = ".join(group for group in groups if group)


def when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


# --- The list: filters as SQL, so that paging counts only what matches -----------------------------


def _study_series(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists(select(Series.id).where(Series.study_fk == Study.id, *conditions))


def _study_jobs(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists(
        select(Job.id)
        .join(Series, Job.series_fk == Series.id)
        .where(Series.study_fk == Study.id, *conditions)
    )


def _study_sends(status: SendStatus) -> ColumnElement[bool]:
    return exists(
        select(Send.id)
        .join(Result)
        .join(Job)
        .join(Series, Job.series_fk == Series.id)
        .where(Series.study_fk == Study.id, Send.status == status)
    )


def status_condition(status: str) -> ColumnElement[bool]:
    """``node.web.api.study_status`` as SQL: each status holds when its own condition does and none of
    those checked before it."""
    ordered = [
        ("receiving", _study_series(Series.status.in_((SeriesStatus.RECEIVING, SeriesStatus.READY)))),
        ("processing", _study_jobs(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))),
        ("sending", _study_sends(SendStatus.PENDING)),
        ("failed", or_(_study_jobs(Job.status == JobStatus.FAILED), _study_sends(SendStatus.FAILED))),
        ("no_route", not_(_study_series(Series.status != SeriesStatus.NO_ROUTE))),
    ]
    earlier: list[ColumnElement[bool]] = []
    for name, condition in ordered:
        if name == status:
            return and_(condition, *(not_(c) for c in earlier))
        earlier.append(condition)
    return and_(*(not_(c) for c in earlier))  # done


def _contains(column: Any, text: str) -> ColumnElement[bool]:
    """Case-insensitive, the words in order with anything between them: "hong gildong" finds
    ``Hong^Gildong``."""
    words = [w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for w in text.split()]
    return column.ilike("%" + "%".join(words) + "%", escape="\\")


@dataclass
class StudyFilter:
    """The list's search form, as the query string carries it."""

    received_from: str = ""  # YYYY-MM-DD, UTC
    received_to: str = ""
    modality: str = ""
    route: str = ""
    status: str = ""
    accession: str = ""
    patient: str = ""  # name or ID
    problems: list[str] = field(default_factory=list)

    def conditions(self) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = []
        start, end = self._day(self.received_from), self._day(self.received_to)
        if start is not None:
            found.append(Study.first_received_at >= datetime.combine(start, time(), UTC))
        if end is not None:
            found.append(Study.first_received_at < datetime.combine(end + timedelta(days=1), time(), UTC))
        if self.modality:
            found.append(_study_series(Series.modality == self.modality.strip().upper()))
        if self.route:
            found.append(_study_jobs(Job.route == self.route.strip()))
        if self.status:
            if self.status in STATUSES:
                found.append(status_condition(self.status))
            else:
                self.problems.append(f"unknown status {self.status!r}")
        if self.accession.strip():
            found.append(_contains(Study.accession_number, self.accession))
        if self.patient.strip():
            found.append(
                or_(
                    _contains(Patient.patient_name, self.patient), _contains(Patient.patient_id, self.patient)
                )
            )
        return found

    def _day(self, text: str) -> date | None:
        if not text:
            return None
        try:
            return date.fromisoformat(text)
        except ValueError:
            self.problems.append(f"{text!r} is not a date (YYYY-MM-DD)")
            return None

    def query(self, page_number: int) -> str:
        fields = {k: v for k, v in vars(self).items() if k != "problems" and v}
        return urlencode({**fields, "page": page_number})


def search(session: Session, wanted: StudyFilter, page_number: int) -> tuple[list[Study], int]:
    """One page of the studies that match, newest arrival first, and how many match in all."""
    conditions = wanted.conditions()
    base = select(Study).join(Patient).where(*conditions)
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = session.scalars(
        base.options(*_STUDY_TREE)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(PAGE_SIZE)
        .offset((page_number - 1) * PAGE_SIZE)
    ).all()
    return list(rows), total


def _choices(session: Session, settings: Settings) -> dict[str, list[str]]:
    modalities = session.scalars(select(Series.modality).distinct().where(Series.modality != "")).all()
    routes = {*session.scalars(select(Job.route).distinct()).all(), *(r.name for r in settings.routes)}
    return {"modalities": sorted(modalities), "routes": sorted(routes), "statuses": list(STATUSES)}


def _identity(study: Study) -> dict[str, Any]:
    """Who and what the study is, as the list and the detail page show it (PHI: their views are audited)."""
    return {
        "uid": study.study_uid,
        "patient_name": person_name(study.patient.patient_name),
        "patient_id": study.patient.patient_id,
        "accession": study.accession_number,
        "study_date": study.study_date,
        "description": study.description,
    }


def _row(study: Study) -> dict[str, Any]:
    jobs = [job for series in study.series for job in series.jobs]
    return {
        **_identity(study),
        "modalities": sorted({s.modality for s in study.series if s.modality}),
        "routes": sorted({job.route for job in jobs}),
        "status": study_status(study),
        "received": when(study.first_received_at),
        "instances": sum(s.instance_count for s in study.series),
        "total": duration(stage_timings(study)["total"]),
    }


@router.get("/studies", response_class=HTMLResponse)
def studies_page(
    request: Request,
    principal: Viewer,
    received_from: str = "",
    received_to: str = "",
    modality: str = "",
    route: str = "",
    status: str = "",
    accession: str = "",
    patient: str = "",
    page_number: Annotated[int, Query(alias="page", ge=1)] = 1,
    done: str = "",
) -> HTMLResponse:
    db: Database = request.app.state.db
    wanted = StudyFilter(received_from, received_to, modality, route, status, accession, patient)
    with db.session() as session:
        found, total = search(session, wanted, page_number)
        rows = [_row(study) for study in found]
        choices = _choices(session, request.app.state.settings)
    if rows:
        audit.append(
            db,
            "phi.viewed",
            actor=principal.actor,
            what="studies list",
            studies=[row["uid"] for row in rows],
        )
    pages = max(math.ceil(total / PAGE_SIZE), 1)
    return page(
        request,
        "studies.html",
        principal,
        rows=rows,
        total=total,
        filters=wanted,
        choices=choices,
        page_number=page_number,
        pages=pages,
        newer=wanted.query(page_number - 1) if page_number > 1 else "",
        older=wanted.query(page_number + 1) if page_number < pages else "",
        done=done,
    )


# --- One study ------------------------------------------------------------------------------------


def _load(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).options(*_STUDY_TREE).where(Study.study_uid == study_uid))
    if study is None:
        raise HTTPException(404, "no such study on this node (it may have been deleted)")
    return study


def _why_not(series: Series, settings: Settings) -> list[dict[str, Any]]:
    """For a series no route took: each configured route's failed conditions, read from the header kept
    at arrival — what ``ainode routes test`` would say today."""
    if series.status != SeriesStatus.NO_ROUTE or series.header is None:
        return []
    try:
        subject = Subject(decode(series.header), series.called_ae, series.calling_ae)
    except Exception as exc:  # an unreadable header is itself the answer
        return [{"route": "(header)", "failed": [f"unreadable: {type(exc).__name__}"]}]
    return [
        {"route": route.name, "failed": [str(m) for m in mismatches(route, subject)] or ["matches now"]}
        for route in settings.routes
    ]


def _report(result: Result) -> list[Section] | str:
    """An SR result's content, or why it cannot be shown."""
    try:
        return content_sections(dcmread(result.path))
    except FileNotFoundError:
        return "the report's file is no longer on this node"
    except Exception as exc:
        return f"the report could not be read: {type(exc).__name__}"


def _job(job: Job, study_uid: str) -> dict[str, Any]:
    outcome = job.outcome or {}
    results = []
    for result in job.results:
        results.append(
            {
                "kind": result.kind,
                "sop_uid": result.sop_uid,
                "png": f"/studies/{quote(study_uid)}/results/{quote(result.sop_uid)}.png"
                if result.kind == "SC"
                else "",
                "report": _report(result) if result.kind == "SR" else None,
                "sends": [
                    {
                        "destination": send.destination,
                        "status": send.status.value,
                        "attempts": send.attempts,
                        "error": brief_error(send.last_error),
                        "sent_at": when(send.sent_at),
                        "next_attempt_at": when(send.next_attempt_at)
                        if send.status == SendStatus.PENDING
                        else "",
                    }
                    for send in result.sends
                ],
            }
        )
    return {
        "id": job.id,
        "route": job.route,
        "handler": job.handler,
        "model": job.model,
        "model_version": job.model_version,
        "model_sha256": job.model_sha256,
        "status": job.status.value,
        "attempts": job.attempts,
        "worker": job.worker,
        "error": brief_error(job.error),
        "summary": job.summary,
        "analysed": outcome.get("analysed"),
        "not_analysed_reason": outcome.get("not_analysed_reason") or "",
        "findings": outcome.get("findings", []),
        "timings": {stage: duration(seconds) for stage, seconds in (job.timings or {}).items()},
        "inputs": [series.series_uid for series in job.inputs],
        "created": when(job.created_at),
        "started": when(job.started_at),
        "finished": when(job.finished_at),
        "results": results,
    }


def _detail(study: Study, settings: Settings) -> dict[str, Any]:
    jobs: dict[int, Job] = {job.id: job for series in study.series for job in series.jobs}
    return {
        **_identity(study),
        "status": study_status(study),
        "first_received": when(study.first_received_at),
        "last_received": when(study.last_received_at),
        "stable": when(study.stable_at),
        "timings": {stage: duration(seconds) for stage, seconds in stage_timings(study).items()},
        "series": [
            {
                "uid": series.series_uid,
                "number": series.series_number,
                "modality": series.modality,
                "body_part": series.body_part,
                "description": series.description,
                "status": series.status.value,
                "instances": series.instance_count,
                "late_instances": series.late_instances,
                "calling_ae": series.calling_ae,
                "called_ae": series.called_ae,
                "route_note": series.route_note,
                "why_not": _why_not(series, settings),
                "ready": when(series.ready_at),
            }
            for series in study.series
        ],
        "jobs": [_job(job, study.study_uid) for _, job in sorted(jobs.items())],
    }


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(
    request: Request, principal: Viewer, study_uid: str, done: str = "", error: str = ""
) -> HTMLResponse:
    db: Database = request.app.state.db
    with db.session() as session:
        detail = _detail(_load(session, study_uid), request.app.state.settings)
    audit.append(db, "phi.viewed", actor=principal.actor, study_uid=study_uid, what="study detail page")
    return page(
        request,
        "study.html",
        principal,
        study=detail,
        can_operate=role_at_least(principal.role, "operator"),
        can_delete=role_at_least(principal.role, "admin"),
        done=done,
        error=error,
    )


@router.get("/studies/{study_uid}/results/{sop_uid}.png")
def result_png(request: Request, principal: Viewer, study_uid: str, sop_uid: str) -> Response:
    """A Secondary Capture result as the PACS would show it, rendered from the very DICOM file sent."""
    db: Database = request.app.state.db
    with db.session() as session:
        path = session.scalar(
            select(Result.path)
            .join(Job)
            .join(Series, Job.series_fk == Series.id)
            .join(Study)
            .where(Study.study_uid == study_uid, Result.sop_uid == sop_uid, Result.kind == "SC")
        )
    if path is None:
        raise HTTPException(404, "no such overlay image in this study")
    try:
        rgb = display_rgb8(dcmread(path))
    except FileNotFoundError:
        raise HTTPException(404, "the overlay's file is no longer on this node") from None
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise HTTPException(500, "the image could not be encoded as PNG")
    # The patient's image, which may be fetched without the page: a PHI view of its own.
    audit.append(
        db, "phi.viewed", actor=principal.actor, study_uid=study_uid, what="overlay image", sop_uid=sop_uid
    )
    return Response(png.tobytes(), media_type="image/png")


def _back(study_uid: str, *, done: str = "", error: str = "") -> RedirectResponse:
    """Post/redirect/get: the study's page again, saying what happened."""
    query = urlencode({"done": done} if done else {"error": error})
    return RedirectResponse(f"/studies/{quote(study_uid)}?{query}", status_code=303)


def _exists(db: Database, study_uid: str) -> None:
    with db.session() as session:
        if session.scalar(select(Study.id).where(Study.study_uid == study_uid)) is None:
            raise HTTPException(404, "no such study on this node")


@router.post("/studies/{study_uid}/rerun")
def rerun(request: Request, principal: Operator, study_uid: str) -> Response:
    db: Database = request.app.state.db
    _exists(db, study_uid)
    queued = rerun_study(db, study_uid, principal.actor)
    if not queued:
        return _back(study_uid, error="nothing to re-run: the study has no finished job")
    return _back(study_uid, done=f"re-run queued: job {', '.join(map(str, queued))}")


@router.post("/studies/{study_uid}/resend")
def resend(request: Request, principal: Operator, study_uid: str) -> Response:
    db: Database = request.app.state.db
    _exists(db, study_uid)
    pending = resend_study(db, study_uid, principal.actor)
    if not pending:
        return _back(
            study_uid, error="nothing to resend: no sent or failed results (pending ones are on their way)"
        )
    return _back(study_uid, done=f"{pending} send(s) queued again")


@router.get("/studies/{study_uid}/delete", response_class=HTMLResponse)
def confirm_delete(request: Request, principal: Admin, study_uid: str) -> HTMLResponse:
    """The confirmation step: what would go, and one more button."""
    db: Database = request.app.state.db
    with db.session() as session:
        detail = _detail(_load(session, study_uid), request.app.state.settings)
    audit.append(
        db, "phi.viewed", actor=principal.actor, study_uid=study_uid, what="study delete confirmation"
    )
    return page(request, "study_delete.html", principal, study=detail)


@router.post("/studies/{study_uid}/delete")
def delete(
    request: Request, principal: Admin, study_uid: str, confirm: Annotated[str, Form()] = ""
) -> Response:
    if confirm != "yes":
        return RedirectResponse(f"/studies/{quote(study_uid)}/delete", status_code=303)
    try:
        deleted = delete_study(request.app.state.db, request.app.state.spool, study_uid, principal.actor)
    except StudyBusy as exc:
        return _back(study_uid, error=str(exc))
    if deleted is None:
        raise HTTPException(404, "no such study on this node")
    message = f"study deleted: {deleted.series} series, {deleted.instances} instances, {deleted.jobs} jobs"
    return RedirectResponse(f"/studies?{urlencode({'done': message})}", status_code=303)
