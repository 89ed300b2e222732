"""The audit log page: who did what to which study, and whether the chain still holds.

Operators and admins read it (a viewer reads studies, not who else read them). Events name studies by
their UID and people by their account, never a patient's name or ID, so reading the log is not PHI
access; exporting it is audited all the same (``audit.exported``), as exports leave the node.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlalchemy import ColumnElement, Select, String, and_, cast, func, or_, select

from node import audit
from node.accounts import Principal
from node.db import AuditEvent, Database
from node.web.auth import require
from node.web.render import page

router = APIRouter()

PAGE_SIZE = 100
OUTCOMES = ("success", "failure")
Operator = Annotated[Principal, Depends(require("operator"))]


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass
class AuditFilter:
    """The log's filters, as the query string carries them; times are UTC."""

    since: str = ""  # YYYY-MM-DD or YYYY-MM-DDTHH:MM
    until: str = ""  # a date alone means to the end of that day
    actor: str = ""  # part of the actor: "alice", "user:", an AE title, an address
    action: str = ""  # an action, or a family ending in "." ("user.")
    study_uid: str = ""
    outcome: str = ""
    problems: list[str] = field(default_factory=list)

    def conditions(self) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = []
        since, until = self._moment(self.since, end=False), self._moment(self.until, end=True)
        if since is not None:
            found.append(AuditEvent.at >= since)
        if until is not None:
            found.append(AuditEvent.at < until)
        if self.actor.strip():
            found.append(AuditEvent.actor.ilike(_like(self.actor.strip()), escape="\\"))
        action = self.action.strip()
        if action.endswith("."):
            found.append(AuditEvent.action.startswith(action, autoescape=True))
        elif action:
            found.append(AuditEvent.action == action)
        if uid := self.study_uid.strip():
            # An event about one study names it in study_uid; a list page's names several in its detail.
            named = cast(AuditEvent.detail, String).contains(json.dumps(uid), autoescape=True)
            found.append(or_(AuditEvent.study_uid == uid, and_(AuditEvent.study_uid == "", named)))
        if self.outcome in OUTCOMES:
            found.append(AuditEvent.outcome == self.outcome)
        elif self.outcome:
            self.problems.append(f"unknown outcome {self.outcome!r}")
        return found

    def _moment(self, text: str, *, end: bool) -> datetime | None:
        if not text.strip():
            return None
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            self.problems.append(f"{text!r} is not a date or time (YYYY-MM-DD or YYYY-MM-DDTHH:MM)")
            return None
        if end:  # to the end of the day, or of the minute given
            moment += timedelta(days=1) if len(text.strip()) == 10 else timedelta(minutes=1)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment

    def fields(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if k != "problems" and v}

    def query(self, **more: Any) -> str:
        return urlencode({**self.fields(), **more})

    def select(self) -> Select[AuditEvent]:
        return select(AuditEvent).where(*self.conditions())


def _filter(
    since: str = "",
    until: str = "",
    actor: str = "",
    action: str = "",
    study_uid: str = "",
    outcome: str = "",
) -> AuditFilter:
    return AuditFilter(since, until, actor, action, study_uid, outcome)


Filter = Annotated[AuditFilter, Depends(_filter)]


def detail_text(detail: dict[str, Any]) -> str:
    """An event's detail as ``key=value`` pairs, lists and tables as JSON."""
    return ", ".join(
        f"{key}={value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
        for key, value in sorted(detail.items())
    )


@dataclass(frozen=True)
class ChainView:
    """What the page says of the chain."""

    state: audit.ChainState
    checked_at: datetime
    seconds: float


def chain_view(db: Database) -> ChainView:
    started = time.monotonic()
    state = audit.check(db)
    return ChainView(state, datetime.now(UTC), time.monotonic() - started)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    principal: Operator,
    wanted: Filter,
    page_number: Annotated[int, Query(alias="page", ge=1)] = 1,
) -> HTMLResponse:
    db: Database = request.app.state.db
    query = wanted.select()
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        events = session.scalars(
            query.order_by(AuditEvent.id.desc()).limit(PAGE_SIZE).offset((page_number - 1) * PAGE_SIZE)
        ).all()
        actions = sorted(session.scalars(select(AuditEvent.action).distinct()).all())
    chain = chain_view(db)
    pages = max(math.ceil(total / PAGE_SIZE), 1)
    broken_id = chain.state.broken.event_id if chain.state.broken else None
    return page(
        request,
        "audit.html",
        principal,
        filters=wanted,
        actions=actions,
        outcomes=OUTCOMES,
        events=[
            {
                "id": e.id,
                "at": e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                "action": e.action,
                "outcome": e.outcome,
                "actor": e.actor,
                "study_uid": e.study_uid,
                "detail": detail_text(e.detail),
                "broken": broken_id is not None and e.id >= broken_id,
            }
            for e in events
        ],
        total=total,
        page_number=page_number,
        pages=pages,
        newer=wanted.query(page=page_number - 1) if page_number > 1 else "",
        older=wanted.query(page=page_number + 1) if page_number < pages else "",
        export=wanted.query(),
        chain=chain,
    )


CSV_COLUMNS = ("id", "at", "action", "outcome", "actor", "study_uid", "detail", "prev_hash", "hash")


def _cell(value: str) -> str:
    """A text cell a spreadsheet will not run as a formula (an actor is partly what someone typed)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _csv_rows(db: Database, wanted: AuditFilter) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    with db.session() as session:
        for e in session.scalars(wanted.select().order_by(AuditEvent.id)).yield_per(1000):
            writer.writerow(
                (
                    e.id,
                    e.at.astimezone(UTC).isoformat(),
                    e.action,
                    e.outcome,
                    _cell(e.actor),
                    e.study_uid,
                    json.dumps(e.detail, ensure_ascii=False, sort_keys=True),
                    e.prev_hash,
                    e.hash,
                )
            )
            if buffer.tell() > 64 * 1024:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()


@router.get("/audit.csv")
def audit_csv(request: Request, principal: Operator, wanted: Filter) -> StreamingResponse:
    """The events the filters select, oldest first, with their hashes; the export is itself audited
    (before it is sent: whatever reaches the browser was recorded)."""
    db: Database = request.app.state.db
    with db.session() as session:
        count = session.scalar(select(func.count()).select_from(wanted.select().subquery())) or 0
    audit.append(db, "audit.exported", actor=principal.actor, filters=wanted.fields(), events=count)
    name = f"audit-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.csv"
    return StreamingResponse(
        _csv_rows(db, wanted),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
