import copy
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForProcessing,
    OphthalmicPhotography8BitImageStorage,
)

from node.config import Route, load_settings
from node.dicom.header import decode, encode
from node.route import RouteError, Subject, choose, matches, mismatches, route_matches, validate
from tests.peers import REPO, dciodvfy_errors
from training.chest_phantom import NORMAL, chest_dicom
from training.chest_phantom import sample as sample_chest
from training.conjunctiva_phantom import CONJUNCTIVA, write_conjunctiva
from training.conjunctiva_phantom import render as render_eye
from training.ct_phantom import write_head_ct_series
from training.demo_dicom import photograph
from training.fundus_phantom import write_fundus_study
from training.skin_phantom import SKIN, write_dermoscopy
from training.skin_phantom import render as render_skin


def header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def route(name: str = "r", **kwargs: object) -> Route:
    return Route(name=name, handler="ct_hemorrhage", model="ct-hemorrhage", **kwargs)  # type: ignore[arg-type]


CT = header(
    Modality="CT",
    BodyPartExamined="HEAD",
    SliceThickness="5.0",
    ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    SeriesDescription="Head 5mm",
)


@pytest.mark.parametrize(
    ("keyword", "condition", "expected"),
    [
        ("Modality", "CT", True),
        ("Modality", "MR", False),
        ("BodyPartExamined", ["BRAIN", "HEAD"], True),
        ("BodyPartExamined", ["CHEST"], False),
        ("SeriesDescription", {"glob": "Head*"}, True),
        ("SeriesDescription", {"glob": "head*"}, False),  # case-sensitive, like DICOM values
        ("SeriesDescription", {"regex": r"\d+mm$"}, True),
        ("SliceThickness", {"le": 5}, True),
        ("SliceThickness", {"lt": 5}, False),
        ("SliceThickness", {"gt": 2.5, "le": 5}, True),
        ("SliceThickness", 5, True),  # numbers compare numerically: "5.0" == 5
        ("ImageType", "AXIAL", True),  # any value of a multi-valued element
        ("ImageType", "LOCALIZER", False),
        ("ImageType", "ORIGINAL\\PRIMARY\\AXIAL", True),  # or the whole value
        ("Modality", {"ne": "SR"}, True),
        ("ContrastBolusAgent", {"exists": False}, True),
        ("ContrastBolusAgent", {"exists": True}, False),
        ("ContrastBolusAgent", "X", False),
    ],
)
def test_conditions(keyword: str, condition: object, expected: bool) -> None:
    assert matches(CT.get(keyword), condition) is expected


def test_every_matching_route_is_chosen_in_order() -> None:
    routes = [
        route("head", match={"Modality": "CT", "BodyPartExamined": ["HEAD", "BRAIN"]}),
        route("chest", match={"Modality": "CR"}),
        route("any-ct", match={"Modality": "CT"}),
    ]
    chosen = choose(routes, Subject(CT, called_ae="AINODE", calling_ae="PACS"))
    assert [r.name for r in chosen] == ["head", "any-ct"]


def test_called_and_calling_ae_conditions() -> None:
    routes = [
        route("research", called_ae="AINODE_RES", match={"Modality": "CT"}),
        route("from-pacs", calling_ae={"glob": "PACS*"}),
    ]
    assert [r.name for r in choose(routes, Subject(CT, "AINODE", "PACS1"))] == ["from-pacs"]
    assert [r.name for r in choose(routes, Subject(CT, "AINODE_RES", "MODALITY"))] == ["research"]
    assert choose(routes, Subject(CT, "AINODE", "MODALITY")) == []


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ({"Modalty": "CT"}, r"routes\.0\.match: 'Modalty' is not a DICOM keyword"),
        ({"Modality": {"like": "C%"}}, r"unknown operator"),
        ({"SeriesDescription": {"regex": "("}}, r"bad regex"),
        ({"SliceThickness": {"gt": "thick"}}, r"gt needs a number"),
    ],
)
def test_bad_routes_are_named(match: dict[str, object], message: str) -> None:
    with pytest.raises(RouteError, match=message):
        validate([route(match=match)])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"handler": "ct_unknown"}, r"routes\.0: no handler named 'ct_unknown'"),
        ({"outputs": ["sc", "pdf"]}, r"routes\.0: no output writer 'pdf'"),
        ({"outputs": [{"writer": "sr", "series_description": "AI {model}"}]}, r"may use only \{task\}"),
        (
            {"models": {"segmentation": "skin-lesion-segmentation"}},
            r"routes\.0\.models: ct_hemorrhage has no role",
        ),
    ],
)
def test_a_route_names_only_what_exists(fields: dict[str, object], message: str) -> None:
    with pytest.raises(RouteError, match=message):
        validate([Route.model_validate({"name": "r", "handler": "ct_hemorrhage", "model": "m", **fields})])


