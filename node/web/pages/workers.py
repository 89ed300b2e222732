"""The distributed workers (``[jobs] executor = "celery"``): each ``ainode worker`` as it last said —
its host, the model packages and devices it serves, the broker queues it consumes, how many jobs at a
time — whether it is alive (heard from within a few heartbeats) or stale, and the jobs it runs now and
ran in the last day. No patient data. ``/api/workers`` gives the same as JSON.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select

from node.accounts import Principal
from node.config import Settings
from node.db import Database, Job, JobStatus, Worker, utcnow
from node.jobs.distributed import silent_after
from node.web.auth import require
from node.web.pages.studies import when
from node.web.render import page

router = APIRouter()
Viewer = Annotated[Principal, Depends(require("viewer"))]
DAY = timedelta(days=1)


def workers(db: Database, settings: Settings) -> list[dict[str, Any]]:
    """Every worker that has said it runs, by name."""
    now = utcnow()
    since = now - silent_after(settings.jobs.distributed)
    with db.session() as session:
        rows = session.execute(
            select(Worker, (Worker.last_seen_at >= since).label("alive")).order_by(Worker.name)
        ).all()
        running = dict(
            session.execute(
                select(Job.worker, func.count())
                .where(Job.status == JobStatus.RUNNING, Job.worker != "")
                .group_by(Job.worker)
            ).all()
        )
        ended = {
            (name, JobStatus(status)): count
            for name, status, count in session.execute(
                select(Job.worker, Job.status, func.count())
                .where(Job.finished_at >= now - DAY, Job.worker != "")
                .group_by(Job.worker, Job.status)
            )
        }
        return [
            {
                "name": worker.name,
                "host": worker.host,
                "models": list(worker.models),
                "devices": list(worker.devices),
                "queues": list(worker.queues),
                "concurrency": worker.concurrency,
                "started_at": worker.started_at,
                "last_seen_at": worker.last_seen_at,
                "alive": bool(alive),
                "jobs_running": running.get(worker.name, 0),
                "jobs_done_last_day": ended.get((worker.name, JobStatus.DONE), 0),
                "jobs_failed_last_day": ended.get((worker.name, JobStatus.FAILED), 0),
            }
            for worker, alive in rows
        ]


@router.get("/workers", response_class=HTMLResponse)
def workers_page(request: Request, principal: Viewer) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    listed = workers(request.app.state.db, settings)
    return page(
        request,
        "workers.html",
        principal,
        workers=[
            {**w, "started_at": when(w["started_at"]), "last_seen_at": when(w["last_seen_at"])}
            for w in listed
        ],
        executor=settings.jobs.executor,
        stale_after=silent_after(settings.jobs.distributed).total_seconds(),
    )


@router.get("/api/workers")
def workers_api(request: Request, principal: Viewer) -> list[dict[str, Any]]:
    return workers(request.app.state.db, request.app.state.settings)
