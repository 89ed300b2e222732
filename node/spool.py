"""Where received instances and written results live on disk.

Every write is durable before it is acknowledged: a temporary file in the target folder (or the
listener's received file, on the same file system), fsync, an atomic rename over the final name, then
fsync of the folder so the rename itself survives power loss.
File names are built only from validated UIDs, so a hostile UID cannot escape the spool.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

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


_COPY_CHUNK = 16 * 1024 * 1024
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staged:
    """A complete file, not yet renamed over its final name: what is there now can still be compared
    with it (a re-sent instance) before :meth:`commit` makes it, durably, the file. It is fsynced only
    then, so a re-sent identical instance, never committed, costs no flush to disk."""

    def __init__(self, path: Path, temp: Path) -> None:
        self.path = path
        self.temp = temp
        self.committed = False

    def commit(self) -> Path:
        """The file fsynced, renamed over ``path``, the rename fsynced: then it may be acknowledged."""
        _fsync_file(self.temp)
        os.replace(self.temp, self.path)
        self.committed = True
        _fsync_dir(self.path.parent)
        return self.path


def _copy(source: BinaryIO, target: BinaryIO) -> None:
    """The rest of ``source`` onto ``target``, a chunk at a time; in the kernel where it can be."""
    target.flush()
    offset = source.tell()
    with contextlib.suppress(OSError, io.UnsupportedOperation):  # other file systems, or a BytesIO
        while copied := os.copy_file_range(source.fileno(), target.fileno(), _COPY_CHUNK, offset):
            offset += copied
        return
    source.seek(offset)
    shutil.copyfileobj(source, target, _COPY_CHUNK)


@contextlib.contextmanager
def staged(path: Path, head: bytes, body: BinaryIO | None = None) -> Iterator[Staged]:
    """Write ``head`` and then the rest of ``body`` to a temporary file beside ``path``, to be committed
    (see :class:`Staged`); the temporary file is removed unless the caller commits it."""
    _make_dirs_durably(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    with _uncommitted_removed(Staged(path, Path(tmp))) as file:
        with os.fdopen(fd, "wb") as handle:
            handle.write(head)
            if body is not None:
                _copy(body, handle)
        yield file


@contextlib.contextmanager
def adopted(path: Path, file: Path) -> Iterator[Staged]:
    """``file``, already complete on the spool's file system, staged to become ``path`` as it is: one
    write, no copy (the listener's received file; see node.ingest.accept). Removed unless committed."""
    _make_dirs_durably(path.parent)
    with _uncommitted_removed(Staged(path, file)) as staged_file:
        yield staged_file


@contextlib.contextmanager
def _uncommitted_removed(file: Staged) -> Iterator[Staged]:
    try:
        yield file
    finally:
        if not file.committed:
            file.temp.unlink(missing_ok=True)


def move_durably(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (its folders made as needed), the rename fsynced."""
    _make_dirs_durably(target.parent)
    os.replace(source, target)
    _fsync_dir(target.parent)


def link_aside(path: Path, folder: Path) -> Path:
    """Keep ``path`` under the first free ``<name>.<n><suffix>`` in ``folder``, durably: an earlier
    version of a file about to be replaced. A hard link, not a copy: the file is replaced, never
    changed, and ``folder`` is on the same file system."""
    _make_dirs_durably(folder)
    n = 1
    while True:
        target = folder / f"{path.stem}.{n}{path.suffix}"
        try:
            os.link(path, target)
        except FileExistsError:  # an earlier version's, or another thread's: the next number
            n += 1
            continue
        _fsync_dir(folder)
        return target


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees either nothing or all of it."""
    with staged(path, data) as file:
        file.commit()


class Spool:
    """The data folder's layout: ``incoming/<study>/<series>/<sop>.dcm`` and ``results/<job>/``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        self.receiving = self.root / "receiving"  # data sets being received, not yet acknowledged
        for folder in (self.incoming, self.results, self.receiving):
            folder.mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.incoming
            / check_uid(study_uid, "StudyInstanceUID")
            / check_uid(series_uid, "SeriesInstanceUID")
            / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        )

    def staged_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, head: bytes, body: BinaryIO
    ) -> contextlib.AbstractContextManager[Staged]:
        """An instance's file (``head``, then the rest of ``body``) written beside its place in the
        spool, to be committed there (see :func:`staged`)."""
        return staged(self.instance_path(study_uid, series_uid, sop_uid), head, body)

    def adopted_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, file: Path
    ) -> contextlib.AbstractContextManager[Staged]:
        """``file``, a complete instance file on the spool's file system, to be committed as it is in
        its place in the spool (see :func:`adopted`)."""
        return adopted(self.instance_path(study_uid, series_uid, sop_uid), file)

    def result_dir(self, job_id: int) -> Path:
        return self.results / str(int(job_id))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
