"""A Structured Report's content tree as a table a person can read: one section per container (a
TID 1500 measurement group is titled by its tracking identifier), one row per content item with its
concept name, value and units — so the dashboard shows what the report says without a DICOM viewer."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom import Dataset

MEASUREMENT_GROUP = "125007"  # DCM "Measurement Group"
TRACKING_IDENTIFIER = "112039"  # DCM "Tracking Identifier"
# Value types whose value is one attribute, shown as it is
_PLAIN = {"UIDREF": "UID", "DATE": "Date", "TIME": "Time", "DATETIME": "DateTime", "PNAME": "PersonName"}


@dataclass(frozen=True)
class Row:
    depth: int  # 0: an item of the section itself; 1 and more: an item about the one above it
    relationship: str  # CONTAINS, HAS CONCEPT MOD, SELECTED FROM, ...
    name: str
    value: str
    units: str = ""


@dataclass
class Section:
    title: str
    measurement_group: bool
    rows: list[Row] = field(default_factory=list)


def _meaning(item: Dataset, keyword: str) -> str:
    codes = item.get(keyword)
    return str(codes[0].get("CodeMeaning", codes[0].get("CodeValue", ""))) if codes else ""


def _code_value(item: Dataset) -> str:
    codes = item.get("ConceptNameCodeSequence")
    return str(codes[0].get("CodeValue", "")) if codes else ""


def _value(item: Dataset) -> tuple[str, str]:
    """An item's value and units, as text."""
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return str(item.get("TextValue", "")), ""
    if kind == "CODE":
        return _meaning(item, "ConceptCodeSequence"), ""
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return "(no value)", ""
        return str(measured[0].get("NumericValue", "")), _meaning(measured[0], "MeasurementUnitsCodeSequence")
    if kind in _PLAIN:
        return str(item.get(_PLAIN[kind], "")), ""
    if kind in ("IMAGE", "COMPOSITE"):
        refs = item.get("ReferencedSOPSequence")
        if not refs:
            return "(no reference)", ""
        return str(refs[0].get("ReferencedSOPInstanceUID", "")), ""
    if kind in ("SCOORD", "SCOORD3D"):
        points = len(item.get("GraphicData", [])) // (2 if kind == "SCOORD" else 3)
        return f"{item.get('GraphicType', '')} of {points} point(s)", ""
    return "", ""


def content_sections(sr: Dataset) -> list[Section]:
    """The report's content as sections of rows, in document order; containers without content items
    of their own are left out."""
    sections: list[Section] = []

    def walk(items: list[Dataset], section: Section, depth: int) -> None:
        for item in items:
            value, units = _value(item)
            name = _meaning(item, "ConceptNameCodeSequence")
            row = Row(depth, str(item.get("RelationshipType", "")), name, value, units)
            if row.relationship == "CONTAINS" and item.get("ValueType") == "CONTAINER":
                group = _code_value(item) == MEASUREMENT_GROUP
                title = row.name
                if group:
                    tracking = [
                        child.get("TextValue", "")
                        for child in item.get("ContentSequence", [])
                        if _code_value(child) == TRACKING_IDENTIFIER
                    ]
                    title = f"{row.name}: {tracking[0]}" if tracking else row.name
                inner = Section(title, group)
                sections.append(inner)
                walk(list(item.get("ContentSequence", [])), inner, 0)
                continue
            section.rows.append(row)
            walk(list(item.get("ContentSequence", [])), section, depth + 1)

    root = Section(_meaning(sr, "ConceptNameCodeSequence") or "Report", False)
    sections.append(root)
    walk(list(sr.get("ContentSequence", [])), root, 0)
    return [section for section in sections if section.rows]
