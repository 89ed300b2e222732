"""Routing: which handler, model, outputs and destinations a complete series goes to, by its DICOM tags.

A route's ``match`` maps DICOM keywords to conditions. A condition is
- a plain value: equal (text compared stripped; numbers numerically),
- a list: any of its conditions,
- a table with any of ``glob``, ``regex``, ``gt``, ``ge``, ``lt``, ``le``, ``ne``, ``exists``: all must hold.
  A ``regex`` is RE2 syntax, matched in time linear in the value: a pattern that backtracks
  exponentially in Python's ``re`` would freeze routing on one crafted value (issue 11).
A multi-valued element (e.g. ImageType) matches when any of its values does, or its whole
backslash-joined value does. A key may reach into sequences, ``AnatomicRegionSequence.CodeValue``:
the values of that keyword in every item, matched like a multi-valued element. ``called_ae`` and
``calling_ae`` take the same conditions. Every route that matches gets a job; a series that no route
matches is recorded as "no route". :func:`mismatches` says which conditions a route failed, and on
what values: the route tester shows them.

A route with ``group = "study"`` gets one job for all the series of a study that it matches, once the
whole study is stable (:mod:`node.ingest.completion`); until then its series wait, still ready.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import re2
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session

from handlers import handler_class
from node import audit
from node.config import Route
from node.db import Database, Instance, Job, Series, SeriesStatus, Study
from node.dicom.header import decode
from node.outputs import check_output
from node.privacy import failure

log = logging.getLogger(__name__)
_OPERATORS = {"glob", "regex", "gt", "ge", "lt", "le", "ne", "exists"}


class RouteError(ValueError):
    """A route whose conditions cannot work; raised when the configuration is checked."""


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is reported as a RouteError, not also on stderr


@lru_cache(maxsize=256)
def _regex(pattern: str) -> Any:
    """A route's pattern compiled by RE2 (linear time, no backreferences or lookaround), once."""
    return re2.compile(pattern, _RE2_OPTIONS)


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
    if not isinstance(condition, dict):
        return _equal(actual, condition)
    for op, operand in condition.items():
        if op == "exists":
            continue
        if op == "glob" and not fnmatch.fnmatchcase(str(actual).strip(), str(operand)):
            return False
        if op == "regex" and not _regex(str(operand)).search(str(actual).strip()):
            return False
        if op == "ne" and _equal(actual, operand):
            return False
        if op in ("gt", "ge", "lt", "le") and not _compare(actual, op, operand):
            return False
    return True


def matches(value: Any, condition: Any) -> bool:
    """Does an element's value (None: absent) satisfy a condition."""
    if isinstance(condition, list):  # each alternative whole: ["PA", {exists = false}] is PA or absent
        return any(matches(value, alternative) for alternative in condition)
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
                _regex(str(condition["regex"]))
            except re2.error as exc:
                reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
                raise RouteError(
                    f"{where}: bad regex {condition['regex']!r} (RE2 syntax: no backreferences or "
                    f"lookaround): {reason}"
                ) from exc
        for op in ("gt", "ge", "lt", "le"):
            if op in condition and _number(condition[op]) is None:
                raise RouteError(f"{where}: {op} needs a number")


def validate(routes: Sequence[Route]) -> None:
    """Check every route's keywords, conditions, handler, companion models and outputs, naming the
    bad one."""
    for i, route in enumerate(routes):
        for keyword, condition in route.match.items():
            problem = _path_problem(keyword)
            if problem:
                raise RouteError(f"routes.{i}.match: {problem}")
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


def _path_problem(path: str) -> str | None:
    """Why a match key names no value a condition can compare, or None: every part a keyword, every
    part but the last a sequence, the last not one."""
    *sequences, last = parts = path.split(".")
    for keyword in parts:
        if tag_for_keyword(keyword) is None:
            return f"{keyword!r} is not a DICOM keyword"
    for keyword in sequences:
        if dictionary_VR(keyword) != "SQ":
            return f"{keyword!r} in {path!r} is not a sequence"
    if dictionary_VR(last) == "SQ":
        return f"{last!r} is a sequence: name a keyword of its items, e.g. '{last}.CodeValue'"
    return None


