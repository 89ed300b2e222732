"""The running node: the DICOM listener, the periodic steps and the job slots, wired together.

Periodic steps run on an APScheduler background scheduler; each is also woken at once when the
step before it produced work (a series became ready, a job wrote results), so nothing waits for
its next tick.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from node import audit
from node.config import Settings
from node.db import Database, open_database
from node.index import Indexer, reconcile
from node.jobs import Executor, requeue_interrupted
from node.receive import Receiver
from node.route import route_ready, validate
from node.send import Sender
from node.spool import Spool
from node.stability import mark_stable

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings) -> None:
        validate(settings.routes)
        self.settings = settings
        self.spool = Spool(settings.node.data_dir)
        self.db: Database = open_database(settings.node.resolved_database_url)
        self.sender = Sender(settings, self.db)
        self.executor = Executor(settings, self.db, self.spool, on_results=lambda: self._wake("send"))
        self.indexer = Indexer(self.db, settings.study, on_ready=lambda: self._wake("route"))
        self.receiver = Receiver(settings, self.db, self.spool, self.indexer)
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.running = False

    def _route_step(self) -> None:
        mark_stable(self.db, self.settings.study)
        if route_ready(self.db, self.settings.routes):
            self.executor.wake()

    def _wake(self, step: str) -> None:
        job = self.scheduler.get_job(step)
        if job is not None:
            job.modify(next_run_time=datetime.now(self.scheduler.timezone))

    def _guarded(self, step: Any) -> Any:
        def run() -> None:
            try:
                step()
            except Exception:  # a failing step is logged and tried again next tick
                log.exception("%s failed", getattr(step, "__name__", step))

        return run

    def start(self) -> None:
        indexed = reconcile(self.db, self.spool, self.settings.study, self.settings.node.ae_title)
        requeued = requeue_interrupted(self.db)
        audit.append(
            self.db,
            "node.started",
            ae_title=self.settings.node.ae_title,
            dicom_port=self.settings.node.dicom_port,
            reindexed=indexed,
            requeued_jobs=requeued,
        )
        self.scheduler.add_job(self._guarded(self._route_step), "interval", seconds=1, id="route")
        self.scheduler.add_job(self._guarded(self.sender.run_due), "interval", seconds=1, id="send")
        self.scheduler.start()
        self.executor.start()
        self.indexer.start()
        self.receiver.start()
        self.running = True
        log.info("node started: %d instance(s) re-indexed, %d job(s) re-queued", indexed, requeued)

    def stop(self) -> None:
        self.running = False
        self.receiver.stop()
        self.indexer.stop()
        self.scheduler.shutdown(wait=True)
        self.executor.stop()
        audit.append(self.db, "node.stopped")
        self.db.dispose()
