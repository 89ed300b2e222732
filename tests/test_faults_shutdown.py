"""Issue 11, fault 8: ``systemctl stop`` (SIGTERM) was a crash — uvicorn re-raised the signal, so the
node's own shutdown never ran (exit -15, no ``node.stopped`` in the audit log)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db import AuditEvent, Database
from tests.peers import NodeProcess

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_sigterm_stops_the_node_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", {}).start()
    process = node.process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, node.log.read_text()[-2000:]
    node.process = None
    db = Database(f"sqlite:///{node.folder / 'var' / 'ainode.db'}")
    try:
        with db.session() as session:
            actions = list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    finally:
        db.dispose()
    assert actions[-1] == "node.stopped"
