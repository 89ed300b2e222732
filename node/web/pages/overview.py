"""Overview: is the node working? What came in and went out in the last hour and day, what waits in
each stage, how long a study takes from arrival to results sent, what each model said, how the
destinations fare, free disk, and the latest errors. No patient data: nothing here is PHI.

The page refreshes itself (``static/live.js``); ``/api/overview`` gives the same figures as JSON.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.accounts import Principal
from node.config import Settings
from node.db import AuditEvent, Job, JobStatus, Result, Send, SendStatus, Series, SeriesStatus, Study, utcnow
from node.jobs.distributed import awaiting_a_worker
from node.spool import Spool
from node.web.auth import require
from node.web.pages.destinations import Outbox, outboxes
from node.web.pages.studies import brief_error, duration, when
from node.web.pages.workers import workers
from node.web.render import page

router = APIRouter()

Viewer = Annotated[Principal, Depends(require("viewer"))]
WINDOWS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
QUEUE_WARNING = timedelta(minutes=10)  # a job queued this long means the workers do not keep up
RECENT = 10  # errors listed


def _study_count(session: Session, *conditions: Any) -> int:
    found = select(func.count(func.distinct(Series.study_fk))).select_from(Job)
    return session.scalar(found.join(Series, Job.series_fk == Series.id).where(*conditions)) or 0


def _activity(session: Session, since: datetime) -> dict[str, int]:
    finished = Job.finished_at >= since
    return {
        "received": session.scalar(select(func.count()).where(Study.first_received_at >= since)) or 0,
        "processed": _study_count(session, Job.status == JobStatus.DONE, finished),
        "failed": _study_count(session, Job.status == JobStatus.FAILED, finished),
        "results_sent": session.scalar(select(func.count()).where(Send.sent_at >= since)) or 0,
    }


def _counts(session: Session, column: Any) -> dict[str, int]:
    return {
        state.value: count for state, count in session.execute(select(column, func.count()).group_by(column))
    }


def _queues(session: Session, now: datetime) -> dict[str, Any]:
    series, jobs, sends = (
        _counts(session, Series.status),
        _counts(session, Job.status),
        _counts(session, Send.status),
    )
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED))
    return {
        "series_receiving": series.get(SeriesStatus.RECEIVING.value, 0),
        "series_ready": series.get(SeriesStatus.READY.value, 0),
        "jobs_queued": jobs.get(JobStatus.QUEUED.value, 0),
        "jobs_running": jobs.get(JobStatus.RUNNING.value, 0),
        "sends_pending": sends.get(SendStatus.PENDING.value, 0),
        "oldest_queued_seconds": round((now - oldest).total_seconds(), 1) if oldest else None,
    }


def _latency(session: Session, since: datetime) -> dict[str, Any]:
    """Seconds from a study's first instance to its last result sent, for studies whose results were
    last sent in the window."""
    last_sent = func.max(Send.sent_at)
    rows = session.execute(
        select(Study.first_received_at, last_sent)
        .join(Series, Series.study_fk == Study.id)
        .join(Job, Job.series_fk == Series.id)
        .join(Result)
        .join(Send)
        .group_by(Study.id, Study.first_received_at)
        .having(last_sent >= since)
    ).all()
    seconds = [(sent - received).total_seconds() for received, sent in rows if sent is not None]
    if not seconds:
        return {"studies": 0, "p50": None, "p95": None}
    p50, p95 = np.percentile(seconds, [50, 95])
    return {"studies": len(seconds), "p50": round(float(p50), 1), "p95": round(float(p95), 1)}


def _models(session: Session, since: datetime) -> list[dict[str, Any]]:
    """Per model version, the jobs that ended in the window: how many, how many failed, how many were
    analysed and in how many of those a finding was called present."""
    stats: dict[tuple[str, str], dict[str, Any]] = {}
    jobs = session.execute(
        select(Job.model, Job.model_version, Job.status, Job.outcome).where(
            Job.finished_at >= since, Job.status.in_((JobStatus.DONE, JobStatus.FAILED))
        )
    )
    for model, version, status, outcome in jobs:
        entry = stats.setdefault(
            (model, version),
            {"model": model, "version": version, "done": 0, "failed": 0, "analysed": 0, "positive": 0},
        )
        if status == JobStatus.FAILED:
            entry["failed"] += 1
            continue
        entry["done"] += 1
        if (outcome or {}).get("analysed"):
            entry["analysed"] += 1
            entry["positive"] += any(f.get("present") for f in outcome.get("findings", []))
    for entry in stats.values():
        entry["positive_rate"] = (
            round(entry["positive"] / entry["analysed"], 3) if entry["analysed"] else None
        )
    return [stats[key] for key in sorted(stats)]


def _destinations(request: Request) -> list[dict[str, Any]]:
    """Each configured destination's outbox (and any other that still has sends), as the
    Destinations page counts them."""
    settings: Settings = request.app.state.settings
    boxes = outboxes(request.app.state.db)
    addresses = {d.name: f"{d.ae_title}@{d.host}:{d.port}" for d in settings.destinations}
    return [
        {
            **asdict(boxes.get(name, Outbox(name))),
            "name": name,
            "address": addresses.get(name, "not configured"),
        }
        for name in sorted({*addresses, *boxes})
    ]


def _errors(session: Session) -> list[dict[str, Any]]:
    """The latest failed jobs and failing sends, newest first: what went wrong, not the stack."""
    jobs = session.execute(
        select(Job.id, Job.route, Job.model, Job.error, Job.finished_at, Study.study_uid)
        .join(Series, Job.series_fk == Series.id)
        .join(Study)
        .where(Job.status == JobStatus.FAILED)
        .order_by(Job.finished_at.desc())
        .limit(RECENT)
    ).all()
    sends = session.execute(
        select(
            Send.destination,
            Send.status,
            Send.attempts,
            Send.last_error,
            Send.next_attempt_at,
            Study.study_uid,
        )
        .join(Result)
        .join(Job)
        .join(Series, Job.series_fk == Series.id)
        .join(Study)
        .where(Send.last_error != "", Send.status != SendStatus.SENT)
        .order_by(Send.next_attempt_at.desc())
        .limit(RECENT)
    ).all()
    found = [
        {
            "at": row.finished_at,
            "what": f"job {row.id} ({row.route}, {row.model}) failed",
            "error": brief_error(row.error),
            "study_uid": row.study_uid,
        }
        for row in jobs
    ] + [
        {
            "at": row.next_attempt_at,
            "what": f"send to {row.destination} "
            + ("gave up" if row.status == SendStatus.FAILED else f"retrying after {row.attempts} attempt(s)"),
            "error": brief_error(row.last_error),
            "study_uid": row.study_uid,
        }
        for row in sends
    ]
    found.sort(key=lambda error: error["at"].timestamp() if error["at"] else 0.0, reverse=True)
    return found[:RECENT]


def _retention(session: Session) -> dict[str, Any] | None:
    """The last retention pass that removed studies, or found the disk too full for what it may
    remove (node/retention.py); None before the first."""
    event = session.scalar(
        select(AuditEvent)
        .where(AuditEvent.action == "retention.pass")
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    if event is None:
        return None
    detail = event.detail
    return {
        "at": event.at,
        "removed": detail.get("removed_by_age", 0) + detail.get("removed_by_disk", 0),
        "bytes_freed": detail.get("bytes_freed", 0),
        "used_percent": detail.get("used_percent_after"),
        "short": event.outcome == "warning",
    }


def overview(request: Request) -> dict[str, Any]:
    """Every figure of the page, read in one transaction."""
    settings: Settings = request.app.state.settings
    spool: Spool = request.app.state.spool
    now = utcnow()
    with request.app.state.db.session() as session:
        figures: dict[str, Any] = {
            "at": now,
            "activity": {name: _activity(session, now - span) for name, span in WINDOWS.items()},
            "queues": _queues(session, now),
            "latency": _latency(session, now - WINDOWS["day"]),
            "models": _models(session, now - WINDOWS["day"]),
            "errors": _errors(session),
            "retention": _retention(session),
        }
    figures["destinations"] = _destinations(request)
    figures["workers"] = None  # the local pool's processes are the node's own
    if settings.jobs.executor == "celery":
        alive = [worker["alive"] for worker in workers(request.app.state.db, settings)]
        waiting = awaiting_a_worker(request.app.state.db, settings.jobs.distributed)
        figures["workers"] = {
            "alive": sum(alive),
            "stale": len(alive) - sum(alive),
            "jobs_waiting_for_a_worker": len(waiting),
            "queues_without_a_worker": sorted(set(waiting.values())),
        }
    free, floor = spool.free_bytes(), settings.node.min_free_disk_mb * 2**20
    figures["disk"] = {"free_bytes": free, "floor_bytes": floor, "low": free < 2 * floor}
    figures["dicom_listening"] = bool(request.app.state.dicom_listening())
    figures["problems"] = _problems(figures)
    return figures


def _problems(figures: dict[str, Any]) -> list[str]:
    """What keeps the answer to "is it working?" from being a plain yes."""
    problems = []
    if not figures["dicom_listening"]:
        problems.append("the DICOM listener is down: no study can arrive")
    disk = figures["disk"]
    if disk["free_bytes"] < disk["floor_bytes"]:
        problems.append("free disk is below the floor: instances are refused (senders retry later)")
    elif disk["low"]:
        problems.append("free disk is low: less than twice the floor")
    if figures["retention"] and figures["retention"]["short"]:
        problems.append(
            "the data disk stays above retention's low-water mark and no settled study is left to remove: "
            "studies whose job or send failed are kept until an admin re-runs, resends or deletes them"
        )
    waiting = figures["queues"]["oldest_queued_seconds"]
    if waiting is not None and waiting > QUEUE_WARNING.total_seconds():
        problems.append(f"a job has waited {duration(waiting)} in the queue: the workers do not keep up")
    if figures["workers"] is not None and not figures["workers"]["alive"]:
        problems.append("no distributed worker is alive: jobs wait at the broker")
    elif figures["workers"] is not None and figures["workers"]["jobs_waiting_for_a_worker"]:
        unserved = figures["workers"]
        problems.append(
            f"{unserved['jobs_waiting_for_a_worker']} job(s) wait at the broker: no live worker consumes"
            f" {', '.join(unserved['queues_without_a_worker'])} (start one holding those models)"
        )
    failed = figures["activity"]["hour"]["failed"]
    if failed:
        problems.append(f"{failed} stud{'y' if failed == 1 else 'ies'} with a failed job in the last hour")
    for destination in figures["destinations"]:
        if destination["failed"]:
            problems.append(f"{destination['failed']} result(s) could not be sent to {destination['name']}")
        elif destination["pending"] and destination["last_error"]:
            problems.append(f"sends to {destination['name']} are retrying: {destination['last_error']}")
    return problems


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request, principal: Viewer) -> HTMLResponse:
    figures = overview(request)
    return page(
        request,
        "overview.html",
        principal,
        o=figures,
        updated=when(figures["at"]),
        p50=duration(figures["latency"]["p50"]),
        p95=duration(figures["latency"]["p95"]),
        oldest=duration(figures["queues"]["oldest_queued_seconds"]),
        errors=[{**error, "at": when(error["at"])} for error in figures["errors"]],
        destinations=[{**d, "last_success": when(d["last_success"])} for d in figures["destinations"]],
        retention_at=when(figures["retention"]["at"]) if figures["retention"] else "",
    )


@router.get("/api/overview")
def overview_api(request: Request, principal: Viewer) -> dict[str, Any]:
    return overview(request)
