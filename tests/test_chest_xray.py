"""The pediatric chest X-ray handler on synthetic radiographs with known findings, run with the shipped
model: preprocessing, DICOM pixel handling, findings, refusals, options, and the package's figures."""

from __future__ import annotations

import copy
import subprocess
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForProcessing

from handlers.base import Analysis
from handlers.chest_xray import (
    FINDINGS,
    NORMAL_LABEL,
    UNILATERAL,
    ChestXRayHandler,
    looks_like_chest,
    preprocess,
)
from node.dicom.display import display_pixels
from node.runtime import PackagedModel, load_model
from node.runtime.validate import validate_package
from training.chest_phantom import FINDINGS as PHANTOM_FINDINGS
from training.chest_phantom import NORMAL, Radiograph, chest_dicom, sample
from training.train_chest_xray import FINDINGS as CODES
from training.train_chest_xray import LABELS, POINTING_TOLERANCE_MM, evaluate, held_out_case

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "models" / "chest-xray"
WIDTH = 384
TEST_SEED = 8080  # neither the training seed nor the model card's held-out seed
handler = ChestXRayHandler()


@pytest.fixture(scope="module")
def model() -> PackagedModel:
    return load_model(PACKAGE)


def phantom(finding: str, index: int = 0) -> Radiograph:
    return sample(np.random.default_rng([TEST_SEED, LABELS.index(finding), index]), WIDTH, finding)


