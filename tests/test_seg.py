"""The ``seg`` output on skin-lesion jobs with the shipped classifier and segmentation packages: a SEG
per photograph that dciodvfy passes, highdicom reads back pixel for pixel, OHIF 3.13's loader lays
on its photograph, and Orthanc stores; the overlay outlines the same mask; no mask, no SEG."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    UID,
    DermoscopicPhotographyImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    VLPhotographicImageStorage,
)

from handlers.base import Mask
from handlers.skin_lesion import SkinLesionHandler, crop_box
from node.config import OutputSpec
from node.jobs.run import JobOutput, JobSpec, Task, loaded, run_job
from tests.ohif_loader import load_seg
from tests.peers import NodeProcess, OrthancServer, dciodvfy_errors, free_port, wait_for
from training.demo_dicom import photograph
from training.skin_phantom import SKIN, render

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
SEGMENTER = "skin-lesion-segmentation"
OUTPUTS = [OutputSpec(writer="sc"), OutputSpec(writer="sr"), OutputSpec(writer="seg")]
TASK = "Dermoscopy skin lesion classification"


def skin_photo(folder: Path, sop_class_uid: UID, kind: str = "mel", seed: int = 11) -> Path:
    """A synthetic skin photograph as a dermatoscope (Dermoscopic Photography: a Frame of Reference
    but no plane geometry) or a plain camera (VL Photographic: no Frame of Reference) sends it."""
    phantom = render(np.random.default_rng(seed), kind, (450, 600))
    ds = photograph(
        phantom.rgb,
        f"seg-{sop_class_uid}-{seed}",
        study="Dermoscopy",
        series=f"Skin lesion ({kind})",
        body_part="",
        laterality="U",
        region=SKIN,
        sop_class_uid=sop_class_uid,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"photo-{ds.Modality}-{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def job(photo: Path, out: Path, segmentation: bool = True) -> JobOutput:
    companions = {"segmentation": SEGMENTER} if segmentation else {}
    spec = JobSpec(1, "skin_lesion", "skin-lesion", companions=companions, outputs=OUTPUTS)
    return run_job(Task(spec, [str(photo)], str(out), str(MODELS)))


def handler_mask(photo: Path) -> Mask:
    """The mask the handler draws on the photograph, computed apart from the job."""
    model = loaded(MODELS, "skin-lesion")
    handler = SkinLesionHandler(companions={"segmentation": loaded(MODELS, SEGMENTER)})
    (mask,) = handler.analyse([pydicom.dcmread(photo)], model, model.manifest.options).masks
    return mask


def written(output: JobOutput, kind: str) -> list[Path]:
    return [Path(result.path) for result in output.results if result.kind == kind]


def outline_green(page: np.ndarray) -> np.ndarray:
    """Where an overlay shows the outline's pure green, which neither skin nor the JET heatmap
    (blended at most half over it) comes near."""
    rgb = page.astype(int)
    return (rgb[..., 1] > 200) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80)


@pytest.fixture(scope="module", params=[DermoscopicPhotographyImageStorage, VLPhotographicImageStorage])
def skin_job(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, JobOutput]:
    folder = tmp_path_factory.mktemp("skin-job")
    photo = skin_photo(folder / "in", request.param)
    return photo, job(photo, folder / "out")


def test_a_skin_job_writes_a_valid_seg_of_the_handlers_mask(skin_job: tuple[Path, JobOutput]) -> None:
    photo, output = skin_job
    (path,) = written(output, "SEG")
    assert dciodvfy_errors(path) == []
    source, mask = pydicom.dcmread(photo), handler_mask(photo)
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert (seg.StudyInstanceUID, seg.SeriesNumber) == (source.StudyInstanceUID, 9002)
    assert seg.SeriesDescription == f"AI segmentation: {TASK}"
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
    )
    assert pixels.shape == (1, source.Rows, source.Columns, 1)
    assert 1000 < mask.pixels.sum() < mask.pixels.size / 4  # a lesion, not nothing or everything
    assert np.array_equal(pixels[0, :, :, 0].astype(bool), mask.pixels)


def test_the_seg_references_its_photograph_and_names_the_segmentation_model(
    skin_job: tuple[Path, JobOutput],
) -> None:
    photo, output = skin_job
    (path,) = written(output, "SEG")
    source, seg = pydicom.dcmread(photo), pydicom.dcmread(path)
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [ref.ReferencedSOPInstanceUID for ref in series.ReferencedInstanceSequence] == [
        source.SOPInstanceUID
    ]
    (frame,) = seg.PerFrameFunctionalGroupsSequence
    (derivation,) = frame.DerivationImageSequence
    assert [ref.ReferencedSOPInstanceUID for ref in derivation.SourceImageSequence] == [source.SOPInstanceUID]
    assert seg.FrameOfReferenceUID == source.get("FrameOfReferenceUID", seg.FrameOfReferenceUID)
    (orientation,) = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert "nominal" in seg.DerivationDescription  # and says that it places nothing in the patient

    (segment,) = seg.SegmentSequence
    segmenter = loaded(MODELS, SEGMENTER).identity
    assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentLabel == "Skin lesion"
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (segmenter.name, segmenter.version)
    assert segmenter.sha256 in algorithm.AlgorithmParameters
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "95324001"
    assert "NOT FOR DIAGNOSTIC USE" in segment.SegmentDescription
    assert (
        "NOT FOR DIAGNOSTIC USE" in seg.ContentDescription and "NOT FOR DIAGNOSTIC USE" in seg.ImageComments
    )
    assert seg.DeviceUID == segmenter.device_uid
    assert segmenter.device_uid in [item.get("DeviceUID") for item in seg.ContributingEquipmentSequence]


def test_ohif_lays_the_seg_on_its_photograph(skin_job: tuple[Path, JobOutput]) -> None:
    photo, output = skin_job
    (path,) = written(output, "SEG")
    loaded_seg = load_seg(path, [photo])
    source_class = pydicom.dcmread(photo).SOPClassUID
    if source_class == DermoscopicPhotographyImageStorage:
        # OHIF 3.13 shows no Dermoscopic Photography image (its stack handler lacks the class), so
        # it has nothing to lay the SEG on: that, and no fault of the SEG, is why it is not shown.
        unsupported = f"OHIF 3.13 does not display the source images' SOP class {source_class}"
        assert loaded_seg["error"] == unsupported
        return
    assert loaded_seg["ok"], loaded_seg["error"]
    (segment,) = loaded_seg["segments"]
    assert segment["label"] == "Skin lesion"
    mask = handler_mask(photo)
    assert segment["frames"] == [
        {"sopInstanceUID": pydicom.dcmread(photo).SOPInstanceUID, "pixels": int(mask.pixels.sum())}
    ]


def test_the_overlay_outlines_the_lesion(skin_job: tuple[Path, JobOutput]) -> None:
    """Outline-green pixels lie along the mask's edge, mapped into the overlay, and trace all of it."""
    photo, output = skin_job
    (path,) = written(output, "SC")
    sc = pydicom.dcmread(path)
    assert "outline of Skin lesion" in sc.DerivationDescription
    mask = handler_mask(photo).pixels
    top, left, side, _ = crop_box(mask.shape)
    width = int(sc.Columns)  # the crop, enlarged to the page's width; the caption band below it
    crop = mask[top : top + side, left : left + side].astype(np.uint8)
    shown = cv2.resize(crop, (width, width), interpolation=cv2.INTER_NEAREST)
    edge = shown - cv2.erode(shown, np.ones((3, 3), np.uint8))
    near_edge = cv2.distanceTransform((1 - edge).astype(np.uint8), cv2.DIST_L2, 3)
    green = outline_green(sc.pixel_array[:width])
    assert green.sum() > 500
    assert np.mean(near_edge[green] <= 3) > 0.95  # the outline lies on the edge ...
    near_green = cv2.distanceTransform((~green).astype(np.uint8), cv2.DIST_L2, 3)
    assert np.mean(near_green[edge.astype(bool)] <= 3) > 0.95  # ... and follows all of it


