"""The patient and study details an operator types for an uploaded photograph, checked before
anything is written: a PACS files an image under them, and a wrong or malformed identity there is
hard to undo. Names may be in any script; only what DICOM cannot hold is refused. Errors come as
``{"field", "message"}`` entries, one per form field at fault, so a form can show each beside its
field."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime

from node.spool import InvalidUID, check_uid

PN_COMPONENTS = 5  # Family^Given^Middle^Prefix^Suffix
PN_GROUPS = 3  # alphabetic=ideographic=phonetic
PN_COMPONENT_CHARS = 64
SEX = ("M", "F", "O", "")
LATERALITY = ("R", "L", "B", "U", "")
# The form fields that are DICOM text values, with their VR's length: LO 64, SH 16.
_TEXT = {"patient_id": 64, "accession_number": 16, "study_description": 64}
_LABELS = {
    "patient_name": "Patient name",
    "patient_id": "Patient ID",
    "patient_birth_date": "Birth date",
    "patient_sex": "Sex",
    "accession_number": "Accession number",
    "study_uid": "Study Instance UID",
    "study_description": "Study description",
    "laterality": "Laterality",
}


@dataclass(frozen=True)
class Details:
    """Checked details, in DICOM's forms: Patient's Birth Date as YYYYMMDD (or empty)."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    accession_number: str
    study_uid: str  # empty: a new study
    study_description: str
    laterality: str


class InvalidDetails(ValueError):
    """The form's faults, one ``{"field", "message"}`` per field."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


def _unprintable(value: str) -> str | None:
    """What in ``value`` a DICOM text value cannot hold: a backslash (the value separator) or a
    control character."""
    if "\\" in value:
        return "must not contain a backslash"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return "must not contain control characters (tabs, line breaks)"
    return None


def _name_fault(name: str) -> str | None:
    if not name:
        return "is required"
    if fault := _unprintable(name):
        return fault
    groups = name.split("=")
    if len(groups) > PN_GROUPS:
        return f"has at most {PN_GROUPS} '='-separated forms (alphabetic, ideographic, phonetic)"
    for group in groups:
        components = group.split("^")
        if len(components) > PN_COMPONENTS:
            return f"has at most {PN_COMPONENTS} parts: family^given^middle^prefix^suffix"
        if any(len(c) > PN_COMPONENT_CHARS for c in components):
            return f"each part has at most {PN_COMPONENT_CHARS} characters"
    return None


def _birth_date(value: str, today: date) -> tuple[str, str | None]:
    """``value`` (YYYY-MM-DD or empty) as a DICOM DA, or the fault."""
    if not value:
        return "", None
    try:  # strptime alone would take 2024-1-1; the length, that
        born = datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        born = None
    if born is None or len(value) != 10:
        return "", "is a date as YYYY-MM-DD"
    if born > today:
        return "", "is in the future"
    return born.strftime("%Y%m%d"), None


def check_details(form: Mapping[str, str], today: date) -> Details:
    """The details in ``form`` (the upload form's field names), stripped of surrounding spaces, or
    InvalidDetails naming every field at fault."""
    value = {key: str(form.get(key) or "").strip() for key in Details.__dataclass_fields__}
    errors: list[dict[str, str]] = []

    def fault(field: str, message: str | None) -> None:
        if message:
            errors.append({"field": field, "message": f"{_LABELS[field]} {message}"})

    fault("patient_name", _name_fault(value["patient_name"]))
    if not value["patient_id"]:
        fault("patient_id", "is required")
    for field, length in _TEXT.items():
        fault(field, _unprintable(value[field]))
        if len(value[field]) > length:
            fault(field, f"has at most {length} characters")
    birth_date, message = _birth_date(value["patient_birth_date"], today)
    fault("patient_birth_date", message)
    sex = value["patient_sex"].upper()
    if sex not in SEX:
        fault("patient_sex", "is M, F, O or empty")
    laterality = value["laterality"].upper()
    if laterality not in LATERALITY:
        fault("laterality", "is R, L, B, U or empty")
    if value["study_uid"]:
        try:
            check_uid(value["study_uid"])
        except InvalidUID:
            fault("study_uid", "is not a valid DICOM UID")
    if errors:
        raise InvalidDetails(errors)
    return Details(
        **{
            **value,
            "patient_birth_date": birth_date,
            "patient_sex": sex,
            "laterality": laterality,
        }
    )
