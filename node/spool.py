"""Where received instances and written results live on disk.

Every write is durable before it is acknowledged: a temporary file in the target folder, fsync, an
atomic rename over the final name, then fsync of the folder so the rename itself survives power loss.
File names are built only from validated UIDs, so a hostile UID cannot escape the spool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUID(ValueError):
    """A UID that is not a DICOM UID (PS3.5 §9.1): digits and dots, no leading zeros, ≤ 64 chars."""


def check_uid(value: object, what: str = "UID") -> str:
    text = str(value or "").strip()
    if not text or len(text) > 64 or not _UID.match(text):
        raise InvalidUID(f"{what} {text[:80]!r} is not a valid DICOM UID")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_durable: set[Path] = set()  # folders whose entry in their parent this process has seen fsynced
_DURABLE_KEPT = 10_000


def _make_dirs_durably(folder: Path) -> None:
    """mkdir -p, with every folder's entry in its parent fsynced before it is used: a new study's
    folder must survive a power cut as surely as the file in it. A folder that exists is not yet
    durable — another association may have just made it and not fsynced its parent yet — so its
    parent is fsynced here too, once per folder and process (an fsync more than needed is harmless,
    one less could lose an acknowledged instance)."""
    if folder in _durable and folder.is_dir():  # removed since (a rerun's results, a deleted study):
        return  # made again below
    if folder.parent != folder:
        _make_dirs_durably(folder.parent)
    folder.mkdir(exist_ok=True)
    with contextlib.suppress(PermissionError):  # an ancestor this user may not read: not the node's
        _fsync_dir(folder.parent)
    if len(_durable) >= _DURABLE_KEPT:  # forgetting costs one fsync per folder, not safety
        _durable.clear()
    _durable.add(folder)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees either nothing or all of it."""
    _make_dirs_durably(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class Spool:
    """The data folder's layout: ``incoming/<study>/<series>/<sop>.dcm`` and ``results/<job>/``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        for folder in (self.incoming, self.results):
            folder.mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.incoming
            / check_uid(study_uid, "StudyInstanceUID")
            / check_uid(series_uid, "SeriesInstanceUID")
            / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        )

    def store_instance(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        path = self.instance_path(study_uid, series_uid, sop_uid)
        write_atomic(path, data)
        return path

    def result_dir(self, job_id: int) -> Path:
        return self.results / str(int(job_id))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def leftover_temp_files(self) -> list[Path]:
        """Partial writes from a crash; never acknowledged, so safe to delete."""
        return [p for p in self.root.rglob(".tmp-*.part") if p.is_file()]
