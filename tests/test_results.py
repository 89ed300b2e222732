"""The results writers produce objects that validate (dciodvfy: no errors; dsrdump: parses) and say
what the analysis said, in the source's study, pointing back at the source images."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from handlers.base import SIDES, Analysis, Code, Explanation, Finding, Mask, Site
from node.config import OutputSpec
from node.outputs import write_outputs
from node.outputs.common import disclaimer_lines
from node.outputs.sr import ANALYSED_AREA, HOT_AREA
from node.runtime.identity import ModelIdentity
from tests.ohif_loader import load_sr
from training.chest_phantom import NORMAL, chest_dicom, sample
from training.ct_phantom import head_ct_series
from training.fundus_phantom import fundus_dataset, render

MODEL = ModelIdentity(
    name="ct-hemorrhage",
    version="0.3.1",
    sha256="0123456789abcdef" * 4,
    family="ResNet50 classifier",
    disclaimer="Demonstration model trained on synthetic images. NOT FOR DIAGNOSTIC USE",
)
HEMORRHAGE = Code("1386000", "SCT", "Intracranial hemorrhage")
PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
RETINOPATHY = Code("4855003", "SCT", "Diabetic retinopathy")
BRAIN, POSTERIOR = Code("12738006", "SCT", "Brain"), Code("255551008", "SCT", "Posterior")
LESION = Code("52988006", "SCT", "Lesion")
DISCLAIMER = "NOT FOR DIAGNOSTIC USE. Demonstration model trained on synthetic images"


def explanation(
    source: Dataset, label: str, probability: float, size: int = 224, finding: Finding | None = None
) -> Explanation:
    """What a handler would hand over: the source as the model saw it (windowed, resized) and a
    heatmap with one hot spot, at 62 % of the width and 40 % of the height."""
    pixels = source.pixel_array.astype(np.float32)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    pixels = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0) * 255
    image = cv2.resize(pixels, (size, size)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    heatmap = np.exp(-((xx - 0.62 * size) ** 2 + (yy - 0.4 * size) ** 2) / (2 * (0.08 * size) ** 2))
    return Explanation(source, image, heatmap.astype(np.float32), probability, label, finding=finding)


def regions(sr: Dataset) -> list[tuple[str, np.ndarray, str]]:
    """Every SCOORD: its graphic type, its (column, row) points, and the image it selects."""
    return [
        (
            item.GraphicType,
            np.asarray(item.GraphicData, float).reshape(-1, 2),
            item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
        )
        for item in content_items(sr)
        if item.ValueType == "SCOORD"
    ]


def ct_series(n: int) -> list[Dataset]:
    return head_ct_series(n, hemorrhage=True, seed=5)


def cr_chest() -> Dataset:
    """A chest radiograph as a MONOCHROME1 detector sends it."""
    return chest_dicom(sample(np.random.default_rng(3), 500, NORMAL), "results-chest", monochrome1=True)


def photo() -> Dataset:
    """A photograph of the right eye (Image Laterality R, body part EYE)."""
    return fundus_dataset(render(np.random.default_rng(4), 0, "R", 384), "results-eye")


def results(analysis: Analysis) -> tuple[list[Dataset], Dataset]:
    """The route's default outputs, as a job writes them: the overlays (series 901), then the report
    (902) that lists them as evidence."""
    made = write_outputs(
        analysis,
        MODEL,
        [OutputSpec(writer="sc", series_number=901), OutputSpec(writer="sr", series_number=902)],
    )
    (sr,) = [ds for kind, ds in made if kind == "SR"]
    return [ds for kind, ds in made if kind == "SC"], sr


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def validate(path: Path) -> str:
    """dciodvfy must report no error (warnings are allowed, as in IHE testing)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "Error" in line]
    assert not errors, f"dciodvfy {path.name}:\n{output}"
    return output