def test_without_a_segmentation_model_a_job_writes_no_seg_and_no_outline(tmp_path: Path) -> None:
    photo = skin_photo(tmp_path / "in", DermoscopicPhotographyImageStorage)
    output = job(photo, tmp_path / "out", segmentation=False)
    assert {result.kind for result in output.results} == {"SC", "SR"}
    (path,) = written(output, "SC")
    assert not outline_green(pydicom.dcmread(path).pixel_array).any()


def test_a_series_not_analysed_writes_no_seg(tmp_path: Path) -> None:
    grey = photograph(
        np.full((128, 128, 3), 128, np.uint8), "grey-card", study="Test", series="Card", body_part="SKIN"
    )
    path = tmp_path / "in" / "grey.dcm"
    path.parent.mkdir()
    grey.save_as(path, enforce_file_format=True)
    output = job(path, tmp_path / "out")
    assert output.outcome["analysed"] is False
    assert sorted(result.kind for result in output.results) == ["SC", "SR"]


@pytest.fixture
def pacs_and_node(tmp_path: Path) -> Iterator[tuple[OrthancServer, NodeProcess]]:
    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port).start()
    settings = {
        "node": {"dicom_port": node_port, "allowed_calling_aets": ["ORTHANC"]},
        "study": {"stable_seconds": 1},
        "send": {"first_delay_seconds": 0.5, "backoff_factor": 1.5, "max_delay_seconds": 2},
        "destinations": [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        ],
        "routes": [
            {
                "name": "skin-dermoscopy",
                "match": {"Modality": ["DMS", "XC"]},
                "handler": "skin_lesion",
                "model": "skin-lesion",
                "models": {"segmentation": SEGMENTER},
                "outputs": ["sc", "sr", "seg"],
                "destinations": ["pacs"],
            }
        ],
    }
    node = NodeProcess(tmp_path / "node", settings).start()
    yield orthanc, node
    node.stop()
    orthanc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("sop_class", [DermoscopicPhotographyImageStorage, VLPhotographicImageStorage])
