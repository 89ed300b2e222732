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
    import threading

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
