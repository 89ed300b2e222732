"""A series or study declared complete by what the network says, not the quiet period (issue 12): a
forwarder's association released (Indexer.complete), a study-complete notification (the API), a count
its instances announce. ``stable_seconds`` is 600 throughout: only those rules can make a series ready
within a test."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from node import accounts
from node.config import Settings, StudySettings
from node.db import AuditEvent, Database, Series, SeriesStatus, Study, open_database
from node.ingest import completion
from node.ingest.completion import COUNTED, announcement
from node.ingest.index import Arrival, Indexer, index_arrivals
from node.spool import Spool
from node.web.app import create_app
from tests.peers import wait_for
from tests.test_faults_database import PostgresCluster
from tests.test_flow import STUDY, instance, series_status

QUIET = StudySettings(stable_seconds=600)
TEMPORAL = "100 ImagesInAcquisition, acquisition -"  # 20 images at each of 5 temporal positions
RELEASED = "association from ORTHANC released"


def events(db: Database, action: str) -> list[AuditEvent]:
    with db.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def study_stable(db: Database) -> bool:
    with db.session() as session:
        return session.scalar(select(Study.stable_at).where(Study.study_uid == STUDY)) is not None


def run_indexer(db: Database, work: list[Arrival | tuple[str, ...]]) -> int:
    """Submit arrivals and declarations (("series", uid) or ("study", uid)) in order, all before the
    indexer starts, then index them. Returns how often routing was woken."""
    woken: list[int] = []
    indexer = Indexer(db, QUIET, on_ready=lambda: woken.append(1))
    for item in work:
        if isinstance(item, Arrival):
            indexer.submit(item)
        elif item[0] == "series":
            indexer.complete([(STUDY, item[1])], RELEASED)
        else:
            indexer.complete_study(item[1], "study-complete notification from token:orthanc")
    indexer.start()
    indexer.stop()
    return len(woken)


def test_a_declaration_readies_the_series_with_every_arrival_before_it(db: Database, tmp_path: Path) -> None:
    spool, series = Spool(tmp_path), generate_uid()
    arrivals = [instance(spool, series=series) for _ in range(3)]
    assert run_indexer(db, [*arrivals, ("series", series)]) == 1
    assert series_status(db, series) == SeriesStatus.READY
    [ready] = events(db, "series.ready")
    assert ready.detail["reason"] == RELEASED and ready.detail["instances"] == 3
    assert not study_stable(db)  # a forwarder may send the study's next series in another association


def test_without_a_declaration_the_series_waits_for_the_quiet_period(db: Database, tmp_path: Path) -> None:
    spool, series = Spool(tmp_path), generate_uid()
    run_indexer(db, [instance(spool, series=series) for _ in range(3)])
    assert series_status(db, series) == SeriesStatus.RECEIVING and not study_stable(db)


def test_an_arrival_after_the_declaration_reopens_the_series(db: Database, tmp_path: Path) -> None:
    spool, series = Spool(tmp_path), generate_uid()
    run_indexer(db, [instance(spool, series=series), ("series", series), instance(spool, series=series)])
    assert series_status(db, series) == SeriesStatus.RECEIVING and not study_stable(db)


def test_a_routed_series_is_not_run_again_by_a_declaration_alone(db: Database, tmp_path: Path) -> None:
    spool, series = Spool(tmp_path), generate_uid()
    index_arrivals(db, [instance(spool, series=series)], QUIET)
    with db.session() as session:
        session.execute(update(Series).values(status=SeriesStatus.ROUTED))
    run_indexer(db, [("series", series)])
    assert series_status(db, series) == SeriesStatus.ROUTED and events(db, "series.ready") == []


def test_series_declarations_leave_the_study_to_its_quiet_period_or_notification(
    db: Database, tmp_path: Path
) -> None:
    """Orthanc's autoroute.lua forwards each series in an association of its own: the first eye's release
    must not make a fundus visit's study stable before the second eye comes."""
    spool, first, second = Spool(tmp_path), generate_uid(), generate_uid()
    run_indexer(db, [instance(spool, series=first), instance(spool, series=second), ("series", first)])
    assert series_status(db, first) == SeriesStatus.READY and not study_stable(db)
    run_indexer(db, [("series", second)])
    assert series_status(db, second) == SeriesStatus.READY and not study_stable(db)
    run_indexer(db, [("study", STUDY)])
    assert study_stable(db)


def test_a_study_notification_readies_every_series_of_the_study(db: Database, tmp_path: Path) -> None:
    spool, first, second = Spool(tmp_path), generate_uid(), generate_uid()
    run_indexer(db, [instance(spool, series=first), instance(spool, series=second), ("study", STUDY)])
    assert series_status(db, first) == series_status(db, second) == SeriesStatus.READY
    assert study_stable(db)
    reasons = {event.detail["reason"] for event in events(db, "series.ready")}
    assert reasons == {"study-complete notification from token:orthanc"}


