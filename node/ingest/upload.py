"""Uploads: DICOM files, zip archives of them and photographs, handed to the node by a person
rather than a modality — through the same door as a C-STORE (:meth:`node.ingest.accept.Ingest.accept`:
the same checks, spool, index, audit and refusal reasons), with the user as the origin.

Files are told apart by their first bytes, never by their names. Each file, archive member or wrapped
photograph is written to a file of its own in the data folder's ``uploading/`` (on the spool's file
system, not a memory-backed /tmp; not ``receiving/``, whose files the ingest takes for the listener's
own) and accepted from there, so an upload holds at most one photograph's pixels in memory, never an
archive. An archive is bounded (members, each member's and all members' unpacked size) against zip
bombs: the sizes it declares are checked before a member is unpacked, and zipfile unpacks no more than
a member declares (one that would unpack to more fails its CRC). Only stored and deflated members are
unpacked: zipfile's bzip2 and LZMA decompressors are not bounded by the size they are asked for.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal

from pydicom.dataset import FileMetaDataset
from pydicom.uid import MediaStorageDirectoryStorage, generate_uid

from node.ingest import checks
from node.ingest.accept import Ingest, Origin, Refused
from node.ingest.identity import Details
from node.ingest.photo import NotAPhoto, PhotoKind, photo_format, photograph_dataset, read_picture
from node.privacy import failure
from node.spool import Spool

log = logging.getLogger(__name__)

MAX_MEMBERS = 10_000  # of one archive
UPLOADING = "uploading"  # in the data folder: a folder of its own for each upload in progress
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
_UNPACKED = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what zip tools write, and bounded when unpacked
_MAGIC = 8  # a file's first bytes: enough to tell a zip archive, a JPEG or a PNG


def remove_leftovers(spool: Spool) -> None:
    """Remove the folders of uploads a crash cut short: nothing in them was acknowledged (what was
    accepted is in the spool), and the user saw the upload fail."""
    shutil.rmtree(spool.root / UPLOADING, ignore_errors=True)


@dataclass(frozen=True)
class Outcome:
    """What became of one uploaded file or archive member (the API's ``files`` entries)."""

    name: str
    status: Literal["accepted", "refused"]
    study_uid: str | None = None
    sop_uid: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class PhotoDetails:
    """What the form says about the upload's photographs: what they are taken for, of whom."""

    kind: PhotoKind
    details: Details
    operator: str  # who took them: the user's name (Operators' Name)


def is_photo(head: bytes) -> bool:
    """Whether a file beginning with ``head`` is taken as a photograph."""
    return photo_format(head) is not None


class Upload:
    """One upload's files, taken one at a time; ``outcomes`` says what became of each. The
    photographs of one upload are one series of one study (the form's, else a new one)."""

    def __init__(self, ingest: Ingest, origin: Origin, photos: PhotoDetails | None, now: datetime) -> None:
        self.ingest = ingest
        self.node = ingest.settings.node
        self.origin = origin
        self.photos = photos
        self.now = now
        self.outcomes: list[Outcome] = []
        self._photo_study_uid = (photos.details.study_uid if photos else "") or str(generate_uid())
        self._photo_series_uid = str(generate_uid())
        self._photo_count = 0
        self._unpacked = 0  # bytes of every archive member taken so far
        (ingest.spool.root / UPLOADING).mkdir(exist_ok=True)
        self._folder = tempfile.TemporaryDirectory(dir=ingest.spool.root / UPLOADING)
        self._written = 0  # files written to the folder, to name the next one

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self._folder.cleanup()

    @property
    def studies(self) -> list[str]:
        """The studies something was accepted into, in the order first met."""
        return list(dict.fromkeys(o.study_uid for o in self.outcomes if o.study_uid))  # accepted ones

    @property
    def accepted(self) -> int:
        """How many files (archive members, photographs) the ingest took."""
        return sum(outcome.status == "accepted" for outcome in self.outcomes)

    def add(self, name: str, file: BinaryIO) -> None:
        """Take one uploaded file: a DICOM file, a zip archive of them, or a JPEG or PNG photograph."""
        try:
            file.seek(0)
            head = file.read(_MAGIC)
            file.seek(0)
            if head.startswith(_ZIP_MAGIC):
                self._archive(name, file)
            elif is_photo(head):
                self._photo(name, file)
            else:
                self._dicom_file(name, file)
        except Exception as exc:  # a fault of the node's own: the rest of the upload goes on
            log.error("an uploaded file failed: %s", failure(exc))
            self._refuse(name, f"internal error: {type(exc).__name__}")

    def _path(self) -> Path:
        """A new file in the upload's folder (named by number: an uploaded name may say anything)."""
        self._written += 1
        return Path(self._folder.name) / f"{self._written}.dcm"

    def _refuse(self, name: str, reason: str) -> None:
        """A file refused before it reached the ingest (which audits its own refusals)."""
        self.outcomes.append(Outcome(name, "refused", reason=reason))
        try:
            self.origin.audit(self.ingest.db, "upload.refused", "failure", file=name, reason=reason)
        except Exception as exc:  # the audit database itself may be what failed; its message would
            log.error("could not audit a refused upload: %s", failure(exc))  # quote the file's name

    def _dicom_file(self, name: str, source: BinaryIO) -> None:
        """A loose file, bounded by the request's size: the ingest refuses one over max_instance_mb."""
        path = self._path()
        with path.open("wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        self._accept(name, path)

    def _accept(self, name: str, path: Path) -> None:
        """Hand ``path`` to the ingest; a file that is not Part 10 is refused (and audited) there."""
        with path.open("rb") as file:
            try:
                meta = checks.read_meta(file)
            except checks.Unreadable:
                meta = FileMetaDataset()  # the ingest reads it again, and says why it cannot
        if meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:  # in a CD's or PACS's export
            path.unlink()
            self._refuse(name, "a DICOMDIR: the index of a set of DICOM files, which are taken on their own")
            return
        try:
            arrival = self.ingest.accept(meta, path, self.origin)
        except Refused as refusal:
            self.outcomes.append(Outcome(name, "refused", reason=refusal.reason))
        else:
            self.outcomes.append(Outcome(name, "accepted", arrival.study_uid, arrival.sop_uid))
        finally:
            path.unlink(missing_ok=True)  # or adopted into the spool

    def _archive(self, name: str, file: BinaryIO) -> None:
        """A zip archive's members, one at a time, each as its own file would be (but photographs)."""
        try:
            archive = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            self._refuse(name, f"not a readable zip archive ({type(exc).__name__})")
            return
        with archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                self._refuse(name, f"more than {MAX_MEMBERS} files in the archive")
                return
            for info in members:
                if not info.is_dir():  # a folder entry holds nothing; its files are members of their own
                    self._member(archive, info, f"{name}/{info.filename}")

    def _member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> None:
        """One archive member, bounded by its own size limit and what is left of the upload's."""
        if info.compress_type not in _UNPACKED:
            self._refuse(name, "compressed other than by deflate: zip it again with the usual settings")
            return
        each = self.node.max_instance_mb * 2**20
        left = self.node.max_upload_mb * 2**20 - self._unpacked
        if info.file_size > min(each, left):  # as the archive says; zipfile unpacks no more than that
            self._refuse(name, self._too_large(each, info.file_size))
            return
        path = self._path()
        try:
            with archive.open(info) as source, path.open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
                self._unpacked += target.tell()
        # RuntimeError: encrypted; NotImplementedError: patched data, strong encryption
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
            path.unlink()
            self._refuse(name, f"cannot be unpacked ({type(exc).__name__})")
            return
        with path.open("rb") as written:
            head = written.read(_MAGIC)
        if head.startswith(_ZIP_MAGIC) or is_photo(head):
            path.unlink()
            self._refuse(name, "not a DICOM file: an archive holds DICOM files only")
            return
        self._accept(name, path)

    def _too_large(self, each: int, size: int) -> str:
        """Why a member of ``size`` bytes is refused: over the instance limit, else the upload's."""
        if size > each:
            return f"over {self.node.max_instance_mb} MB when unpacked"
        return f"the upload unpacks to more than {self.node.max_upload_mb} MB"

    def _photo(self, name: str, file: BinaryIO) -> None:
        """A JPEG or PNG wrapped as a VL Photographic Image of the form's patient, then accepted."""
        if self.photos is None:  # the API asks for the form's details before it takes any file
            self._refuse(name, "a photograph needs the task and the patient's details")
            return
        size = file.seek(0, 2)
        file.seek(0)
        try:
            picture = read_picture(file, self.node.max_instance_mb * 2**20)
        except NotAPhoto as exc:
            self._refuse(name, str(exc))
            return
        self._photo_count += 1
        dataset = photograph_dataset(
            picture,
            self.photos.kind,
            self.photos.details,
            study_uid=self._photo_study_uid,
            series_uid=self._photo_series_uid,
            instance=self._photo_count,
            operator=self.photos.operator,
            station=self.node.ae_title,
            now=self.now,
            source_bytes=size,
        )
        path = self._path()
        dataset.save_as(path, enforce_file_format=True)
        del dataset, picture
        self._accept(name, path)
