"""The audit log page and its CSV export: who may read them, the filters, pages, the export audited,
and the chain's verification state as the page shows it."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from node import audit
from node.config import Settings
from node.db import AuditEvent, Database
from node.spool import Spool
from tests.web import client, logged_in


@pytest.fixture
def settings(db: Database, tmp_path: Path) -> Settings:
    made = Settings.model_validate({"node": {"data_dir": str(tmp_path)}})
    audit.configure(db, made)
    return made


@pytest.fixture
def operator(db: Database, tmp_path: Path, settings: Settings) -> TestClient:
    return logged_in(db, Spool(tmp_path), "operator", settings)


def _events(db: Database) -> None:
    audit.append(db, "phi.viewed", actor="user:alice", study_uid="1.2.3", what="study detail")
    audit.append(db, "phi.viewed", actor="user:bob", study_uid="1.2.4", what="study detail")
    audit.append(db, "study.deleted", actor="user:alice", study_uid="1.2.4")
    audit.append(db, "instance.stored", actor="PACS", study_uid="1.2.3", sop_uid="1.2.3.1")


def _rows(html: str) -> list[str]:
    return re.findall(r'<td class="num">(\d+)</td>', html)


def test_operators_and_admins_read_it_viewers_do_not(
    db: Database, tmp_path: Path, settings: Settings
) -> None:
    anonymous = client(db, Spool(tmp_path), settings)
    assert anonymous.get("/audit").status_code == 303
    viewer = logged_in(db, Spool(tmp_path), "viewer", settings)
    assert viewer.get("/audit").status_code == 403
    assert viewer.get("/audit.csv").status_code == 403
    admin = logged_in(db, Spool(tmp_path), "admin", settings)
    assert admin.get("/audit").status_code == 200


def test_filters_by_user_event_study_and_time(db: Database, operator: TestClient) -> None:
    _events(db)
    with db.session() as session:
        by_action = {e.action + e.actor: e.id for e in session.scalars(select(AuditEvent))}
    page = operator.get("/audit", params={"actor": "alice"}).text
    assert set(_rows(page)) >= {
        str(by_action["phi.vieweduser:alice"]),
        str(by_action["study.deleteduser:alice"]),
    }
    assert str(by_action["phi.vieweduser:bob"]) not in _rows(page)

    page = operator.get("/audit", params={"action": "phi.viewed", "study_uid": "1.2.4"}).text
    assert _rows(page) == [str(by_action["phi.vieweduser:bob"])]
    audit.append(db, "phi.viewed", actor="user:carol", what="studies list", studies=["1.2.45", "1.2.4"])
    audit.append(db, "phi.viewed", actor="user:dave", what="studies list", studies=["1.2.45"])
    page = operator.get("/audit", params={"study_uid": "1.2.4"}).text
    assert "user:carol" in page and "user:dave" not in page  # a list that showed it, not a longer UID

    page = operator.get("/audit", params={"action": "user.", "outcome": "success"}).text
    assert all(a in page for a in ("user.login", "user.added"))  # the family: the operator's account
    assert "phi.viewed</td>" not in page

    today = datetime.now(UTC).date()
    assert _rows(operator.get("/audit", params={"until": str(today - timedelta(days=1))}).text) == []
    assert len(_rows(operator.get("/audit", params={"since": str(today)}).text)) >= 4
    minute = datetime.now(UTC) + timedelta(minutes=2)
    assert _rows(operator.get("/audit", params={"since": minute.strftime("%Y-%m-%dT%H:%M")}).text) == []
    refused = operator.get("/audit", params={"since": "yesterday"})
    assert refused.status_code == 200 and "&#39;yesterday&#39; is not a date or time" in refused.text


def test_pages_of_a_hundred_newest_first(db: Database, operator: TestClient) -> None:
    for i in range(130):
        audit.append(db, "instance.stored", actor="PACS", study_uid="1.2.3", i=i)
    first = operator.get("/audit", params={"action": "instance.stored"}).text
    ids = [int(i) for i in _rows(first)]
    assert len(ids) == 100 and ids == sorted(ids, reverse=True)
    assert "130 events, page 1 of 2" in first
    older = re.search(r'href="/audit\?([^"]+)">older', first)
    assert older is not None
    second = operator.get("/audit?" + older.group(1).replace("&amp;", "&")).text
    rest = [int(i) for i in _rows(second)]
    assert len(rest) == 30 and max(rest) < min(ids)
    assert "older →" not in second and "← newer" in second


def test_csv_export_has_the_filtered_events_and_is_itself_audited(db: Database, operator: TestClient) -> None:
    _events(db)
    audit.append(db, "user.login", actor="user:=HYPERLINK(evil)")  # what someone typed as a name
    response = operator.get("/audit.csv", params={"study_uid": "1.2.4"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["action"], r["actor"]) for r in rows] == [
        ("phi.viewed", "user:bob"),
        ("study.deleted", "user:alice"),
        ("audit.exported", "user:operator"),  # this export, recorded first: its filters name the study
    ]
    with db.session() as session:
        stored = {e.id: e for e in session.scalars(select(AuditEvent))}
        exported = session.scalars(select(AuditEvent).where(AuditEvent.action == "audit.exported")).one()
    assert all(stored[int(r["id"])].hash == r["hash"] for r in rows)
    assert exported.actor == "user:operator"
    assert exported.detail == {"filters": {"study_uid": "1.2.4"}, "events": 2}

    everything = list(csv.DictReader(io.StringIO(operator.get("/audit.csv").text)))
    assert "user:=HYPERLINK(evil)" in {r["actor"] for r in everything}  # "user:" first: no formula
    audit.append(db, "x", actor="=1+1")
    formula = [r for r in csv.DictReader(io.StringIO(operator.get("/audit.csv").text)) if r["action"] == "x"]
    assert formula[0]["actor"] == "'=1+1"


def test_the_chain_state_is_shown_and_a_broken_link_named(db: Database, operator: TestClient) -> None:
    _events(db)
    page = operator.get("/audit").text
    with db.session() as session:
        ids = list(session.scalars(select(AuditEvent.id).order_by(AuditEvent.id)))
        marker = session.scalars(select(AuditEvent.id).where(AuditEvent.action == audit.KEYED)).one()
    assert f"Chain verified up to event {ids[-1]}" in page
    assert f"keyed with HMAC-SHA256 from event {marker}" in page
    with db.session() as session:
        session.get_one(AuditEvent, ids[-2]).detail = {"sop_uid": "1.2.3.9"}
    page = operator.get("/audit").text
    assert f"Chain broken at event {ids[-2]}</strong>: its hash is not the HMAC of its content" in page
    assert f"Intact from the start up to event {ids[-3]}" in page
    broken_rows = re.findall(r'<tr class="status-broken"[^>]*>\s*<td class="num">(\d+)', page)
    assert int(broken_rows[-1]) == ids[-2]
