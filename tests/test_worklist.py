"""The Modality Worklist: C-FIND against a real Orthanc's worklist plugin, and ``GET /api/worklist``."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from node.config import Settings
from node.db import AuditEvent, Database
from node.dicom.worklist import WorklistError, WorklistQuery, query
from node.spool import Spool
from tests.peers import OrthancServer, free_port, write_worklist_entry
from tests.test_tls import Pki, tls_section
from tests.test_tls import pki as pki  # noqa: F401 - the fixture, for the TLS test here
from tests.web import client, logged_in, login

TODAY = datetime(2026, 11, 30, 9, 30)
TOMORROW = datetime(2026, 12, 1, 14, 5)
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _settings(port: int, **worklist: object) -> Settings:
    return Settings.model_validate(
        {"worklist": {"host": "127.0.0.1", "port": port, "ae_title": "ORTHANC", **worklist}}
    )


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An Orthanc serving five entries, answering in UTF-8 (ISO_IR 192)."""
    folder = tmp_path_factory.mktemp("worklist")
    entries = folder / "entries"
    write_worklist_entry(
        entries,
        patient_name="DOE^JANE",
        patient_id="P1",
        patient_birth_date="1980-02-29",
        patient_sex="F",
        accession_number="A1",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        study_description="Conjunctiva photograph",
        scheduled=TODAY,
        modality="XC",
    )
    write_worklist_entry(entries, patient_name="DOE^JOHN", patient_id="P2", scheduled=TOMORROW, modality="XC")
    write_worklist_entry(entries, patient_name="ROE^RICHARD", patient_id="P3", scheduled=TODAY, modality="CT")
    write_worklist_entry(
        entries, patient_name="Müller^Jürgen", patient_id="P4", scheduled=TODAY, modality="XC"
    )
    write_worklist_entry(entries, patient_name=JAPANESE, patient_id="P5", scheduled=TOMORROW, modality="CT")
    server = OrthancServer(
        folder / "orthanc",
        worklists=entries,
        options={"DefaultEncoding": "Utf8", "DicomCheckCalledAet": True},
    ).start()
    yield server
    server.stop()


def _ids(settings: Settings, wanted: WorklistQuery) -> list[str]:
    return sorted(entry.patient_id for entry in query(settings, wanted).entries)


def test_query_by_name_date_and_modality(orthanc: OrthancServer) -> None:
    settings = _settings(orthanc.dicom_port)
    assert _ids(settings, WorklistQuery()) == ["P1", "P2", "P3", "P4", "P5"]
    assert _ids(settings, WorklistQuery(patient_name="DOE*")) == ["P1", "P2"]
    assert _ids(settings, WorklistQuery(patient_name="?OE^*")) == ["P1", "P2", "P3"]
    assert _ids(settings, WorklistQuery(scheduled_date=TODAY.date())) == ["P1", "P3", "P4"]
    assert _ids(settings, WorklistQuery(modality="CT")) == ["P3", "P5"]
    assert _ids(settings, WorklistQuery(patient_id="P2", modality="CT")) == []
    [jane] = query(settings, WorklistQuery(patient_id="P1")).entries
    assert (jane.patient_name, jane.patient_birth_date, jane.patient_sex) == (
        "DOE^JANE",
        date(1980, 2, 29),
        "F",
    )
    assert (jane.accession_number, jane.study_uid) == ("A1", "1.2.826.0.1.3680043.8.498.1")
    assert (jane.study_description, jane.scheduled) == ("Conjunctiva photograph", TODAY)
    assert (jane.modality, jane.station_ae) == ("XC", "AINODE")


def test_names_in_other_scripts_come_out_as_unicode(orthanc: OrthancServer) -> None:
    settings = _settings(orthanc.dicom_port)
    [japanese] = query(settings, WorklistQuery(patient_id="P5")).entries
    assert japanese.patient_name == JAPANESE
    [german] = query(settings, WorklistQuery(patient_name="Müller*")).entries  # the query in ISO_IR 192
    assert german.patient_name == "Müller^Jürgen"


