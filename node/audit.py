"""Append-only audit log: every step a study takes, and every PHI access, as a hash chain.

Each event's hash covers the previous event's hash, so a deleted or edited row breaks the chain and
:func:`verify` finds it. An event is recorded in the transaction whose change it describes
(:func:`record`, stamped with the time it was recorded) and joins the chain when that transaction
commits: only then is the appender serialised, by the database — a PostgreSQL advisory lock, or
SQLite's writer lock — while it reads the chain's head and inserts the events. So two writers never
fork the chain, whichever process they run in, and no work a transaction does before it commits
waits on the audit log. (With SQLite that relies on pysqlite's default transaction handling, which
begins a transaction at its first write, so the head is read by the transaction holding the lock.)
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC
from typing import Any

from sqlalchemy import event, false, select, text, update
from sqlalchemy.orm import Session, SessionTransaction

from node.db import AuditEvent, Database, utcnow

GENESIS = "0" * 64
_ADVISORY_KEY = 0x41494E4F  # "AINO"
_PENDING = "audit.pending"  # session.info key: events recorded in the session's transaction


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


def record(
    session: Session,
    action: str,
    *,
    actor: str = "node",
    study_uid: str = "",
    outcome: str = "success",
    **detail: Any,
) -> None:
    """Record one event; it is appended when ``session``'s transaction commits, with the changes it
    describes, and dropped if that transaction rolls back. (Not inside a savepoint that may roll back
    alone: its events would still be appended.)"""
    # JSON round trip so the hash covers exactly what the database stores and returns.
    stored = json.loads(json.dumps(detail, default=str))
    session.info.setdefault(_PENDING, []).append(
        AuditEvent(
            at=utcnow(), action=action, outcome=outcome, actor=actor, study_uid=study_uid, detail=stored
        )
    )


def append(db: Database, action: str, **kwargs: Any) -> None:
    """Record one event in its own transaction."""
    with db.session() as session:
        record(session, action, **kwargs)


@event.listens_for(Session, "before_commit")
def _chain(session: Session) -> None:
    """The one serialised appender: the transaction's own changes are written first (so it holds no
    lock another appender could wait on), then the database's lock is taken and the events chained."""
    if session.get_nested_transaction() is not None:
        return  # a savepoint is released: the events wait for the transaction itself to commit
    events = session.info.pop(_PENDING, None)
    if not events:
        return
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
    else:  # SQLite admits one writer at a time: a write that changes nothing takes its lock
        session.execute(update(AuditEvent).where(false()).values(outcome=AuditEvent.outcome))
    prev = session.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)) or GENESIS
    for pending in events:
        pending.prev_hash = prev
        pending.hash = prev = _digest(prev, pending)
        session.add(pending)


@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, transaction: SessionTransaction) -> None:
    """A transaction that ended without committing takes its events with it."""
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


def verify(db: Database) -> int | None:
    """The id of the first event whose hash does not follow from the chain, or None if intact."""
    prev = GENESIS
    with db.session() as session:
        for stored in session.scalars(select(AuditEvent).order_by(AuditEvent.id)).yield_per(1000):
            if stored.prev_hash != prev or _digest(prev, stored) != stored.hash:
                return stored.id
            prev = stored.hash
    return None
