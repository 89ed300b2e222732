import multiprocessing
import threading
import time

import pytest
from sqlalchemy import select, update

from node import audit
from node.db import AuditEvent, Database


def test_chain_is_intact_and_detects_tampering(db: Database) -> None:
    for i in range(5):
        audit.append(db, "instance.stored", actor="PACS", study_uid="1.2.3", sop_uid=f"1.2.3.{i}", bytes=i)
    assert audit.verify(db) is None
    with db.session() as session:
        ids = session.scalars(select(AuditEvent.id).order_by(AuditEvent.id)).all()
        session.execute(update(AuditEvent).where(AuditEvent.id == ids[2]).values(actor="SOMEONE ELSE"))
    assert audit.verify(db) == ids[2]


def test_deleted_event_breaks_the_chain(db: Database) -> None:
    for i in range(3):
        audit.append(db, "job.started", job=i)
    with db.session() as session:
        ids = session.scalars(select(AuditEvent.id).order_by(AuditEvent.id)).all()
        session.delete(session.get_one(AuditEvent, ids[1]))
    assert audit.verify(db) == ids[2]


def test_concurrent_writers_keep_one_chain(db: Database) -> None:
    threads = [
        threading.Thread(target=lambda n=n: [audit.append(db, "x", n=n, i=i) for i in range(10)])
        for n in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.verify(db) is None
    with db.session() as session:
        assert len(session.scalars(select(AuditEvent)).all()) == 40


def _append_from_another_process(url: str, writer: int) -> None:
    db = Database(url)
    for i in range(10):
        audit.append(db, "x", writer=writer, i=i)
    db.dispose()


def test_writers_in_several_processes_keep_one_chain(db: Database) -> None:
    """The appender is serialised by the database, not by a lock of one process: receivers and
    workers in other processes may append at the same time."""
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_from_another_process, args=(db.url, n)) for n in range(3)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert audit.verify(db) is None
    with db.session() as session:
        assert len(session.scalars(select(AuditEvent)).all()) == 30


def test_an_open_transaction_holds_up_no_other_writer(db: Database) -> None:
    """Work done inside a transaction (reading files, matching rules) never waits on the audit log,
    nor makes others wait: the chain is only serialised while a transaction commits."""
    recorded, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with db.session() as session:
            audit.record(session, "slow", step=1)
            recorded.set()
            release.wait(30)  # slow work, inside the transaction

    thread = threading.Thread(target=slow_writer)
    thread.start()
    assert recorded.wait(30)
    started = time.monotonic()
    audit.append(db, "quick")
    assert time.monotonic() - started < 5  # not held up by the open transaction
    release.set()
    thread.join(30)
    assert audit.verify(db) is None
    with db.session() as session:
        assert session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all() == ["quick", "slow"]


def test_a_transaction_that_rolls_back_appends_nothing(db: Database) -> None:
    with pytest.raises(RuntimeError), db.session() as session:
        audit.record(session, "never")
        raise RuntimeError("the change failed")
    audit.append(db, "after")
    with db.session() as session:
        assert session.scalars(select(AuditEvent.action)).all() == ["after"]
    assert audit.verify(db) is None