def test_outputs_and_companions_a_route_may_name() -> None:
    skin = Route(
        name="skin",
        handler="skin_lesion",
        model="skin-lesion",
        models={"segmentation": "skin-lesion-segmentation"},
        outputs=["sr", {"writer": "sc", "series_number": 42, "series_description": "Overlay ({task})"}],
    )
    validate([skin])
    assert [(o.writer, o.series_number) for o in skin.outputs] == [("sr", None), ("sc", 42)]
    assert [o.writer for o in route().outputs] == ["sc", "sr"]  # the default


def coded(value: str, scheme: str = "SCT") -> Dataset:
    return header(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning="x")


PHOTO = header(
    Modality="XC",
    AnatomicRegionSequence=[coded("29445007"), coded("T-AA830", "SRT")],
    ViewPosition="",
)


@pytest.mark.parametrize(
    ("path", "condition", "expected"),
    [
        ("AnatomicRegionSequence.CodeValue", "29445007", True),  # any item's value
        ("AnatomicRegionSequence.CodeValue", ["5665001", "T-AA830"], True),
        ("AnatomicRegionSequence.CodeValue", "5665001", False),
        ("AnatomicRegionSequence.CodingSchemeDesignator", "SRT", True),
        ("AnatomicRegionSequence.CodeValue", {"exists": True}, True),
        ("ViewCodeSequence.CodeValue", {"exists": False}, True),  # no such sequence: absent
        ("ViewCodeSequence.CodeValue", "399348003", False),
        ("ViewPosition", ["PA", {"exists": False}], True),  # empty counts as absent
        ("Modality", ["OP", {"exists": False}], False),  # an alternative is taken whole
    ],
)
def test_conditions_reach_into_sequences(path: str, condition: object, expected: bool) -> None:
    subject = Subject(PHOTO, "AINODE", "CAMERA")
    assert route_matches(route(match={path: condition}), subject) is expected


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ({"Modality.CodeValue": "x"}, r"'Modality' in 'Modality.CodeValue' is not a sequence"),
        ({"AnatomicRegionSequence": "x"}, r"is a sequence: name a keyword of its items"),
        ({"AnatomicRegionSequence.CodeValeu": "x"}, r"'CodeValeu' is not a DICOM keyword"),
    ],
)
def test_bad_sequence_paths_are_named(match: dict[str, object], message: str) -> None:
    with pytest.raises(RouteError, match=message):
        validate([route(match=match)])


def test_mismatches_name_each_failed_condition_and_its_value() -> None:
    chest = route(
        "chest",
        called_ae="AINODE",
        match={
            "Modality": ["CR", "DX"],
            "BodyPartExamined": "HEAD",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
            "ImageType": "AXIAL",
            "AnatomicRegionSequence.CodeValue": "51185008",
        },
    )
    ct = copy.deepcopy(CT)
    ct.SOPClassUID = CTImageStorage
    failed = mismatches(chest, Subject(ct, "RESEARCH", "PACS"))
    assert [str(m) for m in failed] == [
        "called_ae is 'RESEARCH', wanted 'AINODE'",
        "Modality is 'CT', wanted ['CR', 'DX']",
        "SOPClassUID is '1.2.840.10008.5.1.4.1.1.2' (CT Image Storage), wanted '1.2.840.10008.5.1.4.1.1.1.1'",
        "AnatomicRegionSequence.CodeValue is absent, wanted '51185008'",
    ]
    assert route_matches(chest, Subject(ct, "AINODE", "PACS")) is False
    assert mismatches(route(match={"Modality": "CT"}), Subject(ct, "AINODE", "PACS")) == []