def as_received(ds: Dataset) -> Dataset:
    """Through a DICOM file and back, as the node reads what a PACS sent."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def study(finding: str, index: int = 0, **kwargs: Any) -> list[Dataset]:
    return [as_received(chest_dicom(phantom(finding, index), f"chest-test-{finding}-{index}", **kwargs))]


def analyse(datasets: list[Dataset], model: PackagedModel, **options: Any) -> Analysis:
    return handler.analyse(datasets, model, {**model.manifest.options, **options})


def test_labels_agree_between_phantom_handler_and_package(model: PackagedModel) -> None:
    assert tuple(FINDINGS) == PHANTOM_FINDINGS == tuple(CODES) and NORMAL == NORMAL_LABEL
    assert list(model.labels) == [NORMAL_LABEL, *FINDINGS]
    manifest = {label.name: label for label in model.manifest.labels}
    assert manifest[NORMAL_LABEL].code is None
    for name, code in CODES.items():
        label_code = manifest[name].code
        assert label_code is not None and (label_code.value, label_code.scheme_designator) == (
            code.value,
            code.scheme_designator,
        )


@pytest.mark.parametrize("monochrome1", [False, True])
def test_written_radiographs_are_valid_dx_images(tmp_path: Path, monochrome1: bool) -> None:
    path = tmp_path / "chest.dcm"
    chest_dicom(phantom("pneumothorax"), "dciodvfy", monochrome1=monochrome1).save_as(
        path, enforce_file_format=True
    )
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_display_pixels_undo_monochrome1_rescale_and_voi() -> None:
    image = phantom("nodule")
    plain = display_pixels(as_received(chest_dicom(image, "m2")))
    np.testing.assert_allclose(plain, image.pixels, atol=1 / 4095 + 1e-6)
    inverted = display_pixels(as_received(chest_dicom(image, "m1", monochrome1=True)))
    np.testing.assert_allclose(inverted, plain, atol=1 / 4095 + 1e-6)  # each rounded to 12 bits

    rescaled = chest_dicom(image, "rescaled")  # stored = (value + 100) / 2: the same display
    stored = np.frombuffer(rescaled.PixelData, "<u2").astype(np.int64)
    rescaled.PixelData = ((stored + 100) // 2).astype("<u2").tobytes()
    rescaled.RescaleSlope, rescaled.RescaleIntercept = "2", "-100"
    np.testing.assert_allclose(display_pixels(as_received(rescaled)), plain, atol=2 / 4095 + 1e-6)

    narrow = chest_dicom(image, "narrow")
    narrow.WindowCenter, narrow.WindowWidth = "1024", "2048"  # the lower half of the range, stretched
    shown = display_pixels(as_received(narrow))
    dark = image.pixels < 0.45
    np.testing.assert_allclose(shown[dark], np.clip(image.pixels[dark] * 2, 0, 1), atol=2e-3)
    assert shown.max() == 1.0

    lut = chest_dicom(image, "lut")  # an identity VOI LUT of 4096 12-bit entries, preferred to the window
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", list(range(4096)))  # LUT Data
    lut.VOILUTSequence = [item]
    lut.WindowCenter, lut.WindowWidth = "100", "10"
    np.testing.assert_allclose(display_pixels(as_received(lut)), plain, atol=1e-6)


def test_preprocess_is_clahe_at_the_model_size() -> None:
    image = phantom("pneumonia").pixels
    x = preprocess(image, (192, 160), clip_limit=2.0, tiles=8)
    assert x.shape == (1, 192, 160) and x.dtype == np.float32
    small = cv2.resize(image, (160, 192), interpolation=cv2.INTER_AREA)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(
        np.rint(small * 255).astype(np.uint8)
    )
    np.testing.assert_allclose(x[0], expected / 255.0, atol=1e-6)
    assert not np.allclose(preprocess(image, (192, 160), clip_limit=4.0), x)


@pytest.mark.parametrize("finding", list(FINDINGS))
def test_a_finding_is_called_and_explained_on_its_lesion(model: PackagedModel, finding: str) -> None:
    image = phantom(finding, 1)
    analysis = analyse(study(finding, 1, monochrome1=finding == "pneumothorax"), model)
    assert analysis.analysed
    assert [f.concept.meaning for f in analysis.findings] == [code.meaning for code in CODES.values()]
    called = [f for f in analysis.findings if f.present]
    assert [f.concept for f in called] == [CODES[finding]]
    assert all(f.threshold == 0.5 for f in analysis.findings)
    assert analysis.summary.startswith(f"Suspected {CODES[finding].meaning.lower()}")
    assert "normal p=" in analysis.summary
    (explanation,) = analysis.explanations
    assert explanation.label == CODES[finding].meaning
    assert explanation.image.shape == (*image.pixels.shape, 3) and explanation.image.dtype == np.uint8
    assert explanation.heatmap.shape == image.pixels.shape and explanation.heatmap.dtype == np.float32
    assert explanation.heatmap.max() == pytest.approx(1.0)
    tolerance = round(POINTING_TOLERANCE_MM / image.pixel_spacing_mm)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near = cv2.dilate(image.lesion.astype(np.uint8), kernel).astype(bool)
    # The heat concentrates on the finding (the pointing game's floor is checked on many images below).
    assert explanation.heatmap[near].mean() > 2 * explanation.heatmap[~near].mean()


def test_a_normal_chest_has_no_finding_and_a_faint_explanation(model: PackagedModel) -> None:
    analysis = analyse(study(NORMAL), model)
    assert analysis.analysed and len(analysis.findings) == len(FINDINGS)
    assert not any(f.present for f in analysis.findings)
    assert analysis.summary.startswith("No finding above threshold (normal p=")
    (explanation,) = analysis.explanations  # the most likely finding, shown faintly
    top = max(analysis.findings, key=lambda f: f.probability)
    assert explanation.label == top.concept.meaning
    assert explanation.heatmap.max() <= explanation.probability + 1e-6 < 0.5
    (probabilities,) = analysis.details["image_probabilities"].values()
    assert probabilities[NORMAL_LABEL] > 0.5


def test_side_of_a_unilateral_finding_is_never_wrong_and_mostly_named(model: PackagedModel) -> None:
    """The side comes from the heatmap peak, so a peak near the midline (a collapsed lobe against the
    mediastinum) names none; a named side must be the lesion's."""
    named = 0
    for finding in UNILATERAL:
        for index in range(3):
            image = phantom(finding, index)
            columns = np.nonzero(image.lesion)[1]
            expected = "right" if columns.mean() < image.pixels.shape[1] / 2 else "left"  # a PA film, hung
            analysis = analyse(study(finding, index), model)
            summary = analysis.summary
            meaning = CODES[finding].meaning.lower()
            wrong = "left" if expected == "right" else "right"
            assert f"{meaning}, {wrong} lung (p=" not in summary
            named += f"{meaning}, {expected} lung (p=" in summary
            (called,) = [f for f in analysis.findings if f.concept == CODES[finding]]
            side = called.site.laterality if called.site else None
            assert side is None or side.meaning.lower() == expected or not called.present
    assert named >= 0.6 * 3 * len(UNILATERAL)


