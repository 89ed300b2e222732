import pytest
from pydicom import Dataset

from node.config import Route
from node.route import RouteError, Subject, choose, matches, validate


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
