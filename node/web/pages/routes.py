"""The routes page: the configured routes, and a tester that says which route each uploaded file takes.

The tester asks routing itself (:func:`node.route.choose` and :func:`node.route.mismatches` over a
:class:`node.route.Subject`, as ``ainode routes test`` does), so it can never disagree with what the
node would do. It reads each file's header only and keeps nothing. It shows the file's UIDs and the
tags the routes look at, never the patient's identity: a route that matches on a patient element
has that value masked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import RE_VALID_UID, UID

from node import audit
from node.accounts import role_at_least
from node.config import Route
from node.route import Mismatch, Subject, choose, mismatches, value_at
from node.web.auth import Principal, require
from node.web.render import page

router = APIRouter()
log = logging.getLogger(__name__)

# Patient identity a route could match on (say, a research patient-ID prefix) but the tester never shows.
IDENTIFYING = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientComments",
        "MedicalRecordLocator",
        "AccessionNumber",
        "ReferringPhysicianName",
    }
)
MASKED = "(patient data, not shown)"


def identifying(path: str) -> bool:
    """Does a match key (``Keyword`` or ``Sequence.Keyword``) reach patient identity."""
    return any(part in IDENTIFYING for part in path.split("."))


def condition_text(condition: Any) -> str:
    """A route condition in words: ``'CR' or 'DX'``, ``glob 'HEAD*' and ne 'X'``, ``absent``; a
    registered UID (a SOP class) with its name."""
    if isinstance(condition, list):
        return " or ".join(condition_text(item) for item in condition)
    if isinstance(condition, dict):
        words = []
        for op, operand in condition.items():
            if op == "exists":
                words.append("present" if operand else "absent")
            else:
                words.append(f"{op} {operand!r}")
        return " and ".join(words)
    if isinstance(condition, str) and RE_VALID_UID.match(condition) and UID(condition).name != condition:
        return f"{condition!r} ({UID(condition).name})"
    return repr(condition)


def shown(path: str, value: Any) -> str:
    """A tag's value as the tester shows it."""
    if value is None:
        return "(absent)"
    if identifying(path):
        return MASKED
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(item).strip() for item in value)
    return str(value).strip()


def looked_at(routes: Sequence[Route]) -> list[str]:
    """Every match key of the routes, in the order they first appear."""
    return list(dict.fromkeys(path for route in routes for path in route.match))


@dataclass(frozen=True)
class FileVerdict:
    """What routing makes of one uploaded file, or why it could not be read."""

    filename: str
    error: str = ""
    sop_uid: str = ""
    series_uid: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    taken: tuple[str, ...] = ()
    refused: tuple[tuple[str, tuple[str, ...]], ...] = ()  # route name → its failed conditions


def _failed(mismatch: Mismatch) -> str:
    if identifying(mismatch.where) and mismatch.found is not None:
        mismatch = Mismatch(mismatch.where, MASKED, mismatch.wanted)
    return str(mismatch)


def verdict(
    filename: str, stream: Any, routes: Sequence[Route], called_ae: str, calling_ae: str
) -> FileVerdict:
    """Route one file's header as the node would had it arrived at ``called_ae`` from ``calling_ae``."""
    try:
        header = dcmread(stream, stop_before_pixels=True)
    except (InvalidDicomError, OSError) as exc:
        return FileVerdict(filename, error=f"not a DICOM file ({type(exc).__name__})")
    try:
        return _routed(filename, header, routes, Subject(header, called_ae, calling_ae))
    except Exception as exc:  # pydicom converts values as routing reads them: one bad file, one verdict
        log.exception("route tester: an uploaded header could not be routed")
        return FileVerdict(filename, error=f"could not be routed ({type(exc).__name__})")


def _routed(filename: str, header: Dataset, routes: Sequence[Route], subject: Subject) -> FileVerdict:
    taken = choose(routes, subject)
    return FileVerdict(
        filename,
        sop_uid=str(header.get("SOPInstanceUID", "")),
        series_uid=str(header.get("SeriesInstanceUID", "")),
        tags=tuple((path, shown(path, value_at(header, path))) for path in looked_at(routes)),
        taken=tuple(route.name for route in taken),
        refused=tuple(
            (route.name, tuple(_failed(m) for m in mismatches(route, subject)))
            for route in routes
            if route not in taken
        ),
    )


def _routes_page(request: Request, principal: Principal, **context: Any) -> HTMLResponse:
    settings = request.app.state.settings
    return page(
        request,
        "routes.html",
        principal,
        may_test=role_at_least(principal.role, "operator"),
        routes=settings.routes,
        condition_text=condition_text,
        node_ae=settings.node.ae_title,
        **context,
    )


@router.get("/routes", response_class=HTMLResponse)
def routes_page(
    request: Request, principal: Annotated[Principal, Depends(require("viewer"))]
) -> HTMLResponse:
    return _routes_page(request, principal)


@router.post("/routes/test", response_class=HTMLResponse)
def route_tester(
    request: Request,
    files: Annotated[list[UploadFile], File()],
    principal: Annotated[Principal, Depends(require("operator"))],
    called_ae: Annotated[str, Form()] = "",
    calling_ae: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """Route uploaded files' headers; nothing is stored, the test itself is audited."""
    settings = request.app.state.settings
    called = called_ae.strip() or settings.node.ae_title
    calling = calling_ae.strip()
    verdicts = [
        verdict(upload.filename or f"file {n}", upload.file, settings.routes, called, calling)
        for n, upload in enumerate(files, 1)
    ]
    audit.append(
        request.app.state.db,
        "routes.tested",
        actor=principal.actor,
        called_ae=called,
        calling_ae=calling,
        files=[
            {"sop_uid": v.sop_uid, "series_uid": v.series_uid, "routes": list(v.taken), "error": v.error}
            for v in verdicts
        ],
    )
    return _routes_page(request, principal, verdicts=verdicts, called_ae=called, calling_ae=calling)
