"""The running node: the DICOM listener, the periodic steps and the executor, wired together.

Periodic steps run on an APScheduler background scheduler: completion + routing, dispatching jobs to
the executor, sending results. Each is also woken at once when the step before it produced work (a
series became ready, jobs were created, a job ended), so nothing waits for its next tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from node import audit
from node.config import Settings
from node.db import Database, open_database
from node.ingest.accept import Ingest
from node.ingest.completion import mark_stable
from node.ingest.index import Indexer
from node.ingest.scp import Receiver
from node.jobs import ExecutorContext, JobStore, create_executor, dispatch
from node.route import route_ready, validate
from node.send import Sender
from node.spool import Spool

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings) -> None:
        validate(settings.routes)
        self.settings = settings
        self.spool = Spool(settings.node.data_dir)
        self.db: Database = open_database(settings.node.resolved_database_url)
        audit.configure(self.db, settings)  # the chain's key, and the copy sent to syslog
        self.store = JobStore(self.db, settings.jobs)
        self.executor = create_executor(ExecutorContext(settings, self.store, self.spool, self._job_ended))
        self.sender = Sender(settings, self.db)
        self.indexer = Indexer(self.db, settings.study, on_ready=lambda: self._wake("route"))
        self.ingest = Ingest(settings, self.db, self.spool, self.indexer)
        self.receiver = Receiver(settings, self.db, self.ingest)
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.running = False

    def _route_step(self) -> None:
        mark_stable(self.db, self.settings.study)
        if route_ready(self.db, self.settings.routes):
            self._wake("dispatch")

    def _dispatch_step(self) -> None:
        dispatch(self.store, self.executor)

    def _job_ended(self) -> None:
        self._wake("dispatch")
        self._wake("send")

    def _wake(self, step: str) -> None:
        job = self.scheduler.get_job(step) if self.scheduler.running else None
        if job is not None:
            job.modify(next_run_time=datetime.now(self.scheduler.timezone))

    @staticmethod
    def _guarded(step: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                step()
            except Exception:  # a failing step is logged and tried again next tick
                log.exception("%s failed", getattr(step, "__name__", step))

        return run

    def start(self) -> None:
        indexed = self.ingest.reconcile()
        requeued = self.store.requeue_interrupted()
        audit.append(
            self.db,
            "node.started",
            ae_title=self.settings.node.ae_title,
            dicom_port=self.settings.node.dicom_port,
            reindexed=indexed,
            requeued_jobs=requeued,
        )
        for step, name in (
            (self._route_step, "route"),
            (self._dispatch_step, "dispatch"),
            (self.sender.run_due, "send"),
        ):
            self.scheduler.add_job(self._guarded(step), "interval", seconds=1, id=name)
        self.executor.start()
        self.scheduler.start()
        self.indexer.start()
        self.receiver.start()
        self.running = True
        log.info("node started: %d instance(s) re-indexed, %d job(s) re-queued", indexed, requeued)

    def stop(self) -> None:
        self.running = False
        self.receiver.stop()
        self.indexer.stop()
        self.scheduler.shutdown(wait=True)
        self.executor.shutdown()
        audit.append(self.db, "node.stopped")
        audit.close(self.db)
        self.db.dispose()
