"""The audit chain: intact under concurrent writers, keyed with a file the database does not hold,
and every kind of tampering named by its first broken link."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from node import audit
from node.config import Settings, load_settings
from node.db import AuditEvent, Database, open_database
from tests.peers import REPO


def test_chain_is_intact_and_detects_tampering(db: Database) -> None:
    for i in range(5):
        audit.append(db, "instance.stored", actor="PACS", study_uid="1.2.3", sop_uid=f"1.2.3.{i}", bytes=i)
    assert audit.verify(db) is None
    with db.session() as session:
        ids = session.scalars(select(AuditEvent.id).order_by(AuditEvent.id)).all()
        session.execute(update(AuditEvent).where(AuditEvent.id == ids[2]).values(actor="SOMEONE ELSE"))
    broken = audit.verify(db)
    assert broken is not None and broken.event_id == ids[2] and "edited" in broken.problem


def test_deleted_event_breaks_the_chain(db: Database) -> None:
    for i in range(3):
        audit.append(db, "job.started", job=i)
    with db.session() as session:
        ids = session.scalars(select(AuditEvent.id).order_by(AuditEvent.id)).all()
        session.delete(session.get_one(AuditEvent, ids[1]))
    broken = audit.verify(db)
    assert broken is not None and broken.event_id == ids[2] and f"event {ids[0]}'s hash" in broken.problem


def test_concurrent_writers_keep_one_chain(db: Database) -> None:
    def write(n: int) -> None:
        for i in range(10):
            audit.append(db, "x", n=n, i=i)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
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


def _settings(data_dir: Path, **audit_settings: Any) -> Settings:
    return Settings.model_validate({"node": {"data_dir": str(data_dir)}, "audit": audit_settings})


def _ids(db: Database) -> list[int]:
    with db.session() as session:
        return list(session.scalars(select(AuditEvent.id).order_by(AuditEvent.id)))


def _keyed_chain(db: Database, data_dir: Path, events: int = 5) -> bytes:
    key = audit.configure(db, _settings(data_dir))
    for i in range(events):
        audit.append(db, "phi.viewed", actor="user:alice", study_uid="1.2.3", what="study detail", i=i)
    return key


def _rehash_from(db: Database, first: int) -> None:
    """What someone who can write the database but not read the key file can do: re-chain every
    event from ``first`` on with SHA-256, the algorithm being public."""
    with db.session() as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        prev = audit.GENESIS
        for row in rows:
            if row.id >= first:
                row.prev_hash = prev
                row.hash = audit._digest(prev, row, None)
            prev = row.hash


def test_the_key_is_made_once_owner_only_and_marks_where_keying_starts(db: Database, tmp_path: Path) -> None:
    audit.append(db, "before.the.key")  # a chain begun before the node had a key
    key = _keyed_chain(db, tmp_path, events=2)
    path = tmp_path / "audit.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert audit.read_key(path) == key
    assert audit.configure(db, _settings(tmp_path)) == key  # read, not replaced
    with db.session() as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert actions == ["before.the.key", audit.KEYED, "phi.viewed", "phi.viewed"]
    state = audit.check(db)
    ids = _ids(db)
    assert state.broken is None and state.keyed_from == ids[1] and state.intact_to == ids[-1]
    assert state.events == 4


def _edit(db: Database, event_id: int) -> None:
    with db.session() as session:
        row = session.get_one(AuditEvent, event_id)
        row.detail = {**row.detail, "what": "nothing to see"}


def _delete(db: Database, event_id: int) -> None:
    with db.session() as session:
        session.delete(session.get_one(AuditEvent, event_id))


def _forge(db: Database, event_id: int) -> None:
    _edit(db, event_id)
    _rehash_from(db, event_id)


@pytest.mark.parametrize(
    ("tamper", "broken_at", "named"),
    [
        (_edit, 0, "the event was edited"),
        (_delete, 1, "events before it were deleted"),
        (_forge, 0, "re-hashed with plain SHA-256 instead of the key's HMAC: forged without the key"),
    ],
    ids=["edit", "delete", "forge"],
)
def test_tampering_is_named_at_its_first_broken_link(
    db: Database, tmp_path: Path, tamper: Callable[[Database, int], None], broken_at: int, named: str
) -> None:
    _keyed_chain(db, tmp_path)
    ids = _ids(db)
    assert audit.verify(db) is None
    tamper(db, ids[3])
    state = audit.check(db)
    assert state.broken is not None and state.broken.event_id == ids[3 + broken_at]
    assert named in state.broken.problem
    assert state.intact_to == ids[2]


def test_a_chain_rewritten_from_its_start_without_the_key_is_refused(db: Database, tmp_path: Path) -> None:
    key = _keyed_chain(db, tmp_path)
    with db.session() as session:  # drop the marker, re-hash everything as an unkeyed chain
        session.delete(session.get_one(AuditEvent, _ids(db)[0]))
    _rehash_from(db, 0)
    broken = audit.verify(db, key)
    assert broken is not None and "no event is keyed" in broken.problem


def _without_the_key(url: str) -> tuple[str, str]:
    """In a process that was not given the key: what verifying says, and what appending raises."""
    db = Database(url)
    try:
        broken = audit.verify(db)
        try:
            audit.append(db, "sneaked.in")
        except audit.AuditKeyError as exc:
            return broken.problem if broken else "", str(exc)
        return broken.problem if broken else "", ""
    finally:
        db.dispose()


def test_keyed_events_need_the_key_and_the_right_one(db: Database, tmp_path: Path) -> None:
    _keyed_chain(db, tmp_path)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as other:
        problem, refusal = other.submit(_without_the_key, db.url).result(timeout=120)
    assert "key file is needed" in problem
    assert "no audit key" in refusal
    other_key = tmp_path / "other" / "audit.key"
    other_key.parent.mkdir()
    other_key.write_text("ab" * 32)
    with pytest.raises(audit.AuditKeyError, match="others than its owner may read it"):
        audit.configure(db, _settings(tmp_path, key_file=str(other_key)))
    other_key.chmod(0o600)
    with pytest.raises(audit.AuditKeyError, match="not the key the chain was keyed with"):
        audit.configure(db, _settings(tmp_path, key_file=str(other_key)))
    broken = audit.verify(db, bytes.fromhex("ab" * 32))
    assert broken is not None and broken.event_id == _ids(db)[0] and "another key" in broken.problem
    (tmp_path / "audit.key").unlink()
    with pytest.raises(audit.AuditKeyError, match="restore the key file"):
        audit.configure(db, _settings(tmp_path))
    assert not (tmp_path / "audit.key").exists()  # no new key that would hide the old chain
    assert audit.verify(db) is None  # nothing was appended meanwhile


def _ainode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_audit_verify_names_the_first_broken_link(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[node]\ndata_dir = "var"\n')
    settings = load_settings(config)
    db = open_database(settings.node.resolved_database_url)
    try:
        audit.append(db, "before.the.key")
        run = _ainode("audit", "verify", "--config", str(config))
        assert run.returncode == 0 and "1 events, none keyed" in run.stdout, run.stdout + run.stderr
        audit.configure(db, settings)
        assert (tmp_path / "var" / "audit.key").exists()  # relative to the settings file's folder
        for i in range(3):
            audit.append(db, "phi.viewed", actor="user:alice", study_uid="1.2.3", i=i)
        ids = _ids(db)
        for name in (["audit", "verify"], ["audit-verify"]):
            run = _ainode(*name, "--config", str(config))
            assert run.returncode == 0, run.stdout + run.stderr
            assert f"intact: 5 events, keyed (HMAC-SHA256) from event {ids[1]}" in run.stdout
        _forge(db, ids[3])
        run = _ainode("audit", "verify", "--config", str(config))
        assert run.returncode == 1
        assert run.stdout.splitlines() == [
            f"audit chain broken at event {ids[3]}: re-hashed with plain SHA-256 instead of the key's HMAC: "
            "forged without the key",
            f"intact from the start up to event {ids[2]} (3 events)",
        ]
    finally:
        db.dispose()
