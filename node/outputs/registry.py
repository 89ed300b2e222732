"""The output writers: which DICOM objects a job makes of an :class:`~handlers.base.Analysis`.

Each writer is one module that registers itself with :func:`register_output` under the name a route
lists in its ``outputs`` (``["sc", "sr"]`` by default), with the kind the results table records, and
the series number and description its objects get unless the route sets others. Writers run in the
route's order and see what the writers before them made (the report lists the overlays as evidence).
A writer turns an analysis into datasets and does nothing else: no model code, no files, no network.
Whatever it writes, :func:`write_outputs` then gives each dataset the source's patient and study
identity, as the source's bytes, and the source's character set (:mod:`node.outputs.charset`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import Dataset

from handlers.base import Analysis
from node.config import OutputSpec
from node.outputs.charset import SourceIdentity
from node.runtime.identity import ModelIdentity

_LO_MAX = 64  # Long String (LO): Series Description


@dataclass(frozen=True)
class OutputContext:
    """Everything a writer needs: the analysis, the model that made it, where its objects go."""

    analysis: Analysis
    model: ModelIdentity
    series_number: int
    series_description: str
    earlier: Sequence[Dataset] = ()  # what the writers before this one in the route's list made


Write = Callable[[OutputContext], list[Dataset]]


@dataclass(frozen=True)
class OutputWriter:
    name: str
    kind: str  # how the results table and file names call its objects: "SC", "SR", "SEG"
    write: Write
    series_number: int
    series_description: str  # a template: "{task}" is replaced by the analysis' task


_WRITERS: dict[str, OutputWriter] = {}


def register_output(
    name: str, *, kind: str, series_number: int, series_description: str
) -> Callable[[Write], Write]:
    """Make ``write`` the output ``name``: a decorator, applied where the writer is defined."""

    def add(write: Write) -> Write:
        known = _WRITERS.get(name)
        if known is not None and known.write is not write:
            raise ValueError(f"output {name!r} is registered twice")
        _WRITERS[name] = OutputWriter(name, kind, write, series_number, series_description)
        return write

    return add


def output_writer(name: str) -> OutputWriter:
    try:
        return _WRITERS[name]
    except KeyError:
        raise LookupError(f"no output writer {name!r}; known: {sorted(_WRITERS)}") from None


def describe(template: str, task: str) -> str:
    """A Series Description from its template, cut to fit its 64-character LO."""
    text = template.format(task=task)
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def check_output(spec: OutputSpec) -> None:
    """Refuse, when the configuration is checked, an output nobody registered or a bad template."""
    writer = output_writer(spec.writer)
    try:
        describe(spec.series_description or writer.series_description, "task")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"output {spec.writer}: series_description may use only {{task}}: {exc!r}") from exc


def write_outputs(
    analysis: Analysis, model: ModelIdentity, specs: Sequence[OutputSpec]
) -> list[tuple[str, Dataset]]:
    """Every object the route's outputs make, in order, each with its kind, each carrying the source's
    patient and study identity in the source's character set (:mod:`node.outputs.charset`)."""
    identity = SourceIdentity.of(analysis.sources[0])  # before a writer decodes the source's bytes
    made: list[tuple[str, Dataset]] = []
    for spec in specs:
        writer = output_writer(spec.writer)
        context = OutputContext(
            analysis=analysis,
            model=model,
            series_number=spec.series_number or writer.series_number,
            series_description=describe(spec.series_description or writer.series_description, analysis.task),
            earlier=[dataset for _, dataset in made],
        )
        made.extend((writer.kind, dataset) for dataset in writer.write(context))
    for _, dataset in made:
        identity.apply(dataset)
    return made
