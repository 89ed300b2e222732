"""The skin-lesion handler on synthetic dermoscopy photographs with known lesions, run with the shipped
classifier, and the shipped lesion segmentation package."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from handlers.base import Analysis, Finding
from handlers.skin_lesion import SkinLesionHandler, centre_crop, parse_options, preprocess
from node.jobs.run import JobSpec, Task, run_job
from node.runtime import PackagedModel, load_model
from node.runtime.package import ModelMissing
from node.runtime.validate import validate_package
from training import train_skin_lesion, train_skin_segmentation
from training.demo_dicom import photograph, radiograph
from training.skin_phantom import CLASSES, SkinPhantom, dermoscopy_dataset, render, write_dermoscopy
from training.train_skin_lesion import CLASS_CODES

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER = REPO / "models" / "skin-lesion"
SEGMENTER = REPO / "models" / "skin-lesion-segmentation"
SHAPE = (300, 400)
SEED = 5150  # neither training's nor the model cards' held-out seeds
HELD_OUT_PER_CLASS = 3
handler = SkinLesionHandler()


@pytest.fixture(scope="module")
def model() -> PackagedModel:
    return load_model(CLASSIFIER)


@pytest.fixture(scope="module")
def phantoms() -> list[SkinPhantom]:
    """Two photographs per class, classes in turn, run through the handler."""
    return [render(np.random.default_rng([SEED, i]), CLASSES[i % len(CLASSES)], SHAPE) for i in range(14)]


@pytest.fixture(scope="module")
def analyses(model: PackagedModel, phantoms: list[SkinPhantom]) -> list[Analysis]:
    return [
        handler.analyse([dermoscopy_dataset(p, f"test-{i}")], model, model.manifest.options)
        for i, p in enumerate(phantoms)
    ]


@pytest.fixture(scope="module")
def held_out() -> list[SkinPhantom]:
    """Other photographs, classes in turn, for the figures of both packages."""
    return [
        render(np.random.default_rng([SEED + 1, i]), CLASSES[i % len(CLASSES)], SHAPE)
        for i in range(HELD_OUT_PER_CLASS * len(CLASSES))
    ]


def test_preprocess_takes_the_centre_square_and_scales_to_unit_range() -> None:
    image = np.zeros((90, 120, 3), np.uint8)
    image[15:75, 30:90] = 255  # the centre square of side 2/3 of 90 rows
    x = preprocess(image, (32, 32))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert x.min() == 1.0  # nothing outside the centre square reaches the model
    assert preprocess(image, (32, 32), crop_fraction=1.0).min() == 0.0
    assert centre_crop(image).shape == (60, 60, 3)


def test_written_photograph_is_a_dermoscopic_photograph_of_skin(tmp_path: Path) -> None:
    path = write_dermoscopy(tmp_path, "mel", seed=3, shape=(120, 160))
    ds = dcmread(path)
    assert (ds.Modality, ds.PhotometricInterpretation) == ("DMS", "RGB")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.7"  # Dermoscopic Photography Image Storage
    assert ds.AnatomicRegionSequence[0].CodeValue == "39937001"  # skin
    assert np.array_equal(ds.pixel_array, render(np.random.default_rng(3), "mel", (120, 160)).rgb)


def test_phantom_masks_are_exact_and_lesions_sit_inside_the_crop() -> None:
    for i, kind in enumerate(CLASSES):
        phantom = render(np.random.default_rng([7, i]), kind, (150, 200))
        assert phantom.rgb.shape == (150, 200, 3) and phantom.mask.shape == (150, 200)
        assert 0.01 < phantom.mask.mean() < 0.3
        assert centre_crop(phantom.mask).sum() == phantom.mask.sum(), f"{kind} reaches outside the crop"
        # the lesion differs from the skin around it
        inside = phantom.rgb[phantom.mask].mean(axis=0)
        outside = centre_crop(phantom.rgb)[~centre_crop(phantom.mask)].mean(axis=0)
        assert np.abs(inside - outside).max() > 10, kind


def test_each_class_is_named_with_its_code_and_explained_on_the_lesion(
    analyses: list[Analysis], phantoms: list[SkinPhantom]
) -> None:
    correct = on_lesion = 0
    for phantom, analysis in zip(phantoms, analyses, strict=True):
        assert analysis.analysed
        assert [f.concept for f in analysis.findings] == list(CLASS_CODES.values())
        probabilities = {f.concept: f.probability for f in analysis.findings}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        top = max(probabilities, key=lambda concept: probabilities[concept])
        correct += top == CLASS_CODES[phantom.kind]
        assert CLASS_CODES[analysis.details["top_class"]] == top
        assert analysis.summary.startswith(f"Most likely {top.meaning.lower()} (p=")
        (explanation,) = analysis.explanations
        crop = centre_crop(phantom.rgb)
        assert explanation.image.shape == crop.shape and explanation.image.dtype == np.uint8
        assert explanation.heatmap.shape == crop.shape[:2] and explanation.heatmap.dtype == np.float32
        assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
        assert explanation.label == top.meaning
        peak = np.unravel_index(int(np.argmax(explanation.heatmap)), explanation.heatmap.shape)
        on_lesion += bool(centre_crop(phantom.mask)[peak])
    assert correct >= 12, f"only {correct} of 14 photographs named correctly"
    assert on_lesion >= 12, f"only {on_lesion} of 14 heatmap peaks on the lesion"


def test_melanoma_is_found_and_nevi_are_not_called_melanoma(
    analyses: list[Analysis], phantoms: list[SkinPhantom]
) -> None:
    def finding(analysis: Analysis, kind: str) -> Finding:
        return {f.concept: f for f in analysis.findings}[CLASS_CODES[kind]]

    melanomas = [a for p, a in zip(phantoms, analyses, strict=True) if p.kind == "mel"]
    nevi = [a for p, a in zip(phantoms, analyses, strict=True) if p.kind == "nv"]
    assert any(finding(a, "mel").present for a in melanomas)
    assert all(finding(a, "mel").threshold == 0.5 for a in melanomas)
    assert all(not finding(a, "mel").present and finding(a, "nv").present for a in nevi)


def test_several_photographs_of_one_lesion_average(model: PackagedModel, phantoms: list[SkinPhantom]) -> None:
    views = [dermoscopy_dataset(phantoms[1], "view-1"), dermoscopy_dataset(phantoms[8], "view-2")]
    analysis = handler.analyse(views, model, {})
    per_image = analysis.details["image_probabilities"]
    assert list(per_image) == [str(ds.SOPInstanceUID) for ds in views]
    for finding, label in zip(analysis.findings, CLASS_CODES, strict=True):
        expected = np.mean([per_image[uid][label] for uid in per_image])
        assert finding.probability == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("dataset", "reason"),
    [
        (
            radiograph(
                np.full((128, 128), 0.5, np.float32), "dx", study="Chest", series="PA", body_part="CHEST"
            ),
            "not a skin photograph (Modality DX",
        ),
        (
            photograph(
                np.full((128, 128, 3), 128, np.uint8), "grey", study="Test", series="Card", body_part="SKIN"
            ),
            "does not look like a skin photograph",
        ),
        (
            photograph(
                np.full((40, 40, 3), 200, np.uint8), "tiny", study="Test", series="Thumb", body_part="SKIN"
            ),
            "image too small",
        ),
    ],
)
def test_what_is_not_a_skin_photograph_is_refused_without_a_probability(
    model: PackagedModel, dataset: Dataset, reason: str
) -> None:
    analysis = handler.analyse([dataset], model, {})
    assert not analysis.analysed and not analysis.findings and not analysis.explanations
    assert analysis.not_analysed_reason is not None and analysis.not_analysed_reason.startswith(reason)


def test_a_monochrome_photograph_is_refused(model: PackagedModel, phantoms: list[SkinPhantom]) -> None:
    ds = dermoscopy_dataset(phantoms[5], "mono")
    grey = phantoms[5].rgb.mean(axis=2).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelData = 1, "MONOCHROME2", grey.tobytes()
    del ds.PlanarConfiguration
    analysis = handler.analyse([ds], model, {})
    assert analysis.not_analysed_reason == "not a colour image (Photometric Interpretation MONOCHROME2)"


def test_a_16_bit_photograph_is_scaled_not_saturated(
    model: PackagedModel, phantoms: list[SkinPhantom], analyses: list[Analysis]
) -> None:
    """Some cameras store more than 8 bits; clipping them to 255 would show a white image."""
    ds = dermoscopy_dataset(phantoms[0], "test-0")
    wide = (phantoms[0].rgb.astype(np.uint16) * 257).astype("<u2")  # 0…255 → 0…65535
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelData = wide.tobytes()
    analysis = handler.analyse([ds], model, model.manifest.options)
    assert analysis.analysed
    assert [f.probability for f in analysis.findings] == pytest.approx(
        [f.probability for f in analyses[0].findings], abs=1e-3
    )


@pytest.mark.parametrize(
    ("options", "name"),
    [({"crop_fraction": 1.5}, "crop_fraction"), ({"threshold": 1.0}, "threshold"), ({"zoom": 2}, "zoom")],
)
def test_bad_options_are_named(model: PackagedModel, options: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=f"option '{name}'"):
        parse_options(options)
    with pytest.raises(ValueError, match=f"option '{name}'"):
        handler.analyse([], model, options)


def test_threshold_option_overrides_the_manifest(model: PackagedModel, analyses: list[Analysis]) -> None:
    assert {f.threshold for f in analyses[3].findings} == {0.5}
    strict = handler.analyse(list(analyses[3].sources), model, {"threshold": 0.999})
    assert {f.threshold for f in strict.findings} == {0.999}
    assert all(f.present == (f.probability >= 0.999) for f in strict.findings)


def test_committed_classifier_validates_and_holds_its_figures_on_held_out_phantoms(
    model: PackagedModel, held_out: list[SkinPhantom]
) -> None:
    validate_package(CLASSIFIER)
    metrics = train_skin_lesion.evaluate(model, held_out)
    assert metrics["accuracy"] >= 0.85
    assert metrics["macro_auc"] >= 0.95
    assert metrics["pointing_game"] >= 0.8


def test_committed_segmentation_validates_and_outlines_held_out_lesions(held_out: list[SkinPhantom]) -> None:
    validate_package(SEGMENTER)
    segmenter = load_model(SEGMENTER)
    assert segmenter.manifest.task == "segmentation"
    lesion = segmenter.manifest.labels[1]
    assert lesion.name == "lesion" and lesion.code is not None and lesion.code.value == "95324001"
    metrics = train_skin_segmentation.evaluate(segmenter, held_out)
    assert metrics["dice"] >= 0.95 and metrics["iou"] >= 0.9  # the card: 0.987 and 0.974


def test_with_its_segmentation_companion_the_handler_outlines_each_lesion(
    model: PackagedModel, phantoms: list[SkinPhantom]
) -> None:
    outlining = SkinLesionHandler(companions={"segmentation": load_model(SEGMENTER)})
    for i, phantom in enumerate(phantoms[:7]):
        ds = dermoscopy_dataset(phantom, f"outline-{i}")
        analysis = outlining.analyse([ds], model, model.manifest.options)
        (mask,) = analysis.masks
        assert mask.source is ds and mask.pixels.shape == phantom.mask.shape
        assert mask.concept.value == "95324001" and mask.label == "Skin lesion"
        overlap = (mask.pixels & phantom.mask).sum() / max((mask.pixels | phantom.mask).sum(), 1)
        assert overlap >= 0.8, f"{phantom.kind}: IoU {overlap:.2f}"
        assert analysis.record()["masks"] == [
            {"sop_uid": ds.SOPInstanceUID, "label": "Skin lesion", "pixels": int(mask.pixels.sum())}
        ]
    assert not handler.analyse([ds], model, model.manifest.options).masks  # none without the companion


def test_the_explained_finding_is_located_on_the_source_photograph(
    model: PackagedModel, phantoms: list[SkinPhantom], analyses: list[Analysis]
) -> None:
    """The heatmap is drawn over the centre crop; its peak is placed back on the whole photograph."""
    inside = 0
    for phantom, analysis in zip(phantoms, analyses, strict=True):
        (place,) = analysis.locations
        assert 0 <= place.row < SHAPE[0] and 0 <= place.column < SHAPE[1]
        lesion = cv2.dilate(phantom.mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        inside += bool(lesion[round(place.row), round(place.column)])
    assert inside >= 0.8 * len(analyses)


def test_a_job_loads_the_companion_its_route_names(tmp_path: Path) -> None:
    photo = write_dermoscopy(tmp_path / "in", "mel", seed=7)
    spec = JobSpec(1, "skin_lesion", "skin-lesion", companions={"segmentation": "skin-lesion-segmentation"})
    output = run_job(Task(spec, [str(photo)], str(tmp_path / "out"), str(REPO / "models")))
    assert [mask["label"] for mask in output.outcome["masks"]] == ["Skin lesion"]
    assert {result.kind for result in output.results} == {"SC", "SR"}

    wrong = replace(spec, companions={"segmentation": "skin-lesion"})  # a classifier in a segmenter's role
    with pytest.raises(ModelMissing, match="must be a segmentation model, skin-lesion is a classification"):
        run_job(Task(wrong, [str(photo)], str(tmp_path / "out"), str(REPO / "models")))
