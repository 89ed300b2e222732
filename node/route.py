"""Routing: which handler, model, outputs and destinations a complete series goes to, by its DICOM tags.

A route's ``match`` maps DICOM keywords to conditions. A condition is
- a plain value: equal (text compared stripped; numbers numerically),
- a list: any of its conditions,
- a table with any of ``glob``, ``regex``, ``gt``, ``ge``, ``lt``, ``le``, ``ne``, ``exists``: all must hold.
A multi-valued element (e.g. ImageType) matches when any of its values does, or its whole
backslash-joined value does. ``called_ae`` and ``calling_ae`` take the same conditions. Every route
that matches gets a job; a series that no route matches is recorded as "no route".
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from sqlalchemy import select
from sqlalchemy.orm import Session

from handlers import handler_class
from node import audit
from node.config import Route
from node.db import Database, Instance, Job, Series, SeriesStatus
from node.dicom.header import decode
from node.outputs import check_output

log = logging.getLogger(__name__)
_OPERATORS = {"glob", "regex", "gt", "ge", "lt", "le", "ne", "exists"}


class RouteError(ValueError):
    """A route whose conditions cannot work; raised when the configuration is checked."""


@dataclass(frozen=True)
class Subject:
    """What a route looks at: the header of one instance of the series and how it arrived."""

    header: Dataset
    called_ae: str
    calling_ae: str


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or not isinstance(expected, int | float):
        return str(actual).strip() == str(expected).strip()
    number = _number(actual)
    return number is not None and number == float(expected)


def _compare(actual: Any, op: str, bound: Any) -> bool:
    number = _number(actual)
    if number is None:
        return False
    return {
        "gt": number > bound,
        "ge": number >= bound,
        "lt": number < bound,
        "le": number <= bound,
    }[op]


def _single(actual: Any, condition: Any) -> bool:
    """Does one value satisfy a condition (no 'exists' here: that is about the element)."""
    if isinstance(condition, list):
        return any(_single(actual, c) for c in condition)
    if not isinstance(condition, dict):
        return _equal(actual, condition)
    for op, operand in condition.items():
        if op == "exists":
            continue
        if op == "glob" and not fnmatch.fnmatchcase(str(actual).strip(), str(operand)):
            return False
        if op == "regex" and not re.search(str(operand), str(actual).strip()):
            return False
        if op == "ne" and _equal(actual, operand):
            return False
        if op in ("gt", "ge", "lt", "le") and not _compare(actual, op, operand):
            return False
    return True


def matches(value: Any, condition: Any) -> bool:
    """Does an element's value (None: absent) satisfy a condition."""
    if isinstance(condition, dict) and "exists" in condition:
        present = value is not None and str(value).strip() != ""
        if present != bool(condition["exists"]):
            return False
        if not present or set(condition) == {"exists"}:
            return True
    if value is None:
        return False
    if isinstance(value, MultiValue | list | tuple):
        joined = "\\".join(str(v) for v in value)
        return _single(joined, condition) or any(_single(v, condition) for v in value)
    return _single(value, condition)


def _validate_condition(where: str, condition: Any) -> None:
    if isinstance(condition, list):
        for item in condition:
            _validate_condition(where, item)
    elif isinstance(condition, dict):
        unknown = set(condition) - _OPERATORS
        if unknown:
            raise RouteError(f"{where}: unknown operator(s) {sorted(unknown)}; use {sorted(_OPERATORS)}")
        if "regex" in condition:
            try:
                re.compile(str(condition["regex"]))
            except re.error as exc:
                raise RouteError(f"{where}: bad regex: {exc}") from exc
        for op in ("gt", "ge", "lt", "le"):
            if op in condition and _number(condition[op]) is None:
                raise RouteError(f"{where}: {op} needs a number")


def validate(routes: Sequence[Route]) -> None:
    """Check every route's keywords, conditions, handler, companion models and outputs, naming the
    bad one."""
    for i, route in enumerate(routes):
        for keyword, condition in route.match.items():
            if tag_for_keyword(keyword) is None:
                raise RouteError(f"routes.{i}.match: {keyword!r} is not a DICOM keyword")
            _validate_condition(f"routes.{i}.match.{keyword}", condition)
        for field in ("called_ae", "calling_ae"):
            if getattr(route, field) is not None:
                _validate_condition(f"routes.{i}.{field}", getattr(route, field))
        try:
            roles = handler_class(route.handler).companion_roles
            for spec in route.outputs:
                check_output(spec)
        except (LookupError, ValueError) as exc:
            raise RouteError(f"routes.{i}: {exc}") from exc
        unknown = sorted(set(route.models) - set(roles))
        if unknown:
            raise RouteError(
                f"routes.{i}.models: {route.handler} has no role {unknown}; roles: {list(roles)}"
            )