def test_iso_2022_japanese_answers_decoded(tmp_path: Path) -> None:
    """An Orthanc whose answers are ISO 2022 IR 87 (JIS X 0208 behind escape sequences)."""
    write_worklist_entry(
        tmp_path / "entries", patient_name=JAPANESE, patient_id="P5", charset=["", "ISO 2022 IR 87"]
    )
    server = OrthancServer(
        tmp_path / "orthanc", worklists=tmp_path / "entries", options={"DefaultEncoding": "JapaneseKanji"}
    ).start()
    try:
        [entry] = query(_settings(server.dicom_port), WorklistQuery(patient_name="Yamada*")).entries
    finally:
        server.stop()
    assert entry.patient_name == JAPANESE


def test_answers_beyond_max_entries_cancelled(orthanc: OrthancServer) -> None:
    answer = query(_settings(orthanc.dicom_port, max_entries=2), WorklistQuery())
    assert len(answer.entries) == 2 and answer.truncated
    answer = query(_settings(orthanc.dicom_port, max_entries=5), WorklistQuery())
    assert len(answer.entries) == 5 and not answer.truncated


def test_beyond_max_entries_the_server_is_told_to_stop() -> None:
    """C-CANCEL reaches the server, which stops: a server with 50 entries that waits, after the third
    answer, for the cancel that max_entries=2 must send. Multi-valued attributes come out joined."""
    cancelled = threading.Event()

    def answers(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        for number in range(50):
            if number == 3:
                for _ in range(200):  # up to 10 s for the C-CANCEL to arrive
                    if event.is_cancelled:
                        cancelled.set()
                        break
                    time.sleep(0.05)
            step = Dataset()
            step.Modality = "XC"
            step.ScheduledStationAETitle = ["AINODE", "SPARE"]
            answer = Dataset()
            answer.PatientID = f"P{number}"
            answer.ScheduledProcedureStepSequence = [step]
            yield 0xFF00, answer
        yield 0x0000, None

    scp = AE(ae_title="ORTHANC")
    scp.add_supported_context(ModalityWorklistInformationFind)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, answers)])
    assert server is not None
    try:
        answer = query(_settings(server.server_address[1], max_entries=2), WorklistQuery())
    finally:
        server.shutdown()
    assert cancelled.is_set() and answer.truncated
    assert [entry.patient_id for entry in answer.entries] == ["P0", "P1"]
    assert answer.entries[0].station_ae == "AINODE\\SPARE" and answer.entries[0].modality == "XC"


def test_failures_are_worklist_errors(orthanc: OrthancServer) -> None:
    with pytest.raises(WorklistError, match="rejected the association"):
        query(_settings(orthanc.dicom_port, ae_title="NOTORTHANC"), WorklistQuery())
    with pytest.raises(WorklistError, match="no association"):
        query(_settings(free_port()), WorklistQuery())
    silent = socket.create_server(("127.0.0.1", 0))  # accepts the connection, never answers
    with silent, pytest.raises(WorklistError, match="no answer within 1 s"):
        query(_settings(silent.getsockname()[1], timeout_seconds=1), WorklistQuery())


