"""The fundus handler on synthetic photographs with known lesions, run with the shipped model."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import OphthalmicPhotography8BitImageStorage

from handlers.base import Analysis
from handlers.fundus import (
    FundusHandler,
    NoFieldOfView,
    find_field_of_view,
    parse_options,
    preprocess,
)
from node.dicom.attributes import laterality
from node.runtime import PackagedModel, load_model
from node.runtime.validate import validate_package
from training import common
from training.ct_phantom import head_ct_series
from training.demo_dicom import photograph
from training.fundus_phantom import CLASSES, Fundus, fundus_dataset, render, write_fundus_study
from training.train_fundus import (
    CONDITIONS,
    INPUT_SIZE,
    POINTING_FLOOR_STRICT,
    POINTING_FLOOR_TOLERANT,
    pointing_game,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "models" / "fundus"
HEIGHT, WIDTH = 480, 640
DR, AMD, BRVO = (CLASSES.index(name) for name in CONDITIONS)
handler = FundusHandler()


@pytest.fixture(scope="module")
def model() -> PackagedModel:
    return load_model(PACKAGE)


def phantom(label: int, eye: str, seed: int) -> Fundus:
    return render(np.random.default_rng([seed, label]), label, eye, HEIGHT, WIDTH)


def analyse(datasets: list[Dataset], model: PackagedModel, **options: object) -> Analysis:
    return handler.analyse(datasets, model, {**model.manifest.options, **options})


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(row), int(col)


def test_phantom_anatomy_is_mirrored_between_eyes_and_lesions_are_known() -> None:
    for label in range(len(CLASSES)):
        right, left = phantom(label, "R", 1), phantom(label, "L", 1)
        assert right.disc[1] > right.fovea[1], "a right eye's disc is nasal: on the image's right"
        assert left.disc[1] < left.fovea[1]
        for fundus in (right, left):
            assert fundus.rgb.shape == (HEIGHT, WIDTH, 3) and fundus.rgb.dtype == np.uint8
            assert not (fundus.lesion & ~fundus.fov).any()
            assert fundus.lesion.any() == (label != 0)
    amd = phantom(AMD, "R", 2)
    rows, cols = np.nonzero(amd.lesion)
    assert np.hypot(rows.mean() - amd.fovea[0], cols.mean() - amd.fovea[1]) < amd.disc_diameter


def test_written_study_holds_both_eyes_as_valid_photographs(tmp_path: Path) -> None:
    paths = write_fundus_study(tmp_path, {"R": DR, "L": 0}, seed=5, height=240)
    datasets = [dcmread(path) for path in paths]
    assert [laterality(ds) for ds in datasets] == ["R", "L"]
    assert (
        len({ds.StudyInstanceUID for ds in datasets}) == 1
        and len({ds.SeriesInstanceUID for ds in datasets}) == 1
    )
    assert len({ds.SOPInstanceUID for ds in datasets}) == 2
    assert all(ds.BodyPartExamined == "EYE" and ds.PhotometricInterpretation == "RGB" for ds in datasets)
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    result = subprocess.run(["dciodvfy", str(paths[0])], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_preprocess_crops_the_field_and_cancels_illumination() -> None:
    fundus = phantom(DR, "R", 3)
    x = preprocess(fundus.rgb, INPUT_SIZE)
    assert x.shape == (3, *INPUT_SIZE) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.allclose(x[:, 0, 0], 0.5), "outside the field of view is neutral"
    dimmer = np.clip(fundus.rgb.astype(np.float32) * [0.55, 0.7, 0.8], 0, 255).astype(
        np.uint8
    )  # darker, bluer
    assert np.abs(preprocess(dimmer, INPUT_SIZE) - x).mean() < 0.02
    fov = find_field_of_view(fundus.rgb)
    assert np.mean(fov.mask == fundus.fov) > 0.99
    extent = max(np.ptp(np.nonzero(fundus.fov)[0]), np.ptp(np.nonzero(fundus.fov)[1])) + 1
    assert abs(fov.side - extent) <= 0.02 * extent  # found on a 256-pixel copy: within a few pixels


def test_field_of_view_refusals() -> None:
    fundus = phantom(0, "L", 4)
    with pytest.raises(NoFieldOfView, match="too dark"):
        find_field_of_view((fundus.rgb * 0.06).astype(np.uint8))
    with pytest.raises(NoFieldOfView, match="too dark"):
        find_field_of_view(np.zeros((100, 120, 3), np.uint8))
    with pytest.raises(NoFieldOfView, match="no dark surround"):
        find_field_of_view(np.full((100, 120, 3), (200, 120, 80), np.uint8))


def test_both_eyes_are_reported_per_eye(model: PackagedModel) -> None:
    right, left = phantom(DR, "R", 10), phantom(0, "L", 10)
    analysis = analyse([fundus_dataset(left, "both-L"), fundus_dataset(right, "both-R")], model)
    assert analysis.analysed
    # The visit's result first (either eye: the eye that shows it more), then per eye, with the eye as
    # the finding site: right eye first, then left.
    assert [f.concept for f in analysis.findings] == 3 * list(CONDITIONS.values())
    visit, eyes = analysis.findings[:3], analysis.findings[3:]
    assert {f.site.words if f.site else None for f in visit} == {"Right and left eye"}
    assert [f.present for f in visit] == [True, False, False] and all(f.note for f in visit)
    for combined in visit:
        same = [f for f in eyes if f.concept == combined.concept]
        assert combined.probability == max(f.probability for f in same)
    sites = {f.site.words if f.site else None for f in eyes}
    assert sites == {"Right eye", "Left eye"}
    present = {(f.site.words, f.concept.value): f.present for f in eyes if f.site}
    assert present == {
        ("Right eye", "4855003"): True,
        ("Right eye", "267718000"): False,
        ("Right eye", "24596005"): False,
        ("Left eye", "4855003"): False,
        ("Left eye", "267718000"): False,
        ("Left eye", "24596005"): False,
    }
    # The patient's screen: a condition either eye shows.
    assert analysis.details["patient"] == {
        "diabetic_retinopathy": True,
        "macular_degeneration": False,
        "branch_vein_occlusion": False,
    }
    for finding in eyes:
        assert finding.image is not None and laterality(finding.image) == finding.site.words[0]
    assert analysis.details["eyes"]["right eye"]["present"] == ["diabetic_retinopathy"]
    assert analysis.details["eyes"]["left eye"]["present"] == []
    assert analysis.summary.startswith("Right eye: diabetic retinopathy (p=")
    assert "; left eye: no condition detected (highest " in analysis.summary and analysis.summary.endswith(
        "."
    )

    explained = {laterality(e.source): e for e in analysis.explanations}
    assert set(explained) == {"R", "L"}
    assert explained["R"].label == "Diabetic retinopathy, right eye"
    assert explained["R"].finding is not None and explained["R"].finding.site.words == "Right eye"
    assert explained["R"].finding.present and explained["R"].finding in analysis.findings
    assert explained["L"].label.endswith(", left eye")
    for eye, fundus in (("R", right), ("L", left)):
        e = explained[eye]
        assert e.image.shape == (HEIGHT, WIDTH, 3) and e.heatmap.shape == (HEIGHT, WIDTH)
        assert e.heatmap.dtype == np.float32 and e.heatmap.min() >= 0.0 and e.heatmap.max() <= 1.0
        rim = cv2.dilate(fundus.fov.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        assert not e.heatmap[~rim].any(), "the heatmap stays inside the field of view (found within pixels)"
    assert explained["L"].heatmap.max() < 0.5, "a normal eye's overlay is faint"
    tolerance = round(right.disc_diameter)  # one case: near its lesions; the 0.5 DD floor is on the set below
    assert common.pointing_hit(explained["R"].heatmap, right.lesion, tolerance), (
        "heatmap peak is off the lesions"
    )


@pytest.mark.parametrize(("label", "eye"), [(AMD, "L"), (BRVO, "R")])
def test_single_eye_finding_and_explanation(model: PackagedModel, label: int, eye: str) -> None:
    fundus = phantom(label, eye, 20)
    analysis = analyse([fundus_dataset(fundus, f"single-{label}")], model)
    called = [f.concept for f in analysis.findings if f.present]
    assert called == [CONDITIONS[CLASSES[label]]]
    (explanation,) = analysis.explanations
    assert explanation.label == CONDITIONS[CLASSES[label]].meaning  # one eye: the finding is that eye's
    assert explanation.source.ImageLaterality == eye
    assert common.pointing_hit(explanation.heatmap, fundus.lesion, round(fundus.disc_diameter))


def test_several_photographs_of_one_eye_are_aggregated(model: PackagedModel) -> None:
    datasets = [fundus_dataset(phantom(label, "R", 30), f"agg-{label}") for label in (DR, 0)]
    mean = analyse(datasets, model, explain=False)
    top = analyse(datasets, model, aggregation="max", explain=False)
    per_image = [p["diabetic_retinopathy"] for p in mean.details["image_probabilities"].values()]
    assert mean.details["eyes"]["right eye"]["images"] == 2 and not mean.explanations
    assert mean.findings[0].probability == pytest.approx(np.mean(per_image), abs=1e-4)
    assert top.findings[0].probability == pytest.approx(max(per_image), abs=1e-4)
    strict = analyse(datasets, model, threshold=0.999, explain=False)
    assert not any(f.present for f in strict.findings) and strict.findings[0].threshold == 0.999


def test_ophthalmic_sop_class_without_body_part_is_accepted(model: PackagedModel) -> None:
    ds = photograph(
        phantom(DR, "L", 40).rgb,
        "op",
        study="Fundus",
        series="OP",
        body_part="",
        laterality="L",
        sop_class_uid=OphthalmicPhotography8BitImageStorage,
        modality="OP",
    )
    analysis = analyse([ds], model, explain=False)
    assert analysis.analysed and analysis.findings[0].present


def test_what_is_not_a_fundus_photograph_is_refused(model: PackagedModel) -> None:
    ct = analyse(head_ct_series(2, hemorrhage=False, seed=3, size=64), model)
    assert ct.not_analysed_reason == "not an eye photograph (Modality CT)"
    assert not ct.findings and not ct.explanations

    skin = photograph(phantom(0, "R", 50).rgb, "skin", study="Skin", series="Photo", body_part="ARM")
    assert "not a photograph of the eye (Body Part Examined ARM" in (
        analyse([skin], model).not_analysed_reason or ""
    )

    flash = np.zeros(
        (384, 512, 3), np.uint8
    )  # an eye photograph with no dark surround: not a fundus camera's
    flash[...] = (200, 150, 120)
    cv2.circle(flash, (256, 192), 150, (120, 60, 40), -1)
    bright = photograph(flash, "flash", study="Eye", series="Photo", body_part="EYE", laterality="R")
    assert "no dark surround" in (analyse([bright], model).not_analysed_reason or "")

    underexposed = (phantom(DR, "R", 51).rgb * 0.06).astype(np.uint8)
    dark = photograph(underexposed, "dark", study="Fundus", series="Dark", body_part="EYE", laterality="R")
    refused = analyse([dark], model)
    assert refused.not_analysed_reason is not None and refused.not_analysed_reason.startswith(
        "image too dark"
    )
    assert not refused.findings

    good = fundus_dataset(phantom(0, "L", 52), "good")
    mixed = analyse([dark, good], model, explain=False)
    assert mixed.analysed and list(mixed.details["images_set_aside"].values())[0].startswith("image too dark")
    assert [ds.SOPInstanceUID for ds in mixed.sources] == [good.SOPInstanceUID]


def test_bad_options_name_the_option() -> None:
    with pytest.raises(ValueError, match="'aggregation'"):
        parse_options({"aggregation": "median"})
    with pytest.raises(ValueError, match="'threshold'"):
        parse_options({"threshold": 1.5})
    with pytest.raises(ValueError, match="'windows'"):
        parse_options({"windows": [1, 2]})


def test_package_validates_and_is_accurate_on_held_out_phantoms(model: PackagedModel) -> None:
    checks = validate_package(PACKAGE)
    assert [c.name for c in checks][:3] == ["manifest", "handler", "weights"]
    cases = [
        render(np.random.default_rng([777, i]), i % len(CLASSES), "RL"[i % 2], 448, 560) for i in range(48)
    ]
    inputs = np.stack([preprocess(case.rgb, model.input_size) for case in cases])
    labels = np.array([case.label for case in cases])
    metrics = common.per_class_metrics(model.predict(inputs), labels, CLASSES)
    assert metrics["accuracy"] >= 0.85 and metrics["macro_auc"] >= 0.95
    pointing = pointing_game(model, cases)
    assert pointing["n"] == 36
    assert pointing["tolerant"] >= POINTING_FLOOR_TOLERANT  # peak within half a disc diameter of a lesion
    assert pointing["strict"] >= POINTING_FLOOR_STRICT  # peak on a lesion pixel