def route_matches(route: Route, subject: Subject) -> bool:
    if route.called_ae is not None and not matches(subject.called_ae, route.called_ae):
        return False
    if route.calling_ae is not None and not matches(subject.calling_ae, route.calling_ae):
        return False
    return all(matches(subject.header.get(keyword), condition) for keyword, condition in route.match.items())


def choose(routes: Sequence[Route], subject: Subject) -> list[Route]:
    """Every route that matches, in configuration order."""
    return [route for route in routes if route_matches(route, subject)]


@dataclass(frozen=True)
class _Ready:
    """A ready series as routing sees it, read in one short transaction."""

    id: int
    study_uid: str
    series_uid: str
    modality: str
    body_part: str
    called_ae: str
    calling_ae: str
    instances: int
    header: bytes | None  # as kept at arrival (node.dicom.header)
    first_file: str | None  # read only where no header was kept


def _subject(series: _Ready) -> Subject:
    """What the routes look at. A series indexed before headers were kept (revision 0002), or whose
    header could not be kept, is read from its first file."""
    if series.header is not None:
        header = decode(series.header)
    else:
        if series.first_file is None:
            raise OSError("no file to read the header from")
        header = dcmread(series.first_file, stop_before_pixels=True)
    return Subject(header=header, called_ae=series.called_ae, calling_ae=series.calling_ae)


def _first_file(session: Session, series_id: int) -> str | None:
    return session.scalar(
        select(Instance.path).where(Instance.series_fk == series_id).order_by(Instance.id).limit(1)
    )


def route_ready(db: Database, routes: Sequence[Route]) -> int:
    """Create jobs for every ready series (or record that none matched). Returns jobs created.

    The rules are matched outside any transaction; each series' outcome is then written in a short
    transaction of its own, so one that cannot be routed never holds up the rest, and a series that
    an instance reopened meanwhile is left to wait.
    """
    with db.session() as session:
        ready = [
            _Ready(
                series.id,
                series.study.study_uid,
                series.series_uid,
                series.modality,
                series.body_part,
                series.called_ae,
                series.calling_ae,
                series.instance_count,
                series.header,
                None if series.header is not None else _first_file(session, series.id),
            )
            for series in session.scalars(select(Series).where(Series.status == SeriesStatus.READY))
        ]
    created = 0
    for series in ready:
        chosen: list[Route] = []
        if not series.instances:
            note = "no instances left in this series"
        else:
            try:
                chosen, note = choose(routes, _subject(series)), ""
            except (OSError, InvalidDicomError) as exc:
                note = f"first instance unreadable: {exc}"
            except Exception as exc:  # one series that cannot be routed must not hold up the rest
                log.exception("routing a series failed")
                note = f"routing failed: {type(exc).__name__}"
        created += _record(db, series, chosen, note)
    return created


def _record(db: Database, ready: _Ready, chosen: Sequence[Route], note: str) -> int:
    with db.session() as session:
        series = session.get(Series, ready.id)
        if series is None or series.status != SeriesStatus.READY:
            return 0  # an instance arrived since: the series waits again
        if not chosen:
            series.status = SeriesStatus.NO_ROUTE
            series.route_note = note or "no route matched"
            audit.record(
                session,
                "route.none",
                outcome="failure" if note.startswith("routing failed") else "success",
                study_uid=ready.study_uid,
                series_uid=ready.series_uid,
                modality=ready.modality,
                body_part=ready.body_part,
                note=series.route_note,
            )
            return 0
        series.status = SeriesStatus.ROUTED
        series.route_note = ", ".join(r.name for r in chosen)
        for route in chosen:
            session.add(
                Job(
                    series=series,
                    route=route.name,
                    handler=route.handler,
                    model=route.model,
                    model_version=route.model_version or "",
                    options=dict(route.options),
                    companions=dict(route.models),
                    outputs=[spec.model_dump(exclude_none=True) for spec in route.outputs],
                    destinations={"names": list(route.destinations)},
                )
            )
            audit.record(
                session,
                "route.chosen",
                study_uid=ready.study_uid,
                series_uid=ready.series_uid,
                route=route.name,
                handler=route.handler,
                model=route.model,
            )
        return len(chosen)
