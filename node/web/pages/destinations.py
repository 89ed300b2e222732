"""The destinations page: where results go, whether they are getting there, and a C-ECHO to ask.

Per configured destination: its address, the outbox (pending, sent and failed sends), the oldest
result still waiting, the latest error (a message, never a trace) and the last success. Sends to a
destination no longer configured are listed too: the sender cannot deliver them. The C-ECHO is the
same as ``ainode echo`` (:func:`node.send.echo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select

from node import audit
from node.accounts import role_at_least
from node.config import ConfigError, Destination, Settings
from node.db import Database, Result, Send, SendStatus
from node.send import echo
from node.web.auth import Principal, require
from node.web.pages.studies import brief_error
from node.web.render import page

router = APIRouter()


@dataclass
class Outbox:
    """One destination's sends by state."""

    destination: str
    pending: int = 0
    sent: int = 0
    failed: int = 0
    oldest_pending: datetime | None = None  # when the oldest result still waiting was written
    next_attempt: datetime | None = None
    last_error: str = ""
    last_error_attempts: int = 0
    last_success: datetime | None = None


def outboxes(db: Database) -> dict[str, Outbox]:
    """Every destination that has sends, by name."""
    boxes: dict[str, Outbox] = {}

    def box(name: str) -> Outbox:
        return boxes.setdefault(name, Outbox(name))

    with db.session() as session:
        for name, status, count in session.execute(
            select(Send.destination, Send.status, func.count()).group_by(Send.destination, Send.status)
        ):
            setattr(box(name), SendStatus(status).value, count)
        for name, oldest, next_attempt in session.execute(
            select(Send.destination, func.min(Result.created_at), func.min(Send.next_attempt_at))
            .join(Result)
            .where(Send.status == SendStatus.PENDING)
            .group_by(Send.destination)
        ):
            box(name).oldest_pending, box(name).next_attempt = oldest, next_attempt
        for name, last in session.execute(
            select(Send.destination, func.max(Send.sent_at))
            .where(Send.status == SendStatus.SENT)
            .group_by(Send.destination)
        ):
            box(name).last_success = last
        latest_errors = (
            select(func.max(Send.id))
            .where(Send.status != SendStatus.SENT, Send.last_error != "")
            .group_by(Send.destination)
        )
        for name, error, attempts in session.execute(
            select(Send.destination, Send.last_error, Send.attempts).where(Send.id.in_(latest_errors))
        ):
            box(name).last_error, box(name).last_error_attempts = brief_error(error), attempts
    return boxes


@dataclass(frozen=True)
class EchoResult:
    destination: str
    ok: bool
    message: str


def echo_destination(settings: Settings, destination: Destination) -> EchoResult:
    """C-ECHO ``destination``; a failure says whether there was no association or a bad status."""
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    status = echo(settings, destination)
    if status == 0:
        return EchoResult(destination.name, True, f"C-ECHO {where}: success")
    why = "no association (refused, unreachable or timed out)" if status < 0 else f"status 0x{status:04X}"
    return EchoResult(destination.name, False, f"C-ECHO {where}: {why}")


def _destinations_page(
    request: Request, principal: Principal, echoed: EchoResult | None = None
) -> HTMLResponse:
    settings = request.app.state.settings
    boxes = outboxes(request.app.state.db)
    configured = [
        (destination, boxes.get(destination.name, Outbox(destination.name)))
        for destination in settings.destinations
    ]
    names = {destination.name for destination in settings.destinations}
    return page(
        request,
        "destinations.html",
        principal,
        may_echo=role_at_least(principal.role, "operator"),
        configured=configured,
        unconfigured=[boxes[name] for name in sorted(boxes) if name not in names],
        echo=echoed,
    )


@router.get("/destinations", response_class=HTMLResponse)
def destinations_page(
    request: Request, principal: Annotated[Principal, Depends(require("viewer"))]
) -> HTMLResponse:
    return _destinations_page(request, principal)


@router.post("/destinations/{name}/echo", response_class=HTMLResponse)
def echo_page(
    name: str, request: Request, principal: Annotated[Principal, Depends(require("operator"))]
) -> HTMLResponse:
    """C-ECHO a configured destination, audit who asked and what came back, and show it."""
    settings = request.app.state.settings
    try:
        destination = settings.destination(name)
    except ConfigError as exc:
        raise HTTPException(404, str(exc)) from exc
    result = echo_destination(settings, destination)
    audit.append(
        request.app.state.db,
        "destination.echo",
        actor=principal.actor,
        outcome="success" if result.ok else "failure",
        destination=destination.name,
        ae_title=destination.ae_title,
        host=destination.host,
        port=destination.port,
        result=result.message,
    )
    return _destinations_page(request, principal, result)