def value_at(header: Dataset, path: str) -> Any:
    """What a condition on ``path`` looks at: a keyword's value, or for ``Sequence.Keyword`` (at any
    depth) that keyword's values in every item, as one list; None when absent."""
    keyword, _, rest = path.partition(".")
    value = header.get(keyword)
    if not rest:
        return value
    if not isinstance(value, DicomSequence):
        return None
    found: list[Any] = []
    for item in value:
        inner = value_at(item, rest)
        if inner is not None:
            found.extend(inner if isinstance(inner, MultiValue | list) else [inner])
    return found or None


def _shown(value: Any) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return repr([str(v).strip() for v in value])
    if isinstance(value, UID) and value.name != str(value):
        return f"{str(value)!r} ({value.name})"  # a SOP class or transfer syntax, named
    return repr(str(value).strip())


@dataclass(frozen=True)
class Mismatch:
    """A condition of a route that a subject fails: where it looked, what it found, what it wanted."""

    where: str  # a match key, or called_ae / calling_ae
    found: Any  # None: absent
    wanted: Any

    def __str__(self) -> str:
        found = "is absent" if self.found is None else f"is {_shown(self.found)}"
        return f"{self.where} {found}, wanted {self.wanted!r}"


def mismatches(route: Route, subject: Subject) -> list[Mismatch]:
    """Every condition of ``route`` that ``subject`` fails, in the route's order; none when the route
    matches. Matching is this list being empty, so the route tester can never disagree with routing."""
    looked = [
        ("called_ae", subject.called_ae, route.called_ae),
        ("calling_ae", subject.calling_ae, route.calling_ae),
        *((path, value_at(subject.header, path), wanted) for path, wanted in route.match.items()),
    ]
    return [
        Mismatch(where, found, wanted)
        for where, found, wanted in looked
        if wanted is not None and not matches(found, wanted)
    ]


def route_matches(route: Route, subject: Subject) -> bool:
    return not mismatches(route, subject)


def choose(routes: Sequence[Route], subject: Subject) -> list[Route]:
    """Every route that matches, in configuration order."""
    return [route for route in routes if route_matches(route, subject)]


@dataclass(frozen=True)
class _SeriesView:
    """A series as routing sees it, read in one short transaction."""

    id: int
    study_id: int
    study_uid: str
    study_stable_at: datetime | None  # when its whole study was found complete (node.ingest.completion)
    series_uid: str
    modality: str
    body_part: str
    called_ae: str
    calling_ae: str
    instances: int
    header: bytes | None  # as kept at arrival (node.dicom.header)
    first_file: str | None  # read only where no header was kept


def _read(session: Session, series: Series) -> _SeriesView:
    return _SeriesView(
        series.id,
        series.study_fk,
        series.study.study_uid,
        series.study.stable_at,
        series.series_uid,
        series.modality,
        series.body_part,
        series.called_ae,
        series.calling_ae,
        series.instance_count,
        series.header,
        None if series.header is not None else _first_file(session, series.id),
    )


def _subject(series: _SeriesView) -> Subject:
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


@dataclass(frozen=True)
class _Decision:
    """What the rules made of one ready series: every route that matched it, or why none did."""

    series: _SeriesView
    routes: list[Route]
    note: str

    @property
    def study_routes(self) -> list[str]:
        return [route.name for route in self.routes if route.group == "study"]


def _decide(routes: Sequence[Route], series: _SeriesView) -> _Decision:
    chosen: list[Route] = []
    if not series.instances:
        note = "no instances left in this series"
    else:
        try:
            chosen, note = choose(routes, _subject(series)), ""
        except (OSError, InvalidDicomError) as exc:
            note = f"first instance unreadable: {exc}"
        except Exception as exc:  # one series that cannot be routed must not hold up the rest
            log.error("routing a series failed: %s", failure(exc))
            note = f"routing failed: {type(exc).__name__}"
    return _Decision(series, chosen, note)