def test_a_declaration_waits_for_arrivals_held_while_the_database_is_down(tmp_path: Path) -> None:
    cluster = PostgresCluster()
    cluster.start()
    try:
        db, spool, series = open_database(cluster.url), Spool(tmp_path), generate_uid()
        indexer = Indexer(db, QUIET, on_ready=lambda: None)
        indexer.start()
        cluster.stop()
        for _ in range(2):
            indexer.submit(instance(spool, series=series))
        indexer.complete([(STUDY, series)], RELEASED)  # released while its instances wait unindexed
        assert len(indexer.unindexed().paths) == 2
        cluster.start()
        wait_for(lambda: events(db, "series.ready"), 60, "the series ready")
        indexer.stop()
        assert series_status(db, series) == SeriesStatus.READY
        assert [event.detail["instances"] for event in events(db, "series.ready")] == [2]
        db.dispose()
    finally:
        cluster.remove()


def announcing(spool: Spool, series: str, count: int, acquisition: int = 1) -> Arrival:
    arrival = instance(spool, series=series)
    arrival.header.ImagesInAcquisition, arrival.header.AcquisitionNumber = count, acquisition
    return arrival


def test_a_series_is_ready_once_as_many_instances_as_announced_are_indexed(
    db: Database, tmp_path: Path
) -> None:
    spool, series = Spool(tmp_path), generate_uid()
    first = announcing(spool, series, 3)
    index_arrivals(db, [first, first, announcing(spool, series, 3)], QUIET)  # a duplicate counts once
    assert series_status(db, series) == SeriesStatus.RECEIVING
    assert index_arrivals(db, [announcing(spool, series, 3)], QUIET) is True
    assert series_status(db, series) == SeriesStatus.READY
    [ready] = events(db, "series.ready")
    assert ready.detail["reason"] == COUNTED and ready.detail["instances"] == 3


def test_more_instances_than_announced_are_late_and_void_the_count(db: Database, tmp_path: Path) -> None:
    spool, series = Spool(tmp_path), generate_uid()
    index_arrivals(db, [announcing(spool, series, 2) for _ in range(2)], QUIET)
    with db.session() as session:
        session.execute(update(Series).values(status=SeriesStatus.ROUTED))
    index_arrivals(db, [announcing(spool, series, 2)], QUIET)
    with db.session() as session:
        row = session.scalars(select(Series)).one()
        # late: run again (study.late_instances = "rerun"), after the quiet period, the count void
        assert (row.status, row.late_instances, row.announced) == (SeriesStatus.RECEIVING, 1, "")


def test_instances_announcing_another_count_void_it(db: Database, tmp_path: Path) -> None:
    spool, series = Spool(tmp_path), generate_uid()
    index_arrivals(db, [announcing(spool, series, 2), announcing(spool, series, 2, acquisition=2)], QUIET)
    assert series_status(db, series) == SeriesStatus.RECEIVING  # two acquisitions: 2 is not the series'
    index_arrivals(db, [announcing(spool, series, 2)], QUIET)
    assert series_status(db, series) == SeriesStatus.RECEIVING


def header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"ImagesInAcquisition": 30, "AcquisitionNumber": 2}, "30 ImagesInAcquisition, acquisition 2"),
        (
            {"ImagesInAcquisition": 20, "NumberOfTemporalPositions": 5},
            "100 ImagesInAcquisition, acquisition -",
        ),
        ({"NumberOfSlices": 47, "NumberOfTimeSlices": 3}, "141 NumberOfSlices x NumberOfTimeSlices"),
        ({"NumberOfSlices": 47}, ""),  # a gated PET series repeats its slices: unknown how often
        ({"CardiacNumberOfImages": 25}, ""),  # per slice location: a series may hold several
        ({"NumberOfFrames": 40}, ""),  # frames of one instance, not instances of the series
        ({"ImagesInAcquisition": "0"}, ""),
    ],
)
def test_which_counts_are_trusted(values: dict[str, object], expected: str) -> None:
    assert announcement(header(**values)) == expected


def test_the_study_complete_notification_needs_an_operator_and_is_audited(
    db: Database, tmp_path: Path
) -> None:
    told: list[tuple[str, str]] = []
    app = create_app(db, Spool(tmp_path), Settings(), complete_study=lambda *call: told.append(call))
    client = TestClient(app)
    path = f"/api/studies/{STUDY}/complete"
    assert client.post(path).status_code == 401
    viewer = accounts.create_token(db, "dashboard", "viewer", actor="test")
    assert client.post(path, headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
    operator = {"Authorization": f"Bearer {accounts.create_token(db, 'orthanc', 'operator', actor='test')}"}
    assert client.post("/api/studies/not-a-uid/complete", headers=operator).status_code == 422
    assert told == [] and events(db, "study.complete_notified") == []
    response = client.post(path, headers=operator)
    assert response.status_code == 202, response.text
    assert told == [(STUDY, "study-complete notification from token:orthanc")]
    [notified] = events(db, "study.complete_notified")
    assert notified.actor == "token:orthanc" and notified.study_uid == STUDY


def test_a_declaration_that_fails_does_not_hold_up_indexing(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> int:
        raise ValueError("a bug in a rule")

    monkeypatch.setattr(completion, "declare_complete", broken)
    spool, series = Spool(tmp_path), generate_uid()
    run_indexer(db, [instance(spool, series=series), ("series", series), instance(spool, series=series)])
    with db.session() as session:
        assert session.scalars(select(Series.instance_count)).one() == 2  # indexed on, behind it
    assert series_status(db, series) == SeriesStatus.RECEIVING  # the quiet period will do
