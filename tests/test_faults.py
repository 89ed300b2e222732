"""Reproduces the faults of issue 11 (hardening: nothing acknowledged is lost, nothing from outside
takes the node down), each fixed and shown not to come back."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from node import route as route_module
from node.config import Route, StudySettings
from node.db import Database, Job, Series, SeriesStatus
from node.route import RouteError, matches, route_ready, validate
from tests.test_study_group import store

pytestmark = pytest.mark.faults

# --- 1. a backtracking route regex froze the node ---------------------------------------------------

BACKTRACKING = {"regex": r"^(\w+\s?)*$"}  # exponential in Python's re on a near-miss
NEAR_MISS = "a" * 40 + "!"  # 41 characters: Python's re takes minutes to give up


def timed_match(value: str, condition: object) -> tuple[bool, float]:
    start = time.perf_counter()
    result = matches(value, condition)
    return result, time.perf_counter() - start


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (NEAR_MISS, False),
        ("a" * 9_999 + "!", False),
        ("Head axial " * 909 + "a", True),  # 10,000 characters that do match
        ("Head 5mm", True),
    ],
    ids=["41-char near miss", "10,000-char near miss", "10,000-char match", "short match"],
)
def test_a_backtracking_regex_is_matched_in_bounded_time(value: str, expected: bool) -> None:
    result, seconds = timed_match(value, BACKTRACKING)
    assert result is expected
    assert seconds < 1.0  # a bound on a hang, not a benchmark


def test_a_pattern_re2_cannot_run_is_refused_at_config_check() -> None:
    backreference = Route(
        name="repeats",
        match={"SeriesDescription": {"regex": r"^(\w+) \1$"}},
        handler="chest_xray",
        model="chest-xray",
    )
    with pytest.raises(RouteError, match=r"routes\.0\.match\.SeriesDescription: bad regex .*backreferences"):
        validate([backreference])


def dx_file(folder: Path, description: str) -> Path:
    """A header-only DX instance, a single-image series of its own, with the given description."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "FAULT-1", "Fault^One"
    ds.Modality, ds.SeriesDescription = "DX", description
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_routing_a_near_miss_series_does_not_stall(db: Database, tmp_path: Path) -> None:
    route = Route(
        name="described",
        match={"SeriesDescription": BACKTRACKING},
        handler="chest_xray",
        model="chest-xray",
    )
    validate([route])
    for description in (NEAR_MISS, "Chest PA"):
        store(db, dx_file(tmp_path, description), StudySettings())
    start = time.perf_counter()
    assert route_ready(db, [route]) == 1
    assert time.perf_counter() - start < 1.0
    with db.session() as session:
        outcome = {
            series.description: (series.status, series.route_note)
            for series in session.scalars(select(Series))
        }
        assert [job.route for job in session.scalars(select(Job))] == ["described"]
    assert outcome == {
        NEAR_MISS: (SeriesStatus.NO_ROUTE, "no route matched"),
        "Chest PA": (SeriesStatus.ROUTED, "described"),
    }


def test_routing_holds_no_lock_a_writer_needs(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However long matching takes, it runs outside every transaction: an instance arriving meanwhile
    is indexed at once (the freeze came from matching under the lock every writer shares)."""
    matching, release = threading.Event(), threading.Event()
    real_choose = route_module.choose

    def slow_choose(routes: Sequence[Route], subject: route_module.Subject) -> list[Route]:
        matching.set()
        release.wait(timeout=30)
        return real_choose(routes, subject)

    monkeypatch.setattr(route_module, "choose", slow_choose)
    route = Route(name="any", match={"Modality": "DX"}, handler="chest_xray", model="chest-xray")
    store(db, dx_file(tmp_path, "Chest PA"), StudySettings())
    routing = threading.Thread(target=route_ready, args=(db, [route]))
    routing.start()
    try:
        assert matching.wait(timeout=10)
        start = time.perf_counter()
        store(db, dx_file(tmp_path, "Chest AP"), StudySettings())
        indexed_in = time.perf_counter() - start
    finally:
        release.set()
        routing.join(timeout=30)
    assert indexed_in < 2.0  # SQLite's busy timeout is far longer: a held lock would show
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Series)) == 2