def test_orthanc_stores_the_seg_beside_its_photograph(
    pacs_and_node: tuple[OrthancServer, NodeProcess], tmp_path: Path, sop_class: UID
) -> None:
    """The photograph goes to Orthanc (by REST: dcmtk's storescu knows no Dermoscopic Photography
    class), Orthanc pushes it to the node by C-STORE, the node sends its results back."""
    orthanc, _ = pacs_and_node
    photo = skin_photo(tmp_path / "in", sop_class)
    source = pydicom.dcmread(photo)
    assert httpx.post(f"{orthanc.url}/instances", content=photo.read_bytes()).json()["Status"] == "Success"
    study = orthanc.client.post_tools_lookup(data=source.StudyInstanceUID)[0]["ID"]
    orthanc.client.post_modalities_id_store("ainode", json={"Resources": [study]})

    def stored() -> dict[str, list[str]] | None:
        found: dict[str, list[str]] = {}
        for series in orthanc.series_in_study(source.StudyInstanceUID):
            for instance in series["Instances"]:
                found.setdefault(orthanc.sop_class(instance), []).append(instance)
        return found if SegmentationStorage in found and SecondaryCaptureImageStorage in found else None

    found = wait_for(stored, 180, "the SEG in Orthanc", interval=0.5)
    (seg_id,) = found[SegmentationStorage]
    path = tmp_path / "seg.dcm"
    path.write_bytes(orthanc.file(seg_id))
    assert dciodvfy_errors(path) == []
    seg: Dataset = pydicom.dcmread(path)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    pixels = hd.seg.segread(path).get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    assert np.array_equal(pixels[0, :, :, 0].astype(bool), handler_mask(photo).pixels)