def route_ready(db: Database, routes: Sequence[Route]) -> int:
    """Create jobs for every ready series (or record that none matched). Returns jobs created.

    The rules are matched outside any transaction; each series' outcome is then written in a short
    transaction of its own, so one that cannot be routed never holds up the rest, and a series that
    an instance reopened meanwhile is left to wait. A series that a study-level route matches stays
    ready until its whole study is stable; then the study's ready series are written together, and
    each study-level route gets one job for all the series of the study that it matches.
    """
    with db.session() as session:
        ready = [
            _read(session, series)
            for series in session.scalars(select(Series).where(Series.status == SeriesStatus.READY))
        ]
    created = 0
    studies: dict[int, list[_Decision]] = {}
    for decision in (_decide(routes, series) for series in ready):
        if decision.study_routes:
            studies.setdefault(decision.series.study_id, []).append(decision)
        else:
            created += _record(db, [decision])
    for decisions in studies.values():
        if decisions[0].series.study_stable_at is not None:
            created += _record(db, decisions, _study_jobs(db, routes, decisions))
    return created


def _study_jobs(
    db: Database, routes: Sequence[Route], decisions: Sequence[_Decision]
) -> list[tuple[Route, list[_SeriesView]]]:
    """Each study-level route that matched a ready series of one study, with every series of the study
    it matches: the ready ones, and those routed before (so that a late instance, or a series sent
    later, runs the study's job again with all of them)."""
    names = {name for decision in decisions for name in decision.study_routes}
    with db.session() as session:
        routed = [
            _read(session, series)
            for series in session.scalars(
                select(Series).where(
                    Series.study_fk == decisions[0].series.study_id,
                    Series.status == SeriesStatus.ROUTED,
                    Series.instance_count > 0,
                )
            )
        ]
    subjects: dict[int, Subject] = {}
    for series in routed:
        try:
            subjects[series.id] = _subject(series)
        except (OSError, InvalidDicomError) as exc:
            log.warning("series %d left out of its study's job: header unreadable: %s", series.id, exc)
    jobs = []
    for route in (route for route in routes if route.name in names):
        members = [decision.series for decision in decisions if route.name in decision.study_routes]
        members += [
            series for series in routed if series.id in subjects and route_matches(route, subjects[series.id])
        ]
        jobs.append((route, sorted(members, key=lambda series: series.id)))
    return jobs


def _job(route: Route, inputs: Sequence[Series]) -> Job:
    return Job(
        series=inputs[0],
        inputs=list(inputs),
        route=route.name,
        handler=route.handler,
        model=route.model,
        model_version=route.model_version or "",
        options=dict(route.options),
        companions=dict(route.models),
        outputs=[spec.model_dump(exclude_none=True) for spec in route.outputs],
        destinations={"names": list(route.destinations)},
    )


def _record(
    db: Database,
    decisions: Sequence[_Decision],
    study_jobs: Sequence[tuple[Route, Sequence[_SeriesView]]] = (),
) -> int:
    """Write what routing decided for one series, or for a study's ready series together with the
    study's jobs, in one transaction. Nothing is written if an instance arrived meanwhile: the series,
    or the study, waits again."""
    with db.session() as session:
        rows = [
            series
            for decision in decisions
            if (series := session.get(Series, decision.series.id)) is not None
            and series.status == SeriesStatus.READY
        ]
        if len(rows) != len(decisions):
            return 0
        first = decisions[0].series
        if study_jobs:
            study = session.get(Study, first.study_id)
            if study is None or study.stable_at != first.study_stable_at:
                return 0
        created = 0
        for decision, series in zip(decisions, rows, strict=True):
            ready, chosen, note = decision.series, decision.routes, decision.note
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
                continue
            series.status = SeriesStatus.ROUTED
            series.route_note = ", ".join(r.name for r in chosen)
            for route in chosen:
                if route.group == "series":
                    session.add(_job(route, [series]))
                    audit.record(
                        session,
                        "route.chosen",
                        study_uid=ready.study_uid,
                        series_uid=ready.series_uid,
                        route=route.name,
                        handler=route.handler,
                        model=route.model,
                    )
                    created += 1
        for route, members in study_jobs:
            inputs = [session.get(Series, member.id) for member in members]
            session.add(_job(route, [series for series in inputs if series is not None]))
            audit.record(
                session,
                "route.chosen",
                study_uid=first.study_uid,
                series_uids=[member.series_uid for member in members],
                group="study",
                route=route.name,
                handler=route.handler,
                model=route.model,
            )
            created += 1
        return created
