"""The head-CT hemorrhage handler on synthetic series with known bleeds, run with the shipped model."""

from __future__ import annotations

import copy
import random
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from handlers.base import Analysis
from handlers.ct_hemorrhage import CTHemorrhageHandler, preprocess
from node.runtime import PackagedModel, load_model
from training.ct_phantom import (
    FIELD_OF_VIEW_MM,
    SLICE_THICKNESS_MM,
    head_ct_volume,
    sample_slice,
    write_head_ct_series,
)
from training.train_ct_hemorrhage import HEMORRHAGE, POINTING_TOLERANCE_MM, pointing_game

REPO = Path(__file__).resolve().parents[1]
SIZE = 512
POSITIVE_SEED, NEGATIVE_SEED = 4101, 4202
handler = CTHemorrhageHandler()


@pytest.fixture(scope="module")
def model() -> PackagedModel:
    return load_model(REPO / "models" / "ct-hemorrhage")


def read_series(folder: Path, *, hemorrhage: bool, seed: int) -> list[Dataset]:
    return [
        dcmread(path)
        for path in write_head_ct_series(folder, 30, hemorrhage=hemorrhage, seed=seed, size=SIZE)
    ]


@pytest.fixture(scope="module")
def positive(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return read_series(tmp_path_factory.mktemp("positive"), hemorrhage=True, seed=POSITIVE_SEED)


@pytest.fixture(scope="module")
def negative(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return read_series(tmp_path_factory.mktemp("negative"), hemorrhage=False, seed=NEGATIVE_SEED)


def analyse(datasets: Sequence[Dataset], model: PackagedModel, **options: Any) -> Analysis:
    return handler.analyse(datasets, model, {**model.manifest.options, **options})


def z_of(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def test_written_slices_are_valid_ct_images(tmp_path: Path) -> None:
    paths = write_head_ct_series(tmp_path, 6, hemorrhage=True, seed=1, size=128)
    names = [path.name for path in paths]
    assert names == sorted(names)
    positions = [z_of(dcmread(path, stop_before_pixels=True)) for path in paths]
    assert positions != sorted(positions), "file names should not give the slice order away"
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    result = subprocess.run(["dciodvfy", str(paths[0])], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_positive_series_finds_hemorrhage_and_explains_it_on_the_bleed(
    model: PackagedModel, positive: list[Dataset]
) -> None:
    analysis = analyse(positive, model)
    assert analysis.analysed
    (finding,) = analysis.findings
    assert finding.concept == HEMORRHAGE and finding.present
    assert finding.probability >= finding.threshold == 0.5
    assert analysis.summary.startswith("Intracranial hemorrhage suspected (p=")
    assert re.fullmatch(
        r"Intracranial hemorrhage suspected \(p=[01]\.\d\d, threshold 0\.50\); strongest on "
        r"slices? [\d–, ]+, (central|(left|right)( anterior| posterior)? brain|(anterior|posterior) brain)\.",
        analysis.summary,
    )
    assert finding.site is not None and finding.site.structure.meaning == "Brain"
    assert finding.image is analysis.explanations[0].source
    assert all(explanation.finding is finding for explanation in analysis.explanations)

    _, phantoms = head_ct_volume(30, True, POSITIVE_SEED, SIZE)  # the ground truth, slice by slice
    top = phantoms[round(z_of(analysis.explanations[0].source) / SLICE_THICKNESS_MM)]
    head_cols = np.nonzero(top.hu > -300)[1]
    bleed_side = (np.nonzero(top.lesion)[1].mean() - head_cols.mean()) / (np.ptp(head_cols) / 2)
    if abs(bleed_side) > 0.3:  # columns run towards the patient's left in these axial images
        assert ("left" if bleed_side > 0 else "right") in analysis.summary
        assert finding.site.laterality is not None
        assert finding.site.laterality.meaning == ("Left" if bleed_side > 0 else "Right")
    tolerance = round(POINTING_TOLERANCE_MM / (FIELD_OF_VIEW_MM / SIZE))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    assert len(analysis.explanations) == 3
    for explanation in analysis.explanations:
        assert explanation.image.shape == (SIZE, SIZE, 3) and explanation.image.dtype == np.uint8
        assert explanation.heatmap.shape == (SIZE, SIZE) and explanation.heatmap.dtype == np.float32
        assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
        phantom = phantoms[round(z_of(explanation.source) / SLICE_THICKNESS_MM)]
        assert phantom.hemorrhage, "an explained slice must be one that shows the bleed"
        peak = np.unravel_index(int(np.argmax(explanation.heatmap)), explanation.heatmap.shape)
        assert cv2.dilate(phantom.lesion.astype(np.uint8), kernel)[peak], "heatmap peak is off the bleed"

    per_slice = analysis.details["slice_probabilities"]
    assert list(per_slice) == [str(ds.SOPInstanceUID) for ds in analysis.sources]
    bleeding = {
        str(ds.SOPInstanceUID) for ds, p in zip(analysis.sources, phantoms, strict=True) if p.hemorrhage
    }
    assert max(per_slice[uid] for uid in bleeding) > max(per_slice[uid] for uid in set(per_slice) - bleeding)


def test_negative_series_has_no_finding(model: PackagedModel, negative: list[Dataset]) -> None:
    analysis = analyse(negative, model)
    (finding,) = analysis.findings
    assert not finding.present and finding.probability < 0.5
    (explanation,) = analysis.explanations  # the most suspicious slice, shown to the reader
    top = max(analysis.details["slice_probabilities"].items(), key=lambda item: item[1])
    assert str(explanation.source.SOPInstanceUID) == top[0]
    assert explanation.heatmap.max() <= explanation.probability + 1e-6  # faint: no confident-looking hot spot
    assert analysis.summary.startswith("No intracranial hemorrhage detected (p=")


def test_shuffled_slices_come_out_sorted(model: PackagedModel, positive: list[Dataset]) -> None:
    shuffled = positive[:]
    random.Random(3).shuffle(shuffled)
    analysis = analyse(shuffled, model, explain_slices=0)
    positions = [z_of(ds) for ds in analysis.sources]
    assert positions == sorted(positions) and len(positions) == 30
    in_order = analyse(positive, model, explain_slices=0)
    assert analysis.details["slice_probabilities"] == in_order.details["slice_probabilities"]


def test_aggregation_options(model: PackagedModel, positive: list[Dataset]) -> None:
    top = analyse(positive, model, aggregation="max", explain_slices=0)
    per_slice = np.array(list(top.details["slice_probabilities"].values()))
    assert top.findings[0].probability == pytest.approx(per_slice.max(), abs=1e-4)
    mean5 = analyse(positive, model, aggregation="top_k_mean", top_k=5, explain_slices=0)
    assert mean5.findings[0].probability == pytest.approx(np.sort(per_slice)[-5:].mean(), abs=1e-4)
    everything = analyse(positive, model, aggregation="top_k_mean", top_k=30, explain_slices=0)
    assert everything.findings[0].probability == pytest.approx(per_slice.mean(), abs=1e-4)
    assert everything.findings[0].probability < mean5.findings[0].probability


def test_threshold_option_overrides_the_manifest(model: PackagedModel, positive: list[Dataset]) -> None:
    analysis = analyse(positive, model, threshold=0.999999, explain_slices=0)
    assert analysis.findings[0].threshold == 0.999999 and not analysis.findings[0].present


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"agregation": "max"}, "agregation"),
        ({"aggregation": "mean"}, "aggregation"),
        ({"top_k": 0}, "top_k"),
        ({"threshold": 1.5}, "threshold"),
        ({"windows": [[40, 80], [80, 200]]}, "windows"),
        ({"windows": [[40, 0], [80, 200], [600, 2800]]}, "windows"),
    ],
)
def test_a_bad_option_is_named(
    model: PackagedModel, positive: list[Dataset], options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=f"option '{named}"):
        handler.analyse(positive, model, options)


