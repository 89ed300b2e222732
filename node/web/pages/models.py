"""The models page: which model packages are installed, what their cards say, and what they have said.

Each package shows its manifest (version, task, labels, the weights' sha256, checked against the file)
and its model card. A card is text written by whoever built the model, not markup the node trusts: raw
HTML in it is shown as text, and links keep only web and mail schemes. The statistics come from the
jobs table, per model name and the version that ran, so an admin sees which version said what.
"""

from __future__ import annotations

import functools
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element

import markdown
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor
from sqlalchemy import select

from node.db import Database, Job, JobStatus
from node.runtime.package import MODEL_CARD, ModelPackage, discover, sha256_of
from node.web.auth import Principal, require
from node.web.render import page

router = APIRouter()

_SAFE_SCHEMES = {"", "http", "https", "mailto"}


class _Links(Treeprocessor):
    """Drops a link or image address whose scheme could run code (javascript:, data:, vbscript:)."""

    def run(self, root: Element) -> None:
        for element in root.iter():
            for attribute in ("href", "src"):
                address = element.get(attribute)
                if address is not None and _scheme(address) not in _SAFE_SCHEMES:
                    del element.attrib[attribute]


def _scheme(address: str) -> str:
    """The scheme a browser would see: after decoding character references ("&#106;avascript:")
    and dropping the control characters and spaces it ignores."""
    decoded = "".join(c for c in html.unescape(address) if c.isprintable() and not c.isspace())
    return urlsplit(decoded).scheme.lower()


class _TextOnly(Extension):
    """Markdown without its raw-HTML pass-through: ``<script>`` in a card is escaped like any text."""

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.treeprocessors.register(_Links(md), "safe_links", 0)


def render_card(text: str) -> str:
    """A model card's Markdown as HTML that carries no markup of the card author's own."""
    return markdown.markdown(text, extensions=["tables", "fenced_code", "sane_lists", _TextOnly()])


@functools.lru_cache(maxsize=64)
def _weights_digest(path: Path, size: int, mtime_ns: int) -> str:
    """A weights file's sha256, read once per file version: real models run to hundreds of MB."""
    return sha256_of(path)


def weights_state(package: ModelPackage) -> str:
    """Whether the weights on disk are those the manifest vouches for: "verified", "missing" or
    "MISMATCH" (the node refuses to run such a package)."""
    path = package.weights_path
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return "missing"
    digest = _weights_digest(path, stat.st_size, stat.st_mtime_ns)
    return "verified" if digest == package.manifest.sha256 else "MISMATCH"


@dataclass
class FindingRate:
    """How often one finding was called present among the analyses that reported it."""

    meaning: str
    present: int = 0
    reported: int = 0

    @property
    def rate(self) -> float:
        return self.present / self.reported if self.reported else 0.0


@dataclass
class ModelStats:
    """The jobs of one model version (version "" when none ran: a job that failed before loading it
    or still waits), by state, and each finding's positive rate over the jobs that were analysed."""

    model: str
    version: str
    jobs: int = 0
    done: int = 0
    failed: int = 0
    waiting: int = 0
    not_analysed: int = 0
    findings: dict[str, FindingRate] = field(default_factory=dict)

    def count(self, status: JobStatus, outcome: dict[str, Any]) -> None:
        self.jobs += 1
        if status == JobStatus.FAILED:
            self.failed += 1
            return
        if status != JobStatus.DONE:
            self.waiting += 1
            return
        self.done += 1
        if not outcome.get("analysed", False):
            self.not_analysed += 1
            return
        for finding in outcome.get("findings", []):
            meaning = str(finding.get("meaning", ""))
            rate = self.findings.setdefault(meaning, FindingRate(meaning))
            rate.reported += 1
            rate.present += bool(finding.get("present"))


def model_statistics(db: Database) -> dict[tuple[str, str], ModelStats]:
    """Every model version that has jobs, keyed by (name, version)."""
    stats: dict[tuple[str, str], ModelStats] = {}
    with db.session() as session:
        rows = session.execute(
            select(Job.model, Job.model_version, Job.status, Job.outcome).execution_options(yield_per=500)
        )
        for model, version, status, outcome in rows:
            key = (model, version or "")
            stats.setdefault(key, ModelStats(*key)).count(status, outcome or {})
    return stats


@dataclass(frozen=True)
class PackageView:
    """One installed package as the page shows it."""

    package: ModelPackage
    weights: str
    card: str | None  # HTML; None: the package has no card
    stats: ModelStats


def installed(models_dir: Path, stats: dict[tuple[str, str], ModelStats]) -> list[PackageView]:
    views = []
    for package in discover(models_dir):
        card_path = package.path / MODEL_CARD
        card = render_card(card_path.read_text(encoding="utf-8")) if card_path.is_file() else None
        key = (package.manifest.name, package.manifest.version)
        views.append(PackageView(package, weights_state(package), card, stats.get(key, ModelStats(*key))))
    return views


@router.get("/models", response_class=HTMLResponse)
def models_page(
    request: Request, principal: Annotated[Principal, Depends(require("viewer"))]
) -> HTMLResponse:
    settings = request.app.state.settings
    stats = model_statistics(request.app.state.db)
    packages = installed(settings.node.models_dir, stats)
    shown = {(view.package.manifest.name, view.package.manifest.version) for view in packages}
    others = [stats[key] for key in sorted(stats) if key not in shown]
    return page(
        request,
        "models.html",
        principal,
        packages=packages,
        others=others,
        models_dir=settings.node.models_dir,
    )
