"""The OHIF harness (tests/ohif_loader.py) fails where OHIF 3.13 fails and draws where OHIF draws, on
SRs and SEGs built here with highdicom over the project's synthetic CT slices and photographs."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, DermoscopicPhotographyImageStorage, VLPhotographicImageStorage, generate_uid

from tests.ohif_loader import load_seg, load_sr
from tests.peers import dciodvfy_errors
from training.ct_phantom import head_ct_series
from training.demo_dicom import photograph
from training.skin_phantom import render

HEMORRHAGE = hd.sr.CodedConcept("50960005", "SCT", "Hemorrhage")
ALGORITHM = hd.AlgorithmIdentificationSequence(
    name="harness test", version="1", family=codes.cid7162.ArtificialIntelligence
)


def _ct_slices() -> list[Dataset]:
    return head_ct_series(2, hemorrhage=False, seed=5, size=64)


def _photograph(sop_class_uid: UID = VLPhotographicImageStorage) -> tuple[Dataset, np.ndarray]:
    """A synthetic skin photograph (no frame of reference) and its lesion mask."""
    phantom = render(np.random.default_rng(3), "nv", (48, 64))
    ds = photograph(
        phantom.rgb, "ohif-photo", study="Skin", series="Photo", body_part="ARM", sop_class_uid=sop_class_uid
    )
    return ds, phantom.mask


def _save(folder: Path, datasets: list[Dataset]) -> list[Path]:
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _report(
    folder: Path,
    source: Dataset,
    group: hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
) -> Path:
    """A TID 1500 Comprehensive 3D SR holding one measurement group about ``source``."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="harness test")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging"),
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="AI node project",
    )
    return _save(folder, [sr])[0]


def _tracking(name: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=name)


def _probability(value: float) -> list[hd.sr.Measurement]:
    return [hd.sr.Measurement(name=codes.DCM.Probability, value=value, unit=codes.UCUM.NoUnits)]


def _roi_group(source: Dataset) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A TID 1410 group: a POLYLINE image region selected from ``source``, a probability and a verdict."""
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 20.0], [10.0, 20.0], [10.0, 10.0]]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID
        ),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking("hemorrhage region"),
        referenced_region=region,
        finding_type=HEMORRHAGE,
        measurements=_probability(0.9),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=HEMORRHAGE, value=codes.cid241.Present)],
    )


def _segmentation(source: Dataset, mask: np.ndarray) -> Dataset:
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=ALGORITHM,
    )
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask[np.newaxis],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=9002,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="AI node project",
        manufacturer_model_name="harness test",
        software_versions="1",
        device_serial_number="1",
    )


def test_a_group_without_a_region_fails_the_whole_report(tmp_path: Path) -> None:
    """OHIF 3.13 throws on a measurement group with no SCOORD: the report shows nothing."""
    slices = _ct_slices()
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking("hemorrhage"),
        measurements=_probability(0.3),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=HEMORRHAGE, value=codes.cid241.Absent)],
    )
    result = load_sr(_report(tmp_path, slices[0], group), _save(tmp_path, slices))
    assert not result["ok"]
    assert result["error"] == "Cannot read properties of undefined (reading 'ReferencedSOPSequence')"
    assert [m["drawnOn"] for m in result["measurements"]] == [None]


@pytest.mark.parametrize("source_kind", ["ct", "photograph"])
def test_a_planar_region_is_drawn_on_its_source_image(tmp_path: Path, source_kind: str) -> None:
    """A TID 1410 region is drawn on the image it selects, with or without a frame of reference."""
    sources = _ct_slices() if source_kind == "ct" else [_photograph()[0]]
    source = sources[-1]
    result = load_sr(_report(tmp_path, source, _roi_group(source)), _save(tmp_path, sources))
    assert result["ok"], result["error"]
    (measurement,) = result["measurements"]
    assert measurement["drawnOn"] == source.SOPInstanceUID
    assert measurement["graphicType"] == "POLYLINE"
    assert {"label": "Probability", "value": "0.90 1"} in measurement["labels"]
    assert result["viewport"] == {"opens": True, "image": source.SOPInstanceUID}


def test_a_region_on_an_image_class_ohif_does_not_display_is_drawn_nowhere(tmp_path: Path) -> None:
    """OHIF 3.13's stack handler does not claim Dermoscopic Photography: no viewport shows the region."""
    source = _photograph(DermoscopicPhotographyImageStorage)[0]
    result = load_sr(_report(tmp_path, source, _roi_group(source)), _save(tmp_path, [source]))
    assert result["ok"], result["error"]
    assert [m["drawnOn"] for m in result["measurements"]] == [None]
    assert result["viewport"] == {"opens": False, "image": None}


def test_a_ct_segmentation_lands_on_its_slice(tmp_path: Path) -> None:
    slices = _ct_slices()
    mask = np.zeros((64, 64), bool)
    mask[20:30, 12:40] = True
    seg = _segmentation(slices[1], mask)
    result = load_seg(_save(tmp_path, [seg])[0], _save(tmp_path, slices))
    assert result["ok"], result["error"]
    assert result["segments"] == [
        {
            "number": 1,
            "label": "lesion",
            "frames": [{"sopInstanceUID": slices[1].SOPInstanceUID, "pixels": 280}],
        }
    ]


def test_a_photograph_segmentation_needs_a_plane_orientation(tmp_path: Path) -> None:
    """highdicom writes no Plane Orientation for a source without a frame of reference and the
    adapters then throw; the shared 1\\0\\0\\0\\1\\0 that OHIF assumes for such images makes it load
    onto the photograph (and dciodvfy still finds no error)."""
    photo, lesion = _photograph()
    sources = _save(tmp_path, [photo])
    seg = _segmentation(photo, lesion)
    failed = load_seg(_save(tmp_path, [seg])[0], sources)
    assert not failed["ok"]
    assert failed["error"] == "Cannot read properties of undefined (reading 'ImageOrientationPatient')"

    oriented = copy.deepcopy(seg)
    oriented.SOPInstanceUID = generate_uid()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    oriented.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
    path = _save(tmp_path, [oriented])[0]
    result = load_seg(path, sources)
    assert result["ok"], result["error"]
    (segment,) = result["segments"]
    assert segment["frames"] == [{"sopInstanceUID": photo.SOPInstanceUID, "pixels": int(lesion.sum())}]
    assert dciodvfy_errors(path) == []
