"""The running node: the DICOM listener, the periodic steps and the executor, wired together.

Periodic steps run on an APScheduler background scheduler: completion + routing, dispatching jobs to
the executor, sending results. Each is also woken at once when the step before it produced work (a
series became ready, jobs were created, a job ended), so nothing waits for its next tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from node import audit
from node.config import Settings
from node.db import Database, open_database
from node.ingest.accept import Ingest
from node.ingest.completion import mark_stable
from node.ingest.index import DATABASE_UNAVAILABLE, Indexer
from node.ingest.receivers import Receivers
from node.ingest.reconcile import Reconciler
from node.ingest.scp import Receiver
from node.ingest.upload import remove_leftovers
from node.jobs import ExecutorContext, JobStore, create_executor, dispatch, watch
from node.retention import Retention
from node.route import route_ready, validate
from node.send import Sender
from node.spool import Spool

log = logging.getLogger(__name__)

OUTAGE_LOG_SECONDS = 60.0  # a step says the database is away at most this often


class Node:
    def __init__(self, settings: Settings) -> None:
        validate(settings.routes)
        self.settings = settings
        self.spool = Spool(settings.node.data_dir)
        self.db: Database = open_database(settings.node.resolved_database_url)
        audit.configure(self.db, settings)  # the chain's key, and the copy sent to syslog
        self.store = JobStore(self.db, settings.jobs)
        self.executor = create_executor(ExecutorContext(settings, self.store, self.spool, self.job_ended))
        self.sender = Sender(settings, self.db)
        self.retention = Retention(settings.retention, self.db, self.spool)
        self.indexer = Indexer(self.db, settings.study, on_ready=lambda: self._wake("route"))
        self.ingest = Ingest(settings, self.db, self.spool, self.indexer)
        self.reconciler = Reconciler(settings, self.db, self.spool, self.indexer)
        self.receiver: Receiver | Receivers = (
            Receiver(settings, self.db, self.ingest, self.indexer.complete)
            if settings.node.receivers == 1
            else Receivers(settings, self.db, self.spool, self.indexer)
        )
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.running = False
        self._database_warned: dict[str, float] = {}  # step → when it last said the database is away

    def _route_step(self) -> None:
        mark_stable(self.db, self.settings.study, self.indexer.unindexed())
        if route_ready(self.db, self.settings.routes):
            self._wake("dispatch")

    def _dispatch_step(self) -> None:
        dispatch(self.store, self.executor)

    def _reconcile_step(self) -> None:
        self.reconciler.periodic()

    def _watchdog_step(self) -> None:
        if watch(self.store, self.executor):
            self._wake("dispatch")

    def job_ended(self) -> None:
        """A job's outcome was recorded (by the executor, or by a distributed worker through the HTTP
        app's internal endpoints): dispatch the next job and send the results now."""
        self._wake("dispatch")
        self._wake("send")

    def _wake(self, step: str) -> None:
        job = self.scheduler.get_job(step) if self.scheduler.running else None
        if job is not None:
            job.modify(next_run_time=datetime.now(self.scheduler.timezone))

    def _guarded(self, step: Callable[[], object]) -> Callable[[], None]:
        """``step`` as a scheduler job: a failure is logged and the step tried again next tick. While
        the database is away every step fails each second; that is said in one line per step a minute
        (the indexer audits the outage once it is over), not a trace a second."""
        name = getattr(step, "__name__", str(step))

        def run() -> None:
            try:
                step()
            except DATABASE_UNAVAILABLE as exc:
                now = time.monotonic()
                if now - self._database_warned.get(name, -OUTAGE_LOG_SECONDS) >= OUTAGE_LOG_SECONDS:
                    self._database_warned[name] = now
                    log.warning("%s: database unavailable (%s); trying again", name, type(exc).__name__)
            except Exception:
                log.exception("%s failed", name)

        return run

    def start(self) -> None:
        remove_leftovers(self.spool)
        reconciled = self.reconciler.at_start()
        # Jobs the last run left running: the local pool's died with it; a distributed executor's run
        # on at the broker and its workers, and the watchdog catches the one nobody runs any more.
        outlive = getattr(self.executor, "jobs_outlive_the_node", False)
        requeued = 0 if outlive else self.store.requeue_interrupted()
        audit.append(
            self.db,
            "node.started",
            ae_title=self.settings.node.ae_title,
            dicom_port=self.settings.node.dicom_port,
            reindexed=reconciled.indexed,
            reconciled_folders=reconciled.folders,
            requeued_jobs=requeued,
        )
        for step, name in (
            (self._route_step, "route"),
            (self._dispatch_step, "dispatch"),
            (self.sender.run_due, "send"),
        ):
            self.scheduler.add_job(self._guarded(step), "interval", seconds=1, id=name)
        # Overdue means past a limit of minutes plus a grace of a minute: a check every 5 s is enough.
        self.scheduler.add_job(self._guarded(self._watchdog_step), "interval", seconds=5, id="watchdog")
        self.scheduler.add_job(
            self._guarded(self.retention.run_pass),
            "interval",
            seconds=self.settings.retention.interval_seconds,
            id="retention",
            next_run_time=datetime.now(self.scheduler.timezone),  # a full disk is seen at start, not later
        )
        # Instances in the spool the index missed (the indexer was full): the pass costs what changed.
        self.scheduler.add_job(
            self._guarded(self._reconcile_step),
            "interval",
            seconds=self.settings.node.reconcile_seconds,
            id="reconcile",
        )
        self.executor.start()
        self.scheduler.start()
        self.indexer.start()
        self.receiver.start()
        self.running = True
        log.info("node started: %d instance(s) re-indexed, %d job(s) re-queued", reconciled.indexed, requeued)

    def stop(self) -> None:
        self.running = False
        self.receiver.stop()
        self.indexer.stop()
        self.retention.stop()  # a long pass ends after its current study
        self.scheduler.shutdown(wait=True)
        self.executor.shutdown()
        audit.append(self.db, "node.stopped")
        audit.close(self.db)
        self.db.dispose()