def as_routed(ds: Dataset) -> Dataset:
    """``ds`` as routing sees it: written, read back without pixel data, kept as the series' header."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return decode(encode(dcmread(buffer, stop_before_pixels=True)) or b"")


def demo_studies(folder: Path) -> dict[str, list[Path]]:
    """The five demo studies as the training builders write them, and a skin photograph from a plain
    camera, by the route each should take."""
    chest = folder / "chest.dcm"
    chest_dicom(sample_chest(np.random.default_rng(3), 256, NORMAL), "route-chest").save_as(
        chest, enforce_file_format=True
    )
    photo = folder / "skin-photo.dcm"
    skin = render_skin(np.random.default_rng(4), "nv", (120, 160))
    photograph(
        skin.rgb, "route-skin", study="Skin", series="Photo", body_part="", laterality="U", region=SKIN
    ).save_as(photo, enforce_file_format=True)
    return {
        "head-ct": write_head_ct_series(folder / "ct", 2, hemorrhage=True, seed=3, size=64),
        "chest-xray": [chest],
        "fundus": write_fundus_study(folder / "fundus", {"R": 1, "L": 0}, seed=3, height=120),
        "conjunctiva-anemia": [write_conjunctiva(folder / "eye", seed=3)],
        "skin-dermoscopy": [write_dermoscopy(folder / "skin", "mel", seed=3, shape=(120, 160))],
        "skin-photo": [photo],
    }


def test_each_demo_study_takes_exactly_its_route_in_the_example(tmp_path: Path) -> None:
    """What the demo builders write is what devices write: valid objects (dciodvfy) that the example
    configuration routes to their own task and nowhere else."""
    routes = load_settings(REPO / "config.example.toml").routes
    studies = demo_studies(tmp_path)
    assert {r.name for r in routes} == set(studies)
    for name, files in studies.items():
        for path in files:
            assert dciodvfy_errors(path) == [], path.name
            subject = Subject(as_routed(dcmread(path)), "AINODE", "MODALITY")
            assert [r.name for r in choose(routes, subject)] == [name], path.name
            for other in routes:
                assert (other.name == name) == (mismatches(other, subject) == [])


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"ViewPosition": "LL"}, "chest-xray: ViewPosition is 'LL'"),  # a lateral film
        (
            {"SOPClassUID": DigitalXRayImageStorageForProcessing},
            "chest-xray: SOPClassUID is '1.2.840.10008.5.1.4.1.1.1.1.1' (Digital X-Ray Image Storage - "
            "For Processing)",
        ),
    ],
)
def test_what_the_example_does_not_route(change: dict[str, object], failed: str) -> None:
    routes = load_settings(REPO / "config.example.toml").routes
    ds = chest_dicom(sample_chest(np.random.default_rng(5), 128, NORMAL), "route-not")
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    subject = Subject(as_routed(ds), "AINODE", "MODALITY")
    assert choose(routes, subject) == []
    explained = [f"{r.name}: " + "; ".join(str(m) for m in mismatches(r, subject)) for r in routes]
    assert any(line.startswith(failed) for line in explained), explained


def test_an_ophthalmic_camera_s_photo_of_the_conjunctiva_is_not_a_fundus() -> None:
    routes = load_settings(REPO / "config.example.toml").routes
    eye = render_eye(np.random.default_rng(6), "eye", (240, 320))
    ds = photograph(
        eye.rgb,
        "route-op-eye",
        study="Eye",
        series="External",
        body_part="EYE",
        laterality="R",
        region=CONJUNCTIVA,
        sop_class_uid=OphthalmicPhotography8BitImageStorage,
    )
    subject = Subject(as_routed(ds), "AINODE", "MODALITY")
    assert [r.name for r in choose(routes, subject)] == ["conjunctiva-anemia"]
    fundus = next(r for r in routes if r.name == "fundus")
    assert [m.where for m in mismatches(fundus, subject)] == ["AnatomicRegionSequence.CodeValue"]