def dsrdump(path: Path) -> str:
    """The SR tree as dcmtk reads it: long values in full, referenced UIDs and concept codes shown."""
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (dcmtk) is not installed")
    result = subprocess.run(
        ["dsrdump", "+Pl", "+Pu", "+Pc", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def evidence(sr: Dataset) -> set[tuple[str, str]]:
    """(Series Instance UID, SOP Instance UID) of every instance listed as current evidence."""
    return {
        (series.SeriesInstanceUID, ref.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def check_secondary_captures(scs: Sequence[Dataset], sources: Sequence[Dataset], task: str) -> None:
    study = sources[0].StudyInstanceUID
    source_series = {ds.SeriesInstanceUID for ds in sources}
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    assert len({sc.SOPInstanceUID for sc in scs}) == len(scs)
    for number, sc in enumerate(scs, start=1):
        assert sc.StudyInstanceUID == study
        assert sc.SeriesInstanceUID not in source_series
        assert sc.InstanceNumber == number
        assert sc.SeriesDescription == f"AI overlay: {task}"
        assert sc.BurnedInAnnotation == "YES"
        assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
        assert sc.pixel_array.dtype == np.uint8 and sc.Columns >= 512
        (equipment,) = [e for e in sc.ContributingEquipmentSequence if e.get("DeviceUID")]
        assert equipment.DeviceUID == MODEL.device_uid
        assert equipment.ManufacturerModelName == MODEL.name
        assert equipment.SoftwareVersions == MODEL.software_version
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path


def test_present_finding_on_ct(out: Path) -> None:
    sources = ct_series(3)
    task = "Head CT hemorrhage detection"
    finding = Finding(HEMORRHAGE, True, 0.91, 0.5, Site(BRAIN, SIDES["L"], POSTERIOR))
    explained = [
        explanation(sources[1], "Intracranial hemorrhage", 0.87, finding=finding),
        explanation(sources[2], "x", 0.6),
    ]
    analysis = Analysis(task, sources, [finding], explained)

    scs, sr = results(analysis)
    assert len(scs) == 2
    check_secondary_captures(scs, sources, task)
    for sc, expl in zip(scs, explained, strict=True):
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == expl.source.SOPInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPClassUID == expl.source.SOPClassUID

    paths = [save(sc, out / f"sc{i}.dcm") for i, sc in enumerate(scs)]
    sr_path = save(sr, out / "sr.dcm")
    for path in [*paths, sr_path]:
        validate(path)
    reread = pydicom.dcmread(sr_path)
    assert reread.StudyInstanceUID == sources[0].StudyInstanceUID
    assert reread.SeriesInstanceUID not in {sources[0].SeriesInstanceUID, scs[0].SeriesInstanceUID}
    assert reread.SeriesDescription == f"AI report: {task}"
    assert evidence(reread) == {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in [*sources, *scs]}
    (tracking_uid,) = [i.UID for i in content_items(reread) if i.ValueType == "UIDREF"][1:]  # 1st: observer
    dump = dsrdump(sr_path)
    for expected in (
        '(121071,DCM,"Finding")=(1386000,SCT,"Intracranial hemorrhage")',
        '(1386000,SCT,"Intracranial hemorrhage")=(52101004,SCT,"Present")',
        'NUM:(122157,DCM,"Probability")="0.91" (1,UCUM,"no units")',
        f'TEXT:(121106,DCM,"Comment")="{DISCLAIMER}"',
        '(112039,DCM,"Tracking Identifier")="Intracranial hemorrhage, Left posterior brain"',
        f'(112040,DCM,"Tracking Unique Identifier")="{tracking_uid}"',
        '(121058,DCM,"Procedure reported")=(303653007,SCT,"Computed tomography of head")',
        f"sha256={MODEL.sha256}",
        f'(121012,DCM,"Device Observer UID")="{MODEL.device_uid}"',
        '(363698007,SCT,"Finding Site")=(12738006,SCT,"Brain")',
        '(272741003,SCT,"Laterality")=(7771000,SCT,"Left")',
        '(106233006,SCT,"Topographical modifier")=(255551008,SCT,"Posterior")',
        f'TEXT:(121106,DCM,"Comment")="{HOT_AREA}"',
    ):
        assert expected in dump, expected
    # Drawn where the finding shows: a closed outline of the hot spot on the slice that explains it.
    ((kind, points, selected),) = regions(reread)
    assert (kind, selected) == ("POLYLINE", sources[1].SOPInstanceUID)
    assert len(points) >= 4 and (points[0] == points[-1]).all()
    centre = points[:-1].mean(axis=0) / [sources[1].Columns, sources[1].Rows]
    assert np.allclose(centre, [0.62, 0.4], atol=0.03), centre


def test_absent_finding_on_radiograph(out: Path) -> None:
    source = cr_chest()
    analysis = Analysis(
        "Chest X-ray pneumothorax",
        [source],
        [Finding(PNEUMOTHORAX, False, 0.12, 0.5)],
        [explanation(source, "Pneumothorax", 0.12, size=256)],
    )
    (sc,), sr = results(analysis)
    check_secondary_captures([sc], [source], analysis.task)
    assert list(sc.PatientOrientation) == ["L", "F"]
    validate(save(sc, out / "sc.dcm"))
    sr_path = save(sr, out / "sr.dcm")
    validate(sr_path)
    dump = dsrdump(sr_path)
    assert '(36118008,SCT,"Pneumothorax")=(272519000,SCT,"Absent")' in dump
    assert '(122157,DCM,"Probability")="0.12"' in dump
    # Absent: no focal location is claimed; the region is the image area analysed.
    assert f'TEXT:(121106,DCM,"Comment")="{ANALYSED_AREA}"' in dump
    ((kind, points, selected),) = regions(pydicom.dcmread(sr_path))
    assert (kind, selected) == ("POLYLINE", source.SOPInstanceUID)
    # A negative result loads in OHIF 3.13 and is drawn, on the image analysed.
    loaded = load_sr(sr_path, [save(source, out / "source.dcm")])
    assert loaded["ok"], loaded["error"]
    assert [m["drawnOn"] for m in loaded["measurements"]] == [source.SOPInstanceUID]
    assert points.tolist() == [
        [0, 0],
        [source.Columns, 0],
        [source.Columns, source.Rows],
        [0, source.Rows],
        [0, 0],
    ]
    assert '"Procedure reported")=(43468-8,LN,"XR unspecified body region")' in dump


def test_photo_keeps_laterality(out: Path) -> None:
    source = photo()
    analysis = Analysis(
        "Fundus retinopathy screening",
        [source],
        [Finding(RETINOPATHY, True, 0.7, 0.5)],
        [explanation(source, "Diabetic retinopathy", 0.7)],
    )
    (sc,), sr = results(analysis)
    check_secondary_captures([sc], [source], analysis.task)
    assert (sc.Laterality, sc.BodyPartExamined) == ("R", "EYE")
    validate(save(sc, out / "sc.dcm"))
    validate(save(sr, out / "sr.dcm"))


def test_not_analysed(out: Path) -> None:
    sources = ct_series(3)
    reason = "slice thickness 10 mm is above the 5 mm the model was trained on"
    analysis = Analysis("Head CT hemorrhage detection", sources, not_analysed_reason=reason)

    (sc,), sr = results(analysis)
    check_secondary_captures([sc], sources, analysis.task)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[1].SOPInstanceUID  # the middle
    validate(save(sc, out / "sc.dcm"))
    sr_path = save(sr, out / "sr.dcm")
    validate(sr_path)

    reread = pydicom.dcmread(sr_path)
    (group,) = [i for i in content_items(reread) if i.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert not [i for i in content_items(group) if i.ValueType == "NUM"]  # never a probability
    ((_, _, selected),) = regions(reread)  # shown on the middle image, where a viewer finds it
    assert selected == sources[1].SOPInstanceUID
    loaded = load_sr(sr_path, [save(ds, out / f"source{i}.dcm") for i, ds in enumerate(sources)])
    assert loaded["ok"], loaded["error"]  # a "not analysed" report loads in OHIF 3.13, and says why
    assert [m["drawnOn"] for m in loaded["measurements"]] == [sources[1].SOPInstanceUID]
    texts = [i.TextValue for i in content_items(reread) if i.ValueType == "TEXT"]
    assert f"NOT ANALYSED: {reason}" in texts and DISCLAIMER in texts
    assert evidence(reread) == {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in [*sources, sc]}
    dump = dsrdump(sr_path)
    assert reason in dump and "Probability" not in dump
    summary = '(111017,DCM,"CAD Processing and Findings Summary")'
    assert f'{summary}=(111245,DCM,"No algorithms succeeded; without findings")' in dump


@pytest.mark.parametrize(
    ("charset", "task", "reason"),
    [
        (None, "Blutung (Hamorrhagie)", "Schichtdicke zu gross"),  # default repertoire: ASCII only
        ("ISO_IR 100", "Blutung (Hämorrhagie)", "Schichtdicke zu groß"),
    ],
)
def test_the_nodes_own_text_is_fitted_to_the_sources_character_set(
    out: Path, charset: str | None, task: str, reason: str
) -> None:
    """Results keep the source's set, in which the patient is named (node/outputs/charset.py); what
    it cannot encode of the node's own text is spelled in ASCII."""
    sources = ct_series(1)
    if charset is None:
        del sources[0].SpecificCharacterSet
    analysis = Analysis("Blutung (Hämorrhagie)", sources, not_analysed_reason="Schichtdicke zu groß")
    (sc,), sr = results(analysis)
    for ds, name in ((sc, "sc.dcm"), (sr, "sr.dcm")):
        path = save(ds, out / name)
        reread = pydicom.dcmread(path)
        assert reread.get("SpecificCharacterSet") == charset
        assert reread.SeriesDescription.endswith(task)
        validate(path)
    texts = [i.TextValue for i in content_items(pydicom.dcmread(out / "sr.dcm")) if i.ValueType == "TEXT"]
    assert f"NOT ANALYSED: {reason}" in texts


def test_ct_without_window_renders_and_validates(out: Path) -> None:
    sources = ct_series(1)
    del sources[0].WindowCenter, sources[0].WindowWidth
    analysis = Analysis("Head CT", sources, not_analysed_reason="no window")
    (sc,), _ = results(analysis)
    image = sc.pixel_array[: sources[0].Rows]
    assert image.min() == 0 and image.max() == 255  # air black, bone white in a soft-tissue window
    validate(save(sc, out / "sc.dcm"))


def test_disclaimer_always_says_not_for_diagnostic_use() -> None:
    plain = ModelIdentity("m", "1", "0" * 64, "f")
    assert disclaimer_lines(plain) == ["NOT FOR DIAGNOSTIC USE"]
    assert disclaimer_lines(MODEL) == [
        "NOT FOR DIAGNOSTIC USE",
        "Demonstration model trained on synthetic images",
    ]
    other = ModelIdentity("m", "1", "0" * 64, "f", disclaimer="Research use only")
    assert disclaimer_lines(other) == ["NOT FOR DIAGNOSTIC USE", "Research use only"]


@pytest.mark.parametrize("spacing", [None, 0.05])
def test_segmented_area_in_mm2_only_where_pixel_spacing_is_known(out: Path, spacing: float | None) -> None:
    source = photo()
    if spacing is not None:
        source.PixelSpacing = [spacing, spacing]
    pixels = np.zeros((source.Rows, source.Columns), bool)
    pixels[100:140, 150:210] = True  # 40 × 60 = 2400 pixels
    finding = Finding(RETINOPATHY, True, 0.7, 0.5)
    analysis = Analysis(
        "Lesion",
        [source],
        [finding],
        [explanation(source, "x", 0.7, finding=finding)],
        masks=[Mask(source, pixels, LESION, "Lesion")],
    )
    _, sr = results(analysis)
    dump = dsrdump(save(sr, out / "sr.dcm"))
    validate(out / "sr.dcm")
    if spacing is None:
        assert 'NUM:(42798000,SCT,"Area")="2400.0" ({pixels},UCUM,"Pixels")' in dump
    else:
        assert 'NUM:(42798000,SCT,"Area")="6.0" (mm2,UCUM,"square millimeter")' in dump
    (_, hot, _), (kind, points, selected) = regions(pydicom.dcmread(out / "sr.dcm"))
    assert (kind, selected) == ("POLYLINE", source.SOPInstanceUID)
    assert points.min(axis=0).tolist() == [150.5, 100.5] and points.max(axis=0).tolist() == [209.5, 139.5]
