"""Reconciliation: spool files the index does not know are indexed, at start and while the node runs.

An instance is safe once its file is in the spool; the index may still miss it: the node died before
indexing it, or the indexer was full and the sender was told to try later. Reconciliation finds such
files, at a cost proportional to what changed rather than to history. A durable watermark (the file
``index-watermark`` beside the spool's ``incoming/``) is a time before which every file in the spool
is known to be indexed (or set aside). A pass looks only into the series folders modified since, less
a margin (a folder's mtime changes when a file is renamed into it), asks the database only about the
files modified since in them, and moves the watermark up to its own start once nothing it found is
left unindexed. Without a watermark (the first start, or an admin removed it after restoring the
database from a backup, or the clock went back past it) one pass looks at the whole spool.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from node import audit
from node.config import Settings
from node.db import Database, Instance, Series, Study
from node.deletion import removing
from node.ingest.accept import arrival_of
from node.ingest.checks import read_header
from node.ingest.index import Arrival, Indexer, index_or_set_aside
from node.spool import Spool, write_atomic

log = logging.getLogger(__name__)

WATERMARK = "index-watermark"  # in the data folder: seconds since the epoch, as text
# How far before the watermark a pass still looks: folder times taken from a coarse clock, a clock
# stepped back a little, an instance renamed into the spool a while before the indexer got it.
MARGIN = 600.0
# A pass while the node runs leaves files this young to the arrival that is writing and indexing them.
SETTLE = 60.0
_ASKED = 500  # SOP Instance UIDs per database query


@dataclass(frozen=True)
class Found:
    """A spool file the database does not know, as found by a pass."""

    path: Path
    size: int
    modified: float  # its mtime: the watermark must not pass it until it is indexed


@dataclass(frozen=True)
class Pass:
    """What one pass looked at and did; its figures go to the log and the ``node.started`` audit."""

    folders: int  # series folders looked into
    found: int  # files the database did not know
    indexed: int  # of those, indexed (at start) or handed to the indexer (while running)


class Reconciler:
    """Passes over the spool, each from the watermark the last one left."""

    def __init__(self, settings: Settings, db: Database, spool: Spool, indexer: Indexer) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.indexer = indexer
        self.watermark_file = spool.root / WATERMARK
        # Spool files were checked against the limits of the day they came: one lowered since must not
        # leave an acknowledged instance unindexed for ever. The walk is a stream: memory stays flat.
        self._uncapped = settings.node.model_copy(update={"max_instance_mb": 2**40, "max_inflated_mb": 2**40})

    def at_start(self) -> Pass:
        """Before the listener opens, with nothing else writing: delete partial writes (never
        acknowledged), and index each file the database misses; one that cannot be indexed is set
        aside (node.ingest.index.set_aside), so it cannot keep the node from starting. Raises when the
        database is unavailable: a node without its database does not start."""
        began = time.time()
        with removing:  # a study being deleted: its files are not unindexed, they are going
            since = self._since(began)
            folders = list(self._changed_folders(since))
            for folder in folders:
                for leftover in folder.glob(".tmp-*.part"):
                    leftover.unlink(missing_ok=True)
            found = self._unknown(folders, since, began)
            indexed = 0
            for file in found:
                arrival = self._arrival(file)
                if arrival is not None:
                    done = index_or_set_aside(self.db, arrival, self.settings.study, "instance.reindexed")
                    indexed += done is not None  # None: set aside
        self._advance(began)
        return self._logged(Pass(len(folders), len(found), indexed), began)

    def periodic(self) -> Pass:
        """While the node runs: hand each file the database misses, and the indexer does not hold,
        to the indexer; files younger than ``SETTLE`` are left to the arrival writing them."""
        began = time.time()
        with removing:
            since = self._since(began)
            folders = list(self._changed_folders(since))
            held = self.indexer.unindexed().paths
            found = [file for file in self._unknown(folders, since, began - SETTLE) if file.path not in held]
            handed = 0
            for file in found:
                arrival = self._arrival(file)
                if arrival is None:
                    continue
                try:
                    self.indexer.submit(
                        arrival, timeout=1.0, action="instance.reindexed", since=file.modified
                    )
                except queue.Full:  # the database is far behind: the next pass tries again
                    log.warning("reconciliation paused: the indexer is full")
                    return self._logged(Pass(len(folders), len(found), handed), began)
                handed += 1
        oldest = self.indexer.unindexed().since
        self._advance(began if oldest is None else min(began, oldest))
        return self._logged(Pass(len(folders), len(found), handed), began)

    def _since(self, now: float) -> float | None:
        """Where a pass starts looking; None: everywhere."""
        try:
            watermark = float(self.watermark_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("reconciliation watermark unreadable (%s): the whole spool is looked at", exc)
            return None
        if watermark > now:  # the clock went back: a file written since may look older than it
            log.warning("reconciliation watermark is in the future: the whole spool is looked at")
            return None
        return watermark - MARGIN

    def _advance(self, watermark: float) -> None:
        write_atomic(self.watermark_file, f"{watermark!r}\n".encode())  # repr: read back exactly

    def _changed_folders(self, since: float | None) -> Iterator[Path]:
        """Series folders (``incoming/<study>/<series>``) modified at or after ``since``. A series
        folder's time is its own: a file renamed into it does not touch the study's folder, so every
        series folder is looked at, but only its time is read."""
        for study in _folders(self.spool.incoming):
            for series in _folders(study.path):
                try:
                    modified = series.stat().st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue
                if since is None or modified >= since:
                    yield Path(series.path)

    def _unknown(self, folders: list[Path], since: float | None, before: float) -> list[Found]:
        """The files in ``folders`` modified in [since, before) whose study, series and SOP Instance
        UID (its place in the spool) the database does not have together: a file whose SOP Instance
        UID is indexed under another series is a conflict to be set aside, not a file known."""
        files: dict[tuple[str, str, str], tuple[str, int, float]] = {}  # a Path each only for what is found
        for folder in folders:
            for entry in _entries(folder):
                if not entry.name.endswith(".dcm") or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (since is None or stat.st_mtime >= since) and stat.st_mtime < before:
                    place = (folder.parent.name, folder.name, entry.name.removesuffix(".dcm"))
                    files[place] = (entry.path, stat.st_size, stat.st_mtime)
        places = sorted(files)
        with self.db.session() as session:
            for start in range(0, len(places), _ASKED):
                asked = places[start : start + _ASKED]
                known = session.execute(
                    select(Study.study_uid, Series.series_uid, Instance.sop_uid)
                    .join(Series, Instance.series_fk == Series.id)
                    .join(Study, Series.study_fk == Study.id)
                    .where(Instance.sop_uid.in_([sop for _, _, sop in asked]))
                )
                for study_uid, series_uid, sop_uid in known:
                    files.pop((study_uid, series_uid, sop_uid), None)
        return [
            Found(Path(path), size, modified)
            for path, size, modified in (files[place] for place in places if place in files)
        ]

    def _arrival(self, file: Found) -> Arrival | None:
        """``file`` as an arrival; None (audited) for a damaged file, which must not stop the pass."""
        try:
            header = read_header(file.path, self._uncapped)
            return arrival_of(file.path, file.size, header, self.settings.node.ae_title)
        except Exception as exc:
            log.warning("spool file %s unreadable: %s", file.path.name, type(exc).__name__)
            audit.append(
                self.db,
                "instance.unreadable",
                outcome="failure",
                path=str(file.path),
                error=type(exc).__name__,
            )
            return None

    @staticmethod
    def _logged(done: Pass, began: float) -> Pass:
        if done.found:
            log.info(
                "reconciliation: %d series folder(s) looked into, %d file(s) unindexed, %d indexed, %.2f s",
                done.folders,
                done.found,
                done.indexed,
                time.time() - began,
            )
        return done


def _folders(path: Path | str) -> list[os.DirEntry[str]]:
    return [entry for entry in _entries(path) if entry.is_dir(follow_symlinks=False)]


def _entries(path: Path | str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except FileNotFoundError:  # a study deleted meanwhile
        return []
