"""Results keep the source's patient and study identity in the source's character set, byte for byte
and under the source's exact Specific Character Set, whatever the set: offline (``ainode infer``) and
through a real Orthanc (stored, forwarded to the node, the results filed back into the same study).

The patients' names are real-world encodings, taken from pydicom's character set test files (ISO 2022
escapes per name component, a switch back to ASCII at the end, empty trailing groups): re-encoding
them, as pydicom or highdicom would, gives other bytes, so only a copy passes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import tomli_w
from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.data import get_charset_files
from pydicom.dataelem import DataElement
from pydicom.valuerep import PersonName

from node.outputs.charset import IDENTITY
from tests.peers import REPO, NodeProcess, OrthancServer, dciodvfy_errors, free_port, storescu, wait_for
from tests.test_end_to_end import node_settings, results_in
from training.chest_phantom import chest_dicom, sample
from training.ct_phantom import head_ct_series

pytestmark = pytest.mark.slow

CHEST_TASK = "Pediatric chest X-ray findings"
REPORT = "Befund für 환자: {task}"  # the report's series description, as a site may configure it
CHEST_ROUTE: dict[str, Any] = {
    "name": "chest",
    "match": {"Modality": "DX", "BodyPartExamined": "CHEST"},
    "handler": "chest_xray",
    "model": "chest-xray",
    "options": {"max_explanations": 1},
    "outputs": ["sc", {"writer": "sr", "series_description": REPORT}],
}


def real_name(file: str) -> bytes:
    """Patient's Name as bytes, as the modality that made pydicom's test file ``file`` wrote it."""
    (path,) = [p for p in get_charset_files() if Path(p).name == file]
    return bytes(pydicom.dcmread(path).get_item("PatientName").value)


@dataclass(frozen=True)
class Case:
    name: str
    charset: str | list[str] | None  # None: absent, the default repertoire
    patient_name: bytes
    study_description: bytes
    report: str = ""  # the report's series description as written: what the set lacks, transliterated
    orthanc_decodes: bool = True  # Orthanc 1.10 misreads some sets, in the source as in the results
    referring_physician: bytes = b""
    institution: bytes = b""  # not identity: the acquisition's equipment, which results name too
    issuer: bytes = b""  # Issuer of Patient ID, at the top and in an Other Patient IDs item


def described(text: str) -> str:
    return f"{text}: {CHEST_TASK}"


CASES = [
    Case(
        "korean",
        ["", "ISO 2022 IR 149"],
        real_name("chrI2.dcm"),
        "\x1b$)C흉부 촬영\x1b(B".encode("euc_kr"),
        described("Befund fur 환자"),
    ),
    Case(
        "korean-ir6",
        ["ISO 2022 IR 6", "ISO 2022 IR 149"],
        real_name("chrKoreanMulti.dcm"),
        "\x1b$)C흉부 X선".encode("euc_kr"),
        described("Befund fur 환자"),
        orthanc_decodes=False,
    ),
    Case(  # one value only: not conformant, yet sent by Korean sites
        "korean-alone",
        "ISO 2022 IR 149",
        real_name("chrKoreanMulti.dcm"),
        "\x1b$)C흉부".encode("euc_kr"),
        described("Befund fur ??"),  # the node's own text: ASCII, which is all this value allows
        orthanc_decodes=False,
    ),
    Case(
        "japanese-ir13",
        ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        real_name("chrH32.dcm"),
        "ｷｮｳﾌﾞ ".encode("shift_jis") + "胸部".encode("iso2022_jp").replace(b"\x1b(B", b"\x1b(J"),
        described("Befund fur ??"),
        orthanc_decodes=False,
    ),
    Case(
        "japanese-ir87",
        ["", "ISO 2022 IR 87"],
        real_name("chrH31.dcm"),
        "胸部 X線".encode("iso2022_jp"),
        described("Befund fur ??"),
    ),
    Case(
        "gb18030",
        "GB18030",
        real_name("chrX2.dcm"),
        "胸部X线".encode("gb18030"),
        described("Befund für 환자"),
    ),
    Case("utf-8", "ISO_IR 192", real_name("chrX1.dcm"), "胸部X線".encode(), described("Befund für 환자")),
    Case(
        "latin-1",
        "ISO_IR 100",
        real_name("chrGerm.dcm"),
        "Thorax pédiatrique".encode("latin_1"),
        described("Befund für ??"),
    ),
    Case(
        "latin-2",
        "ISO_IR 101",
        "Dvořák^Antonín".encode("iso8859_2"),
        "Hrudník dítěte".encode("iso8859_2"),
        described("Befund für ??"),
    ),
    Case(
        "cyrillic",
        "ISO_IR 144",
        real_name("chrRuss.dcm"),
        "Грудная клетка".encode("iso8859_5"),
        described("Befund fur ??"),
    ),
    Case(
        "greek",
        "ISO_IR 126",
        real_name("chrGreek.dcm"),
        "Θώρακας".encode("iso8859_7"),
        described("Befund fur ??"),
    ),
    Case("default", None, b"DOE^JANE", b"XR CHEST", described("Befund fur ??")),
]
KOREAN_CT = Case(
    "korean-head-ct",
    ["", "ISO 2022 IR 149"],
    real_name("chrKoreanMulti.dcm"),
    "\x1b$)C두부 CT\x1b(B".encode("euc_kr"),
    referring_physician=real_name("chrI2.dcm"),
    institution="\x1b$)C서울병원".encode("euc_kr"),
    issuer="\x1b$)C서울병원 등록번호".encode("euc_kr"),
)


def with_identity(ds: Dataset, case: Case) -> Dataset:
    """``ds`` with the case's character set, and its name and study description as the case's bytes
    (pydicom writes bytes, and a person name's original bytes, as they are)."""
    if case.charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = case.charset
    encodings = convert_encodings(case.charset)
    ds["PatientName"] = DataElement(0x00100010, "PN", PersonName(case.patient_name, encodings))
    ds["StudyDescription"] = DataElement(0x00081030, "LO", case.study_description)
    if case.referring_physician:
        ds["ReferringPhysicianName"] = DataElement(
            0x00080090, "PN", PersonName(case.referring_physician, encodings)
        )
    if case.institution:
        ds["InstitutionName"] = DataElement(0x00080080, "LO", case.institution)
    if case.issuer:
        ds["IssuerOfPatientID"] = DataElement(0x00100021, "LO", case.issuer)
        other = Dataset()
        other.PatientID = "H-0149"
        other["IssuerOfPatientID"] = DataElement(0x00100021, "LO", case.issuer)
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = [other]
    return ds


def as_received(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def identity_bytes(ds: Dataset) -> dict[str, Any]:
    """Every identity element as stored: bytes, not decoded values."""
    raw = {}
    for keyword in IDENTITY:
        element = ds.get_item(keyword)
        if element is not None:
            assert isinstance(element, pydicom.dataelem.RawDataElement), f"{keyword} was decoded"
            raw[keyword] = element.value
    return raw


@dataclass(frozen=True)
class Study:
    case: Case
    files: list[Path]
    uid: str
    errors: list[str]  # dciodvfy's on the source itself: what a result may inherit, and no more


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Study]:
    """One chest radiograph per character set, and a Korean head CT."""
    folder = tmp_path_factory.mktemp("sources")
    made: dict[str, Study] = {}
    (folder / "chest").mkdir()
    for index, case in enumerate(CASES):
        ds = with_identity(
            chest_dicom(sample(np.random.default_rng(index), 256, "pneumonia"), case.name), case
        )
        path = folder / "chest" / f"{case.name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made[case.name] = Study(case, [path], str(ds.StudyInstanceUID), dciodvfy_errors(path))
    (folder / "ct").mkdir()
    ct = [with_identity(ds, KOREAN_CT) for ds in head_ct_series(8, hemorrhage=True, seed=149, size=256)]
    ct_files = [folder / "ct" / f"CT{number:04d}.dcm" for number in range(1, len(ct) + 1)]
    for ds, path in zip(ct, ct_files, strict=True):
        ds.save_as(path, enforce_file_format=True)
    made[KOREAN_CT.name] = Study(
        KOREAN_CT, ct_files, str(ct[0].StudyInstanceUID), dciodvfy_errors(ct_files[0])
    )
    for study in made.values():  # the sources are as meant: the case's bytes, valid unless not conformant
        source = as_received(study.files[0])
        as_stored = identity_bytes(source)
        assert as_stored["PatientName"].rstrip(b" ") == study.case.patient_name.rstrip(b" ")
        assert as_stored["StudyDescription"].rstrip(b" ") == study.case.study_description
        assert (study.errors != []) == (study.case.name == "korean-alone"), study.errors
    return made


def check_identity(result: Dataset, study: Study, where: Path) -> None:
    """The result's identity is the source's, as bytes; pydicom reads the same name from both; the
    result is as valid as its source (dciodvfy: no error the source does not have)."""
    source = as_received(study.files[0])
    assert identity_bytes(result) == identity_bytes(source)
    assert result.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
    assert str(result.PatientName) == str(source.PatientName) and "\ufffd" not in str(result.PatientName)
    assert result.StudyDescription == source.StudyDescription
    assert dciodvfy_errors(where) == study.errors


@pytest.fixture(scope="module")
def inferred(studies: dict[str, Study], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """``ainode infer`` over every radiograph at once, with a chest route: the results by study UID."""
    folder = tmp_path_factory.mktemp("infer")
    config = folder / "config.toml"
    config.write_bytes(
        tomli_w.dumps({"node": {"models_dir": str(REPO / "models")}, "routes": [CHEST_ROUTE]}).encode()
    )
    sources = studies[CASES[0].name].files[0].parent
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "infer",
            str(sources),
            "--out",
            str(folder / "out"),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # on a busy machine, more threads spin on each other
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    results: dict[str, list[Path]] = {}
    for path in sorted((folder / "out").rglob("*.dcm")):
        results.setdefault(str(as_received(path).StudyInstanceUID), []).append(path)
    return results


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_infer_keeps_the_identity_in_the_sources_character_set(
    case: Case, studies: dict[str, Study], inferred: dict[str, list[Path]]
) -> None:
    study = studies[case.name]
    results = inferred.get(study.uid, [])
    assert sorted(path.name[:2] for path in results) == ["SC", "SR"]
    for path in results:
        check_identity(as_received(path), study, path)
    (report,) = [as_received(path) for path in results if path.name.startswith("SR")]
    assert report.SeriesDescription == case.report  # the node's text: readable in the source's set


@pytest.fixture(scope="module")
def pacs(studies: dict[str, Study], tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc and one node; every study stored in Orthanc at once, which forwards each series to
    the node as it becomes stable; yields once the results of every study are back (or time is up)."""
    folder = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    orthanc = OrthancServer(
        folder / "orthanc", node_port=node_port, lua=[REPO / "deploy" / "orthanc" / "autoroute.lua"]
    ).start()
    settings = node_settings(node_port, orthanc.dicom_port)
    settings["node"]["torch_threads"] = 1
    settings["routes"][0]["options"]["explain_slices"] = 1
    settings["routes"].append({**CHEST_ROUTE, "destinations": ["pacs"]})
    node = NodeProcess(folder / "node", settings).start()
    try:
        files = [path for study in studies.values() for path in study.files]
        run = storescu(orthanc.dicom_port, files, called="ORTHANC")
        assert run.returncode == 0, run.stderr

        def all_back() -> bool:
            return all(all(results_in(orthanc, s.uid).values()) for s in studies.values())

        with contextlib.suppress(TimeoutError):  # each study's test says which did not come back
            wait_for(all_back, 120, "results of every study in Orthanc", interval=1)
        yield orthanc
    finally:
        node.stop()
        orthanc.stop()


def simplified_tags(orthanc: OrthancServer, instance_id: str) -> dict[str, Any]:
    response = httpx.get(f"{orthanc.url}/instances/{instance_id}/simplified-tags", timeout=10)
    response.raise_for_status()
    return dict(response.json())


@pytest.mark.parametrize("case", [*CASES, KOREAN_CT], ids=lambda case: case.name)
def test_orthanc_round_trip_files_results_under_the_sources_identity(
    case: Case, studies: dict[str, Study], pacs: OrthancServer, tmp_path: Path
) -> None:
    study = studies[case.name]
    found = results_in(pacs, study.uid)
    assert found["SC"] and found["SR"], f"no results for {case.name} in Orthanc"
    source_uid = as_received(study.files[0]).SOPInstanceUID
    (source_id,) = httpx.post(f"{pacs.url}/tools/lookup", content=str(source_uid), timeout=10).json()
    source_tags = simplified_tags(pacs, source_id["ID"])
    source_study = httpx.get(f"{pacs.url}/instances/{source_id['ID']}/study", timeout=10).json()["ID"]
    for kind, instance_ids in found.items():
        for instance_id in instance_ids:
            path = tmp_path / f"{kind}-{instance_id}.dcm"
            path.write_bytes(pacs.file(instance_id))
            check_identity(as_received(path), study, path)
            # Orthanc reads the same patient and study into the same study of the same patient
            tags = simplified_tags(pacs, instance_id)
            for keyword in ("PatientName", "PatientID", "StudyDescription", "SpecificCharacterSet"):
                assert tags.get(keyword) == source_tags.get(keyword), keyword
            if case.orthanc_decodes:  # and shows them as they are (keeping empty trailing groups)
                source = as_received(study.files[0])
                assert tags["PatientName"].rstrip("=") == str(source.PatientName)
                assert tags["StudyDescription"] == source.StudyDescription
            assert (
                httpx.get(f"{pacs.url}/instances/{instance_id}/study", timeout=10).json()["ID"]
                == source_study
            )
