"""Arrival → completion → routing → outbox bookkeeping, on SQLite and PostgreSQL."""

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select, update

from node import audit, route
from node.config import Route, Settings, StudySettings
from node.db import (
    AuditEvent,
    Database,
    Instance,
    Job,
    Result,
    Send,
    SendStatus,
    Series,
    SeriesStatus,
    utcnow,
)
from node.ingest.completion import mark_stable
from node.ingest.conflicts import UIDConflict
from node.ingest.index import Arrival, Indexer, index_arrival
from node.ingest.reconcile import Reconciler
from node.route import Subject, route_ready
from node.send import Sender, backoff
from node.spool import Spool

STUDY, SERIES = generate_uid(), generate_uid()


def instance(spool: Spool, modality: str = "CT", series: str = SERIES, sop: str | None = None) -> Arrival:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
    ds.Modality, ds.BodyPartExamined, ds.PatientID, ds.PatientName = modality, "HEAD", "P1", "DOE^JANE"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        CTImageStorage,
        ds.SOPInstanceUID,
    )
    # as the node writes a received instance: who sent it, to which AE title
    ds.file_meta.SendingApplicationEntityTitle, ds.file_meta.ReceivingApplicationEntityTitle = (
        "PACS",
        "AINODE",
    )
    path = spool.instance_path(STUDY, series, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return Arrival(
        STUDY,
        series,
        ds.SOPInstanceUID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        path,
        path.stat().st_size,
        ds,
        "PACS",
        "AINODE",
    )


def store(db: Database, arrival: Arrival, study: StudySettings) -> None:
    with db.session() as session:
        index_arrival(session, arrival, study)


def series_status(db: Database, uid: str = SERIES) -> SeriesStatus:
    with db.session() as session:
        return session.scalars(select(Series.status).where(Series.series_uid == uid)).one()


def age(db: Database, seconds: float) -> None:
    with db.session() as session:
        session.execute(update(Series).values(last_received_at=utcnow() - timedelta(seconds=seconds)))


ROUTES = [
    Route(
        name="head", match={"Modality": "CT"}, handler="ct_hemorrhage", model="ct-hemorrhage", destinations=[]
    )
]


def test_series_completes_after_quiet_period_and_is_routed(db: Database, tmp_path: Path) -> None:
    spool, study = Spool(tmp_path), StudySettings(stable_seconds=10)
    first = instance(spool)
    store(db, first, study)
    store(db, first, study)  # the same instance again: idempotent
    store(db, instance(spool), study)
    assert mark_stable(db, study) == 0
    age(db, 11)
    assert mark_stable(db, study) == 1
    assert route_ready(db, ROUTES) == 1
    with db.session() as session:
        series = session.scalars(select(Series)).one()
        assert (series.status, series.instance_count) == (SeriesStatus.ROUTED, 2)
        assert [i.times_received for i in series.instances] == [2, 1]
        job = session.scalars(select(Job)).one()
        assert (job.route, job.handler, job.model) == ("head", "ct_hemorrhage", "ct-hemorrhage")


def test_single_image_modality_is_ready_at_once(db: Database, tmp_path: Path) -> None:
    spool, study = Spool(tmp_path), StudySettings(stable_seconds=600)
    store(db, instance(spool, modality="DX"), study)
    assert series_status(db) == SeriesStatus.READY


def test_no_route_is_recorded_not_an_error(db: Database, tmp_path: Path) -> None:
    spool, study = Spool(tmp_path), StudySettings(stable_seconds=0)
    store(db, instance(spool, modality="MR"), study)
    mark_stable(db, study)
    assert route_ready(db, ROUTES) == 0
    assert series_status(db) == SeriesStatus.NO_ROUTE
    with db.session() as session:
        assert (
            session.scalar(select(AuditEvent.action).where(AuditEvent.action == "route.none")) == "route.none"
        )


def late_arrival(db: Database, tmp_path: Path, policy: str) -> SeriesStatus:
    spool, study = Spool(tmp_path), StudySettings(stable_seconds=0, late_instances=policy)  # type: ignore[arg-type]
    store(db, instance(spool), study)
    mark_stable(db, study)
    route_ready(db, ROUTES)
    store(db, instance(spool), study)  # after the job was made
    with db.session() as session:
        assert session.scalars(select(Series.late_instances)).one() == 1
    return series_status(db)


def test_late_instance_reruns_the_series(db: Database, tmp_path: Path) -> None:
    assert late_arrival(db, tmp_path, "rerun") == SeriesStatus.RECEIVING
    mark_stable(db, StudySettings(stable_seconds=0))
    assert route_ready(db, ROUTES) == 1
    with db.session() as session:
        assert len(session.scalars(select(Job)).all()) == 2


def test_late_instance_ignored_when_configured(db: Database, tmp_path: Path) -> None:
    assert late_arrival(db, tmp_path, "ignore") == SeriesStatus.ROUTED


def test_reconcile_indexes_files_the_database_lost(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    instance(spool)  # on disk, never indexed (the node died in between)
    damaged = spool.instance_path(STUDY, SERIES, generate_uid())
    (damaged.parent / ".tmp-x.part").write_bytes(b"partial")  # a write the node died in
    damaged.write_bytes(b"not DICOM")  # one damaged file must not stop the node from starting
    reconciler = Reconciler(Settings(), db, spool, Indexer(db, StudySettings(), on_ready=lambda: None))
    assert reconciler.at_start().indexed == 1
    assert reconciler.at_start().indexed == 0
    assert not list(damaged.parent.glob(".tmp-*.part"))
    assert series_status(db) == SeriesStatus.RECEIVING
    with db.session() as session:
        series = session.scalars(select(Series)).one()
        assert series.called_ae == "AINODE"  # routes on it still match
        assert series.calling_ae == "PACS"  # ... and so do routes on who sent it
        assert "instance.unreadable" in session.scalars(select(AuditEvent.action)).all()


def test_backoff_grows_and_is_capped() -> None:
    policy = Settings().send.model_copy(
        update={"first_delay_seconds": 5, "backoff_factor": 2, "max_delay_seconds": 60}
    )
    assert [backoff(policy, n) for n in (1, 2, 3, 4, 5, 6)] == [5, 10, 20, 40, 60, 60]


def test_unreachable_destination_is_retried_then_failed(db: Database, tmp_path: Path) -> None:
    spool, study = Spool(tmp_path), StudySettings(stable_seconds=0)
    arrival = instance(spool)
    store(db, arrival, study)
    mark_stable(db, study)
    route_ready(db, ROUTES)
    settings = Settings.model_validate(
        {
            "destinations": [{"name": "pacs", "ae_title": "NOBODY", "host": "127.0.0.1", "port": 9}],
            "send": {"max_attempts": 2, "first_delay_seconds": 0},
        }
    )
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        result = Result(
            job=job, kind="SR", sop_uid=arrival.sop_uid, sop_class_uid=CTImageStorage, path=str(arrival.path)
        )
        session.add(Send(result=result, destination="pacs"))
    sender = Sender(settings, db)
    assert sender.run_due() == 0
    with db.session() as session:
        send = session.scalars(select(Send)).one()
        assert (send.status, send.attempts) == (SendStatus.PENDING, 1)
        assert "no association" in send.last_error
    sender.run_due()
    with db.session() as session:
        assert session.scalars(select(Send.status)).one() == SendStatus.FAILED
        actions = session.scalars(select(AuditEvent.action)).all()
    assert actions.count("result.send_retry") == 1 and actions.count("result.send_failed") == 1
    assert audit.verify(db) is None


def test_indexer_indexes_every_arrival_across_batches(db: Database, tmp_path: Path) -> None:
    spool, ready = Spool(tmp_path), []
    indexer = Indexer(db, StudySettings(), on_ready=lambda: ready.append(1))
    arrivals = [instance(spool) for _ in range(2 * Indexer.BATCH + 50)]
    for arrival in arrivals:  # queued before the thread starts: full batches, as under load
        indexer.submit(arrival)
    indexer.start()
    indexer.stop()
    with db.session() as session:
        assert set(session.scalars(select(Instance.sop_uid))) == {a.sop_uid for a in arrivals}
        assert session.scalars(select(Series.instance_count)).one() == len(arrivals)


def test_instance_resent_under_another_series_is_not_indexed_and_routing_goes_on(
    db: Database, tmp_path: Path
) -> None:
    spool, study = Spool(tmp_path), StudySettings(stable_seconds=0)
    first = instance(spool)
    store(db, first, study)
    with pytest.raises(UIDConflict, match="sop_elsewhere"):  # issue 11: it emptied the first series
        store(db, instance(spool, series=generate_uid(), sop=first.sop_uid), study)
    mark_stable(db, study)
    assert route_ready(db, ROUTES) == 1
    assert series_status(db) == SeriesStatus.ROUTED


def test_routing_reads_the_header_kept_at_arrival_not_the_file(db: Database, tmp_path: Path) -> None:
    spool, study = Spool(tmp_path), StudySettings(stable_seconds=0)
    arrival = instance(spool)
    store(db, arrival, study)
    arrival.path.unlink()  # routing must not need the file again
    mark_stable(db, study)
    assert route_ready(db, ROUTES) == 1
    assert series_status(db) == SeriesStatus.ROUTED


def test_a_series_reopened_while_it_is_routed_waits_again(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, study = Spool(tmp_path), StudySettings(stable_seconds=0)
    store(db, instance(spool), study)
    mark_stable(db, study)
    matching = route.choose

    def choose_while_an_instance_arrives(routes: Sequence[Route], subject: Subject) -> list[Route]:
        store(db, instance(spool), study)  # the indexer thread may index one meanwhile
        return matching(routes, subject)

    monkeypatch.setattr(route, "choose", choose_while_an_instance_arrives)
    assert route_ready(db, ROUTES) == 0
    assert series_status(db) == SeriesStatus.RECEIVING
    with db.session() as session:
        assert session.scalars(select(Job)).all() == []


def test_a_spool_file_from_before_ae_titles_were_kept_routes_on_the_nodes_own(
    db: Database, tmp_path: Path
) -> None:
    spool = Spool(tmp_path)
    older = instance(spool)
    header = dcmread(older.path)
    del header.file_meta.SendingApplicationEntityTitle, header.file_meta.ReceivingApplicationEntityTitle
    header.save_as(older.path, enforce_file_format=True)
    settings = Settings.model_validate({"node": {"ae_title": "AINODE"}})
    indexer = Indexer(db, StudySettings(), on_ready=lambda: None)
    assert Reconciler(settings, db, spool, indexer).at_start().indexed == 1
    with db.session() as session:
        assert session.scalars(select(Series.called_ae)).one() == "AINODE"
