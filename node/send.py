"""The outbox: results go to their destinations by C-STORE, with retries and back-off.

Each (result, destination) pair is a row; a send is done only when the destination answered a
success (or warning) status for that very instance. Failures wait ``first_delay × factor^(n-1)``
(capped) before the next attempt and give up after ``max_attempts``. Rows live in the database, so
pending sends survive a restart.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from typing import Any

from pydicom import Dataset
from sqlalchemy import select

from node import audit
from node.config import ConfigError, Destination, SendSettings, Settings
from node.db import Database, Job, Result, Send, SendStatus, Series, Study, utcnow
from node.dicom.network import associate

log = logging.getLogger(__name__)

_WARNINGS = {0xB000, 0xB006, 0xB007}  # stored, with coercion or elements discarded
BATCH = 200


def backoff(settings: SendSettings, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    delay = settings.first_delay_seconds * settings.backoff_factor ** max(attempts - 1, 0)
    return float(min(delay, settings.max_delay_seconds))


def echo(settings: Settings, destination: Destination) -> int:
    """C-ECHO a destination; the DICOM status (0 = success), or -1 if no association."""
    try:
        assoc = associate(settings, destination, timeout=10)
    except ConfigError as exc:  # a TLS file changed since start: the echo fails, it does not crash the page
        log.warning("C-ECHO %s: %s", destination.name, exc)
        return -1
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def resend_study(db: Database, study_uid: str, actor: str) -> int:
    """Send a study's results again (a person asked for it: the PACS lost them, a destination was
    fixed): every send that is not pending is due now, its attempts counted afresh. What the earlier
    attempts did stays in the audit log. Returns how many sends are pending again."""
    with db.session() as session:
        sends = session.scalars(
            select(Send)
            .join(Result)
            .join(Job)
            .join(Series, Job.series_fk == Series.id)
            .join(Study)
            .where(Study.study_uid == study_uid, Send.status != SendStatus.PENDING)
            .order_by(Send.id)
        ).all()
        for send in sends:
            send.status, send.attempts, send.next_attempt_at, send.sent_at = (
                SendStatus.PENDING,
                0,
                utcnow(),
                None,
            )
        if sends:
            audit.record(
                session,
                "result.resend",
                actor=actor,
                study_uid=study_uid,
                sends=len(sends),
                destinations=sorted({send.destination for send in sends}),
            )
        return len(sends)


class Sender:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def run_due(self) -> int:
        """Attempt every send that is due, one association per destination. Returns sends done."""
        with self.db.session() as session:
            due = session.execute(
                select(Send.id, Send.destination, Result.path, Result.sop_class_uid)
                .join(Result)
                .where(Send.status == SendStatus.PENDING, Send.next_attempt_at <= utcnow())
                .order_by(Send.id)
                .limit(BATCH)
            ).all()
        by_destination: dict[str, list[Any]] = defaultdict(list)
        for row in due:
            by_destination[row.destination].append(row)
        sent = 0
        for name, rows in by_destination.items():
            sent += self._send(name, rows)
        return sent

    def _send(self, name: str, rows: list[Any]) -> int:
        try:
            destination = self.settings.destination(name)
            # a certificate file gone since start fails the send
            assoc = associate(self.settings, destination, [row.sop_class_uid for row in rows])
        except Exception as exc:
            self._record({row.id: (False, str(exc)) for row in rows})
            return 0
        outcomes: dict[int, tuple[bool, str]] = {}
        if not assoc.is_established:
            reason = f"no association with {destination.ae_title}@{destination.host}:{destination.port}"
            outcomes = {row.id: (False, reason) for row in rows}
        else:
            try:
                for row in rows:
                    outcomes[row.id] = self._store_one(assoc, row.path)
                    if not assoc.is_established:
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
            for row in rows:
                outcomes.setdefault(row.id, (False, "association ended before this instance"))
        self._record(outcomes)
        return sum(ok for ok, _ in outcomes.values())

    @staticmethod
    def _store_one(assoc: Any, path: str) -> tuple[bool, str]:
        try:
            status: Dataset = assoc.send_c_store(path)
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        code = int(status.Status) if "Status" in status else -1
        if code == 0 or code in _WARNINGS:
            return True, "" if code == 0 else f"stored with warning 0x{code:04X}"
        return False, "no response" if code < 0 else f"status 0x{code:04X}"

    def _record(self, outcomes: dict[int, tuple[bool, str]]) -> None:
        now = utcnow()
        policy = self.settings.send
        with self.db.session() as session:
            for send in session.scalars(select(Send).where(Send.id.in_(outcomes))):
                ok, message = outcomes[send.id]
                send.attempts += 1
                send.last_error = message
                if ok:
                    send.status, send.sent_at = SendStatus.SENT, now
                    action, outcome = "result.sent", "success"
                elif send.attempts >= policy.max_attempts:
                    send.status = SendStatus.FAILED
                    action, outcome = "result.send_failed", "failure"
                else:
                    send.next_attempt_at = now + timedelta(seconds=backoff(policy, send.attempts))
                    action, outcome = "result.send_retry", "failure"
                audit.record(
                    session,
                    action,
                    outcome=outcome,
                    study_uid=send.result.job.series.study.study_uid,
                    destination=send.destination,
                    sop_uid=send.result.sop_uid,
                    attempt=send.attempts,
                    error=message,
                )
        failed = [m for ok, m in outcomes.values() if not ok]
        if failed:
            log.warning("%d send(s) failed: %s", len(failed), failed[0])