def test_a_server_without_the_service_or_failing_says_so_and_is_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that is no worklist, and one that fails the query: each named, the association released."""
    # pynetdicom's setting is the process's: a node listener started by an earlier test accepting every
    # SOP class as storage would make the echo-only peer take the worklist's context too.
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    released = threading.Event()

    def fail(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xC000, None

    scp = AE(ae_title="ORTHANC")
    scp.add_supported_context(Verification)
    scp.add_supported_context(ModalityWorklistInformationFind)
    handlers: list[EventHandlerType] = [
        (evt.EVT_C_FIND, fail),
        (evt.EVT_RELEASED, lambda event: released.set()),
    ]
    failing = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    echo_only = AE(ae_title="ORTHANC")
    echo_only.add_supported_context(Verification)
    no_worklist = echo_only.start_server(("127.0.0.1", 0), block=False)
    assert failing is not None and no_worklist is not None
    try:
        with pytest.raises(WorklistError, match="failure status 0xC000"):
            query(_settings(failing.server_address[1]), WorklistQuery())
        assert released.wait(5)
        with pytest.raises(WorklistError, match="does not offer the Modality Worklist service"):
            query(_settings(no_worklist.server_address[1]), WorklistQuery())
    finally:
        failing.shutdown()
        no_worklist.shutdown()


def test_a_server_that_stalls_mid_answer_is_cut_off_at_the_timeout() -> None:
    """The whole query is bounded, not each answer: a server that answers once, then stalls."""
    release = threading.Event()

    def stall(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, event.identifier
        release.wait(10)
        yield 0x0000, None

    scp = AE(ae_title="ORTHANC")
    scp.add_supported_context(ModalityWorklistInformationFind)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, stall)])
    assert server is not None
    try:
        with pytest.raises(WorklistError, match="no answer within 1 s"):
            query(_settings(server.server_address[1], timeout_seconds=1), WorklistQuery())
    finally:
        release.set()
        server.shutdown()


def test_query_over_dicom_tls(pki: Pki, tmp_path: Path) -> None:
    """A worklist server that speaks TLS only and wants the node's certificate."""
    write_worklist_entry(tmp_path / "entries", patient_name="DOE^JANE", patient_id="P1")
    cert, key = pki.server
    tls_only = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(cert),
        "DicomTlsPrivateKey": str(key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    server = OrthancServer(tmp_path / "orthanc", worklists=tmp_path / "entries", options=tls_only).start()
    try:
        port = server.dicom_port
        settings = Settings.model_validate(
            {"tls": tls_section(pki), "worklist": {"host": "127.0.0.1", "port": port, "ae_title": "ORTHANC"}}
        )
        with pytest.raises(WorklistError):  # plain DICOM to a TLS port
            query(settings, WorklistQuery())
        secure = settings.model_copy(update={"worklist": settings.worklist.model_copy(update={"tls": True})})
        [entry] = query(secure, WorklistQuery(patient_name="DOE*")).entries
    finally:
        server.stop()
    assert entry.patient_id == "P1"


def test_api_answers_operators_and_audits(db: Database, tmp_path: Path, orthanc: OrthancServer) -> None:
    spool = Spool(tmp_path / "spool")
    settings = _settings(orthanc.dicom_port)
    operator = logged_in(db, spool, "operator", settings)
    response = operator.get("/api/worklist", params={"name": "DOE*", "date": "2026-11-30", "modality": "xc"})
    assert response.status_code == 200, response.text
    assert response.json() == [
        {
            "patient_name": "DOE^JANE",
            "patient_id": "P1",
            "patient_birth_date": "1980-02-29",
            "patient_sex": "F",
            "accession_number": "A1",
            "study_uid": "1.2.826.0.1.3680043.8.498.1",
            "study_description": "Conjunctiva photograph",
            "scheduled": "2026-11-30T09:30:00",
            "modality": "XC",
            "station_ae": "AINODE",
        }
    ]
    assert operator.get("/api/worklist", params={"date": "30.11.2026"}).status_code == 422
    assert operator.get("/api/worklist", params={"name": "DOE\\ROE"}).status_code == 422
    assert operator.get("/api/worklist", params={"patient_id": "P*"}).status_code == 422  # an ID is exact
    assert operator.get("/api/worklist", params={"name": "DOE\x00"}).status_code == 422
    with db.session() as session:
        [queried] = session.scalars(select(AuditEvent).where(AuditEvent.action == "worklist.queried")).all()
        assert queried.actor == "user:operator" and queried.outcome == "success"
        assert queried.detail["answers"] == 1 and queried.detail["study_uids"] == [
            "1.2.826.0.1.3680043.8.498.1"
        ]
        assert queried.detail["query"] == {
            "keys": ["patient_name", "scheduled_date", "modality"],
            "scheduled_date": "2026-11-30",
            "modality": "XC",
        }
        assert "DOE" not in json.dumps(queried.detail)  # no event names a patient

    viewer = logged_in(db, spool, "viewer", settings)
    assert viewer.get("/api/worklist").status_code == 403


def test_api_says_why_there_is_no_worklist(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    unconfigured = logged_in(db, spool, "operator", Settings())
    response = unconfigured.get("/api/worklist")
    assert response.status_code == 503 and "no worklist is configured" in response.json()["detail"]

    down = client(db, spool, _settings(free_port()))
    login(down, "operator")
    response = down.get("/api/worklist", params={"patient_id": "P1"})
    assert response.status_code == 502 and "no association" in response.json()["detail"]
    with db.session() as session:
        [failed] = session.scalars(select(AuditEvent).where(AuditEvent.action == "worklist.queried")).all()
        assert failed.outcome == "failure" and failed.detail["query"] == {"keys": ["patient_id"]}
        assert "no association" in failed.detail["error"]
    logged = [record.getMessage() for record in caplog.records if record.name.startswith("node.")]
    assert any("no association" in line for line in logged) and not any("P1" in line for line in logged)
