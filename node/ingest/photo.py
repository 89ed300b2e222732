"""Photographs as DICOM: a JPEG or PNG from a phone or a camera, wrapped as a VL Photographic Image
(Modality XC) naming what it shows in the Anatomic Region Sequence, as the routes expect
(config.example.toml: conjunctiva-anemia, skin-photo), so an uploaded photograph travels the same path
as one a modality sends.

Only the pixels are taken from the file, turned upright as its EXIF orientation says: the place, the
device and everything else EXIF holds stay out of the DICOM object. The pixels are stored
uncompressed (Explicit VR Little Endian) and a JPEG's lossy compression is declared.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Literal

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    VLPhotographicImageStorage,
    generate_uid,
)

from node.ingest.identity import Details

Code = tuple[str, str, str]  # code value, coding scheme designator, code meaning
MANUFACTURER = "AI node upload"
MAX_PIXELS = 50_000_000  # larger than any phone's picture; a bigger one is refused, not decoded
_EXIF_IFD = 0x8769
_DATE_TIME_ORIGINAL = 0x9003
# EXIF Orientation → the turn that makes the picture upright, as ImageOps.exif_transpose has it; that
# function then writes the rest of the EXIF back into the turned picture, which a damaged tag trips
# (TypeError, struct.error), and the node keeps none of it.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_FORMATS = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


@dataclass(frozen=True)
class PhotoKind:
    """What a photograph is taken for: ``label`` for people, the frame ``guide`` the camera page draws,
    and how the DICOM object says what it shows."""

    label: str
    guide: Literal["bezier", "circle"]
    region: Code  # Anatomic Region Sequence (CID 4029/4209)
    body_part: str = ""  # Body Part Examined, where a defined term fits
    sop_class_uid: UID = VLPhotographicImageStorage
    modality: str = "XC"


KINDS: dict[str, PhotoKind] = {
    "conjunctiva": PhotoKind(
        "Conjunctiva (anaemia)", "bezier", ("29445007", "SCT", "Conjunctiva"), body_part="EYE"
    ),
    "skin": PhotoKind("Skin lesion", "circle", ("39937001", "SCT", "Skin")),
}


class NotAPhoto(ValueError):
    """A file that cannot be taken as a photograph; the message says why and names no patient."""


def photo_format(head: bytes) -> str | None:
    """ "JPEG" or "PNG" by the file's first bytes (its name or content type may say anything), else
    None."""
    return next((name for magic, name in _FORMATS.items() if head.startswith(magic)), None)


def code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def set_colour_pixels(ds: Dataset, rgb: np.ndarray) -> None:
    """The Image Pixel module of an uncompressed (H, W, 3) uint8 RGB picture."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"a photograph is (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()


@dataclass(frozen=True)
class Picture:
    """A photograph's pixels, upright, and what the DICOM object says about its making."""

    rgb: np.ndarray
    format: str  # JPEG or PNG
    taken: datetime | None  # EXIF DateTimeOriginal


def read_picture(file: BinaryIO, max_bytes: int) -> Picture:
    """Decode a JPEG or PNG, turned upright by its EXIF orientation. NotAPhoto for anything else,
    or for a picture whose pixels would take more than ``max_bytes``."""
    try:
        with Image.open(file, formats=list(_FORMATS.values())) as image:
            width, height = image.size
            if width * height > MAX_PIXELS or width * height * 3 > max_bytes:
                raise NotAPhoto(f"the picture is too large ({width}x{height} pixels)")
            taken = _taken(image)
            return Picture(_rgb(_upright(image)), str(image.format), taken)
    except NotAPhoto:
        raise
    except Image.DecompressionBombError:  # Pillow's own bound, far above MAX_PIXELS, checked on opening
        raise NotAPhoto("the picture is too large (its header claims a vast size)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise NotAPhoto(f"not a readable JPEG or PNG picture ({type(exc).__name__})") from None


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF (or XMP) Orientation says."""
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def _rgb(image: Image.Image) -> np.ndarray:
    """8-bit RGB: a 16-bit grey PNG by its high byte (Pillow's own conversion would clip it white); a
    transparent PNG's see-through parts white, as the capture page fills what lies outside its frame
    guide (Pillow's conversion would keep whatever colour they hide)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., np.newaxis], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _taken(image: Image.Image) -> datetime | None:
    """When the picture was taken, as its EXIF says (local time, as cameras write it)."""
    value = image.getexif().get_ifd(_EXIF_IFD).get(_DATE_TIME_ORIGINAL)
    try:
        return datetime.strptime(str(value).strip("\x00 "), "%Y:%m:%d %H:%M:%S") if value else None
    except ValueError:
        return None


def _needs_unicode(*values: str) -> bool:
    return any(not value.isascii() for value in values)


def photograph_dataset(
    picture: Picture,
    kind: PhotoKind,
    details: Details,
    *,
    study_uid: str,
    series_uid: str,
    instance: int,
    operator: str,
    station: str,
    now: datetime,
    source_bytes: int,
) -> Dataset:
    """``picture`` as a VL Photographic Image of the patient and study in ``details``, instance
    ``instance`` of the upload's series, taken by ``operator`` through the node named ``station``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = kind.sop_class_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    texts = (details.patient_name, details.study_description, operator, kind.label)
    if _needs_unicode(*texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = kind.sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    # Patient and study
    ds.PatientName = details.patient_name
    ds.PatientID = details.patient_id
    ds.PatientBirthDate = details.patient_birth_date
    ds.PatientSex = details.patient_sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = details.accession_number
    ds.StudyDescription = details.study_description or kind.label
    # Series and equipment: the node's upload, and who took the picture
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDate, ds.SeriesTime = ds.StudyDate, ds.StudyTime
    ds.Modality = kind.modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Uploaded photograph: {kind.label}"
    ds.OperatorsName = operator
    if kind.body_part:
        ds.BodyPartExamined = kind.body_part
    ds.Manufacturer = ds.ManufacturerModelName = MANUFACTURER
    ds.StationName = station
    # The image
    taken = picture.taken or now
    ds.InstanceNumber = instance
    ds.ContentDate, ds.ContentTime = taken.strftime("%Y%m%d"), taken.strftime("%H%M%S")
    ds.AcquisitionDateTime = taken.strftime("%Y%m%d%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.AnatomicRegionSequence = [code(*kind.region)]
    if details.laterality:
        ds.ImageLaterality = details.laterality
    ds.AcquisitionContextSequence = []
    if picture.format == "JPEG":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = f"{picture.rgb.nbytes / max(source_bytes, 1):.2f}"[:16]
    else:
        ds.LossyImageCompression = "00"
    set_colour_pixels(ds, picture.rgb)
    return ds