def test_a_non_ct_series_is_not_analysed(model: PackagedModel, positive: list[Dataset]) -> None:
    mr = [copy.deepcopy(ds) for ds in positive]
    for ds in mr:
        ds.Modality = "MR"
    analysis = analyse(mr, model)
    assert not analysis.analysed and analysis.findings == ()
    assert analysis.not_analysed_reason == "not a CT series (Modality MR)"


def test_blank_images_are_not_analysed(model: PackagedModel, positive: list[Dataset]) -> None:
    blank = [copy.deepcopy(ds) for ds in positive]
    for ds in blank:
        ds.PixelData = bytes(len(ds.PixelData))  # stored 0 → -1024 HU everywhere
    analysis = analyse(blank, model)
    assert not analysis.analysed
    assert analysis.not_analysed_reason == (
        "does not look like a head CT: 0 of 30 images show brain-density tissue inside a skull"
    )


def test_localizers_are_dropped_and_too_few_slices_refused(
    model: PackagedModel, positive: list[Dataset]
) -> None:
    scout = copy.deepcopy(positive[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = "1.2.3.4"
    analysis = analyse([*positive, scout], model, explain_slices=0)
    assert analysis.details["images_dropped"] == 1
    assert "1.2.3.4" not in analysis.details["slice_probabilities"] and scout not in analysis.sources

    few = analyse([*positive[:3], scout], model)
    assert not few.analysed
    assert few.not_analysed_reason == (
        "too few axial images: 3 usable (1 localizer or empty images dropped), at least 5 needed"
    )


def test_preprocess_windows_into_three_channels() -> None:
    hu = np.array([[40.0, 0.0], [80.0, 2000.0]], np.float32)
    x = preprocess(hu, (2, 2))
    assert x.shape == (3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], [[0.5, 0.0], [1.0, 1.0]])  # brain 40/80
    np.testing.assert_allclose(x[1], [[0.3, 0.1], [0.5, 1.0]])  # subdural 80/200
    bone = [[840 / 2800, 800 / 2800], [880 / 2800, 1.0]]  # 600/2800 spans -800..2000 HU
    np.testing.assert_allclose(x[2], bone, rtol=1e-6)


def test_pointing_game_floor_on_fresh_phantoms(model: PackagedModel) -> None:
    """A broken explanation path (wrong layer, flipped normalisation, misaligned resize) fails here."""
    rng = np.random.default_rng(777)  # neither the training nor the model card's held-out seeds
    phantoms = [sample_slice(rng, 256, p_hemorrhage=1.0) for _ in range(40)]
    (share,) = pointing_game(model, phantoms, [round(POINTING_TOLERANCE_MM / (FIELD_OF_VIEW_MM / 256))])
    assert share >= 0.8
