"""Retention: settled studies are removed when they are old, or when the data disk fills.

Without it the spool, the results and the database grow until the free-disk floor makes the node
refuse every instance. A pass removes, oldest last arrival first, the studies last received more than
``keep_days`` ago ("age"), then — while the data folder's file system is more used than
``disk_high_water_percent`` — further studies until it is below ``disk_low_water_percent`` ("disk").
Only settled studies go (``node.deletion.settled``): one still receiving, to be routed, analysed or
sent is never touched, nor one whose job or send failed for good — that one waits for an admin to
re-run, resend or delete it. Each removal is ``node.deletion.delete_study`` (the dashboard's Delete),
audited with its reason and the bytes freed; a pass that removed something, or whose disk became (or
stopped being) too full for what it may remove, records one ``retention.pass`` event, which the
Overview shows.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import select

from node import audit
from node.config import RetentionSettings
from node.db import Database, Study, utcnow
from node.deletion import StudyBusy, delete_study, settled
from node.spool import Spool

log = logging.getLogger(__name__)

_BATCH = 100  # candidates read per query: a pass over many studies never holds them all


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


@dataclass
class PassReport:
    """What one pass did; its ``retention.pass`` event carries the same."""

    at: datetime
    seconds: float = 0.0
    removed: dict[str, int] = field(default_factory=lambda: {"age": 0, "disk": 0})
    bytes_freed: int = 0
    used_percent_before: float = 0.0
    used_percent_after: float = 0.0
    short: bool = False  # removing by disk, still above the low-water mark: nothing settled is left


class Retention:
    """The retention pass, run on the node's scheduler. ``disk_usage`` reads the use of the file system
    holding a folder (``shutil.disk_usage``)."""

    def __init__(
        self,
        settings: RetentionSettings,
        db: Database,
        spool: Spool,
        disk_usage: Callable[[Path], DiskUsage] = lambda p: DiskUsage(*shutil.disk_usage(p)),
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.disk_usage = disk_usage
        self._was_short = False
        self._stopping = threading.Event()

    def stop(self) -> None:
        """The node is stopping: a pass under way ends after the study it is removing."""
        self._stopping.set()

    def used_percent(self) -> float:
        usage = self.disk_usage(self.spool.root)
        return 100.0 * usage.used / usage.total if usage.total else 0.0

    def _oldest_settled(self, skipped: set[str]) -> Iterator[tuple[str, datetime]]:
        """Settled studies, oldest last arrival first, read a batch at a time; each batch is read anew,
        without the studies removed meanwhile and those found busy in this pass (``skipped``)."""
        while True:
            with self.db.session() as session:
                query = select(Study.study_uid, Study.last_received_at).where(settled())
                if skipped:
                    query = query.where(Study.study_uid.not_in(skipped))
                query = query.order_by(Study.last_received_at, Study.id).limit(_BATCH)
                rows = [(uid, last_received) for uid, last_received in session.execute(query)]
            if not rows:
                return
            yield from rows

    def _reason(self, last_received: datetime, cutoff: datetime | None, by_disk: bool) -> str | None:
        if cutoff is not None and last_received < cutoff:
            return "age"
        if by_disk and self.used_percent() >= self.settings.disk_low_water_percent:
            return "disk"
        return None

    def run_pass(self, now: datetime | None = None) -> PassReport:
        """Remove what the settings say may go; returns what was done."""
        started = time.monotonic()
        now = now or utcnow()
        report = PassReport(at=now, used_percent_before=self.used_percent())
        cutoff = now - timedelta(days=self.settings.keep_days) if self.settings.keep_days else None
        by_disk = report.used_percent_before > self.settings.disk_high_water_percent
        skipped: set[str] = set()
        for study_uid, last_received in self._oldest_settled(skipped):
            reason = self._reason(last_received, cutoff, by_disk)
            if reason is None or self._stopping.is_set():
                break
            try:
                deleted = delete_study(
                    self.db,
                    self.spool,
                    study_uid,
                    "node",
                    reason=reason,
                    only_if_settled=True,
                    received_by=last_received,
                )
            except StudyBusy:  # woken since it was chosen (a late instance, a re-run)
                skipped.add(study_uid)
                continue
            except Exception:  # one study that cannot go must not stop every later pass at it
                log.exception("retention: study %s could not be removed", study_uid)
                skipped.add(study_uid)
                continue
            if deleted is not None:
                report.removed[reason] += 1
                report.bytes_freed += deleted.bytes
        report.used_percent_after = self.used_percent()
        report.short = by_disk and report.used_percent_after >= self.settings.disk_low_water_percent
        report.seconds = time.monotonic() - started
        self._record(report)
        return report

    def _record(self, report: PassReport) -> None:
        """One event for a pass that removed something, or whose disk became (or stopped being) too
        full for what it may remove — not one for every pass while that lasts."""
        removed = sum(report.removed.values())
        changed = report.short != self._was_short
        self._was_short = report.short
        if not removed and not changed:
            return
        if report.short:
            log.warning(
                "retention: data disk %.1f%% used and no settled study left to remove (studies whose job "
                "or send failed wait for an admin)",
                report.used_percent_after,
            )
        audit.append(
            self.db,
            "retention.pass",
            outcome="warning" if report.short else "success",
            removed_by_age=report.removed["age"],
            removed_by_disk=report.removed["disk"],
            bytes_freed=report.bytes_freed,
            used_percent_before=round(report.used_percent_before, 2),
            used_percent_after=round(report.used_percent_after, 2),
            seconds=round(report.seconds, 3),
        )
        if removed:
            log.info(
                "retention: %d stud(ies) removed (%d by age, %d by disk), %d bytes freed in %.1f s",
                removed,
                report.removed["age"],
                report.removed["disk"],
                report.bytes_freed,
                report.seconds,
            )
