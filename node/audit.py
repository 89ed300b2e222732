"""Append-only audit log: every step a study takes, and every PHI access, as a hash chain.

Each event's hash covers the previous event's hash, so a deleted or edited row breaks the chain and
:func:`verify` finds it. Writers take :func:`writing`, which serialises appends (a thread lock, and on
PostgreSQL a transaction-scoped advisory lock) so two writers never fork the chain.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from node.db import AuditEvent, Database, utcnow

GENESIS = "0" * 64
_ADVISORY_KEY = 0x41494E4F  # "AINO"
_lock = threading.Lock()


def _digest(prev_hash: str, event: AuditEvent) -> str:
    body = {
        "prev": prev_hash,
        "at": event.at.astimezone(UTC).isoformat(),
        "action": event.action,
        "outcome": event.outcome,
        "actor": event.actor,
        "study_uid": event.study_uid,
        "detail": event.detail,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextmanager
def writing(db: Database) -> Iterator[Session]:
    """A session in which :func:`record` may append; commits with the caller's other changes."""
    with _lock, db.session() as session:
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
        yield session


def record(
    session: Session,
    action: str,
    *,
    actor: str = "node",
    study_uid: str = "",
    outcome: str = "success",
    **detail: Any,
) -> AuditEvent:
    """Append one event. The session must come from :func:`writing`."""
    session.flush()
    prev = session.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)) or GENESIS
    event = AuditEvent(
        at=utcnow(), action=action, outcome=outcome, actor=actor, study_uid=study_uid, detail=detail
    )
    # JSON round trip so the hash covers exactly what the database stores and returns.
    event.detail = json.loads(json.dumps(detail, default=str))
    event.prev_hash = prev
    event.hash = _digest(prev, event)
    session.add(event)
    session.flush()
    return event


def append(db: Database, action: str, **kwargs: Any) -> None:
    """Record one event in its own transaction."""
    with writing(db) as session:
        record(session, action, **kwargs)


def verify(db: Database) -> int | None:
    """The id of the first event whose hash does not follow from the chain, or None if intact."""
    prev = GENESIS
    with db.session() as session:
        for event in session.scalars(select(AuditEvent).order_by(AuditEvent.id)).yield_per(1000):
            if event.prev_hash != prev or _digest(prev, event) != event.hash:
                return event.id
            prev = event.hash
    return None