def test_threshold_options_override_the_manifest(model: PackagedModel) -> None:
    analysis = analyse(
        study("cardiomegaly"), model, thresholds={"cardiomegaly": 0.999999}, max_explanations=0
    )
    (cardiomegaly,) = [f for f in analysis.findings if f.concept == CODES["cardiomegaly"]]
    assert cardiomegaly.threshold == 0.999999 and not cardiomegaly.present
    assert not analysis.explanations


def test_a_lateral_view_is_dropped_beside_the_frontal(model: PackagedModel) -> None:
    frontal = study("pleural_effusion")
    lateral = study("pleural_effusion", 2, view_position="LL")
    analysis = analyse(frontal + lateral, model)
    assert analysis.analysed and analysis.details["images_dropped"] == 1
    assert list(analysis.details["image_probabilities"]) == [str(frontal[0].SOPInstanceUID)]
    only_lateral = analyse(lateral, model)
    assert only_lateral.not_analysed_reason == "view LL; frontal views (PA, AP) only"


def _edited(ds: Dataset, **attributes: Any) -> Dataset:
    edited = copy.deepcopy(ds)
    for name, value in attributes.items():
        setattr(edited, name, value)
    return edited


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        (
            {"Modality": "CT", "SOPClassUID": CTImageStorage},
            "not a radiograph (Modality CT; CR or DX expected)",
        ),
        (
            {"SOPClassUID": DigitalXRayImageStorageForProcessing},
            "a DX image 'for processing' (raw detector data); send the 'for presentation' image",
        ),
        ({"BodyPartExamined": "HAND"}, "body part HAND, not CHEST"),
        ({"PixelData": bytes(2 * WIDTH * WIDTH * 2)}, None),  # a blank image: checked below
    ],
)
def test_what_is_not_a_frontal_chest_radiograph_is_not_analysed(
    model: PackagedModel, attributes: dict[str, Any], reason: str | None
) -> None:
    (ds,) = study(NORMAL)
    if "PixelData" in attributes:
        attributes = {"PixelData": bytes(len(ds.PixelData))}
        reason = "does not look like a frontal chest radiograph: no lung fields darker than the mediastinum"
    analysis = analyse([_edited(ds, **attributes)], model)
    assert not analysis.analysed and analysis.findings == () and analysis.explanations == ()
    assert analysis.not_analysed_reason == reason


def test_the_chest_check_accepts_every_finding_and_refuses_other_images() -> None:
    for finding in (NORMAL, *FINDINGS):
        assert looks_like_chest(phantom(finding, 3).pixels), finding
    rng = np.random.default_rng(1)
    assert not looks_like_chest(rng.random((300, 300)).astype(np.float32))
    hand = np.full((300, 240), 0.1, np.float32)
    cv2.ellipse(hand, (120, 170), (70, 110), 0, 0, 360, 0.7, -1)  # one bright limb on a dark field
    assert not looks_like_chest(hand)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"clahe_tiles": 0}, "clahe_tiles"),
        ({"clahe_clip_limit": -1}, "clahe_clip_limit"),
        ({"thresholds": {"fracture": 0.3}}, "thresholds"),
        ({"thresholds": {"pneumonia": 1.0}}, "thresholds"),
        ({"views": []}, "views"),
        ({"max_explanations": 9}, "max_explanations"),
        ({"treshold": 0.5}, "treshold"),
    ],
)
def test_a_bad_option_is_named(model: PackagedModel, options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=f"option '{named}"):
        handler.analyse(study(NORMAL), model, options)


def test_the_package_validates() -> None:
    names = [check.name for check in validate_package(PACKAGE)]
    assert names[:4] == ["manifest", "handler", "weights", "predict"]
    assert {f"explain {label}" for label in LABELS} <= set(names)


def test_accuracy_and_pointing_game_floors_on_fresh_phantoms(model: PackagedModel) -> None:
    """A broken model, preprocessing or explanation path (wrong layer, misaligned resize) fails here."""
    cases = [held_out_case(index, seed=TEST_SEED, width=320) for index in range(10 * len(LABELS))]
    metrics = evaluate(model, cases)
    assert metrics["accuracy"] >= 0.85
    assert metrics["macro_auc"] >= 0.95
    assert metrics["abnormal"]["auc"] >= 0.95
    assert metrics["pointing_game"]["tolerant"] >= 0.8
